"""The training loop: one :class:`Trainer` walks a run through its phases.

::

    train(cfg, out)
      └ RunDir(out).locked()          one writer per run directory
          ├ prepare                   new run: refuse to overwrite; resume: the saved config
          ├ Trainer(cfg)              task, model (started inside its constraints), optimizers,
          │                           schedules, the batch generator
          ├ restore / create          from checkpoint.pt, or a fresh run directory
          ├ fit                       per step: forward → loss → backward → (all-reduce) →
          │                           optimizer.step (decay → step → project) → schedule;
          │                           every eval_every steps: evaluate, certify, check the
          │                           constraints, log; every checkpoint_every steps: checkpoint
          └ finish                    final.json, curves.png

``train(config, out, resume=True)`` continues from the checkpoint exactly: model, optimizer,
schedule, data-sampling generator and RNG states are all restored, so the final weights equal
those of an uninterrupted run.

Under ``torchrun --nproc_per_node=N -m lipschitz train ...`` the same loop runs on every rank:
each computes the gradient of its slice of the global batch, gradients are averaged, each rank
orthogonalizes and projects only its share of the matrices (``lipschitz.optim.distribute``),
and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lipschitz.certify import certified_radii, certify
from lipschitz.choices import check_choices
from lipschitz.config import Config
from lipschitz.data.tasks import CharTask, make_task
from lipschitz.nn import BaselineGPT, LipschitzGPT, activation_stats, build_model
from lipschitz.nn.lookup import content_off, has_content
from lipschitz.optim import (
    build_optimizers,
    constraint_violations,
    distribute,
    is_constrained,
    start_inside_constraints,
    sync_constraint_state,
    work_counts,
)
from lipschitz.schedules import schedule
from lipschitz.training.inference import evaluate
from lipschitz.training.report import Progress, plot_curves
from lipschitz.training.rundir import RunDir, first_line
from lipschitz.training.runtime import (
    all_reduce_gradients,
    autocast,
    broadcast_object,
    init_distributed,
    rank_and_world,
    select_device,
)


class ConstraintViolation(RuntimeError):
    """A constrained weight left its ball beyond the constraint's guarantee (or is not finite)."""


@dataclass
class TrainState:
    """Where a run stands, beyond model and optimizers (step, times and the matrix work
    counts are checkpointed)."""

    step: int = 0
    elapsed_s: float = 0.0  # wall time of earlier processes of this run
    train_time_s: float = 0.0  # time spent in training steps (no evaluation)
    last_eval: dict = field(default_factory=dict)  # the latest evaluation record (not saved)
    # matrices each rank orthogonalized / projected in earlier processes of this run, counted
    # from step work_from_step (a resume at another world size starts the count afresh)
    work_before: list[dict] | None = None
    work_from_step: int = 0


def train(cfg: Config, out: str | Path, resume: bool = False) -> dict:
    """Train ``cfg`` into the run directory ``out``; returns the final metrics (final.json).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank runs this: ``batch_size`` is the global
    batch, each rank computes the gradient of its slice of it, gradients are averaged, and the
    optimizers split their matrix work across ranks (:func:`lipschitz.optim.distribute`). The
    result equals a single-process run with the same global batch. Only rank 0 writes files.

    Denormal floats (e.g. in the momentum of dead units) slow CPU matmuls ~5×, so they are
    flushed to zero while training; the process-wide setting is restored afterwards.
    """
    check_choices(cfg)  # before anything is written
    started = init_distributed(cfg.device)
    torch.set_flush_denormal(True)
    run = RunDir(out)
    try:
        with _locked_by_rank0(run, create=not resume):
            if resume and run.is_finished():
                return run.final()  # nothing to do: its results stay as they are
            cfg = _prepare(cfg, run, resume)
            trainer = Trainer(cfg, run)
            if resume:
                trainer.restore()
            else:
                trainer.start()
            trainer.fit()
            return trainer.finish()
    finally:
        torch.set_flush_denormal(False)
        if started:
            dist.destroy_process_group()


@contextlib.contextmanager
def _locked_by_rank0(run: RunDir, create: bool):
    """Rank 0 holds the run directory's lock for the block; under torchrun every rank learns
    whether it got it, so that all stop together if not."""
    if rank_and_world()[1] == 1:
        with run.locked(create):
            yield
        return
    with contextlib.ExitStack() as stack:
        error = None
        if rank_and_world()[0] == 0:
            try:
                stack.enter_context(run.locked(create))
            except Exception as err:  # shared with the other ranks, then raised on rank 0
                error = err
        message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 could not lock {run.path}: {message}")
        yield


def _prepare(cfg: Config, run: RunDir, resume: bool) -> Config:
    """Check the run directory; returns the config to train (the saved one on resume)."""
    if not resume:
        run.check_can_start(cfg)  # on every rank, so that all of them stop together
        return cfg
    if not (run / run.CHECKPOINT).exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {run / run.CHECKPOINT}")
    data_dir = cfg.data_dir  # the caller's data directory wins: the data may have moved
    saved = run.config()
    check_choices(saved)
    return dataclasses.replace(saved, data_dir=data_dir or saved.data_dir)


class Trainer:
    """A run in progress: its task, model, optimizers and :class:`TrainState`."""

    def __init__(self, cfg: Config, run: RunDir) -> None:
        self.cfg, self.run = cfg, run
        self.rank, self.world = rank_and_world()
        self.main = self.rank == 0  # the only rank that writes files
        if cfg.batch_size % (cfg.grad_accum * self.world) != 0:
            raise ValueError(
                f"batch_size={cfg.batch_size} must be divisible by grad_accum={cfg.grad_accum} "
                f"× the number of processes ({self.world})"
            )
        self.device = select_device(cfg.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
        self.task = make_task(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.task.n_outputs, self.task.n_inputs).to(self.device)
        self.optimizers = build_optimizers(cfg, self.model)
        start_inside_constraints(self.optimizers)
        if self.world > 1:
            for p in self.model.parameters():  # identical by seeding; made bit-identical here
                dist.broadcast(p.detach(), 0)
            for opt in self.optimizers:
                if is_constrained(opt):
                    distribute(opt)
        lr_lambda = _lr_schedule(cfg)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in self.optimizers]
        self.batch_gen = torch.Generator().manual_seed(cfg.seed + 1)  # same batches on all ranks
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.state = TrainState()
        self.margins = None  # margin_eps: the latest margin_offsets()
        self.t_start = time.time()  # this process's share of the run's wall time starts now

    # ---------------------------------------------------------------------------- phases

    def start(self) -> None:
        """A fresh run directory: marker, config, vocabulary, empty metrics."""
        if self.main:
            self.run.create(self.cfg, self.task.n_outputs, self.task.n_inputs, self.task.vocab)

    def restore(self) -> None:
        """Continue from checkpoint.pt exactly (weights, optimizers, schedules, RNG states)."""
        run = self.run
        if self.task.vocab is not None and run.vocab() != self.task.vocab:
            raise ValueError(f"--resume: the data's vocabulary differs from {run / run.VOCAB}")
        saved = run.load_checkpoint()
        try:
            self._load_state(saved)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(
                f"{run / run.CHECKPOINT}: does not fit this run: {first_line(err)}"
            ) from None
        if self.main:
            if not run.is_run():  # a run directory written before run.json existed
                run.write_marker(self.task.n_outputs, self.task.n_inputs)
            run.keep_metrics_until(self.state.step)  # later lines are redone

    def _load_state(self, saved: dict) -> None:
        if not isinstance(saved, dict):
            raise TypeError("the saved state is not a dict")
        step = saved["step"]
        if type(step) is not int or not 0 <= step <= self.cfg.steps:
            raise ValueError(f"its step {step!r} is not an int in [0, steps={self.cfg.steps}]")
        for key in ("elapsed_s", "train_time_s"):
            value = saved[key]
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"its {key} {value!r} is not a finite time >= 0")
        for name, t in saved["model"].items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"its weight {name!r} holds a non-finite value")
        self.model.load_state_dict(saved["model"])
        for opt, s in zip(self.optimizers, saved["optimizers"], strict=True):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, saved["schedulers"], strict=True):
            sched.load_state_dict(s)
        self.batch_gen.set_state(saved["batch_generator"])
        torch.set_rng_state(saved["torch_rng"])
        if self.device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.state = TrainState(saved["step"], saved["elapsed_s"], saved["train_time_s"])
        work = saved.get("work_per_rank")  # absent in checkpoints written before it was saved
        if work is not None and len(work) == self.world:
            self.state.work_before = work
            self.state.work_from_step = saved["work_from_step"]
        else:
            self.state.work_from_step = saved["step"]

    def fit(self) -> None:
        """Train from the current step to cfg.steps, evaluating, logging and checkpointing."""
        cfg, state = self.cfg, self.state
        progress = Progress(cfg.steps, state.step, cfg.log_every, enabled=self.main)
        metrics = self.run.metrics_writer() if self.main else None
        self.model.train()
        try:
            while state.step < cfg.steps:
                record = self.train_step()
                evaluates = state.step % cfg.eval_every == 0 or state.step == cfg.steps
                if evaluates:
                    record.update(self.eval_record())
                    state.last_eval = record
                if metrics and (state.step % cfg.log_every == 0 or evaluates):
                    metrics.write(record)
                if evaluates:
                    _stop_if_broken(record, state.step)
                progress.update(state.step, _shown(record, state.last_eval))
                if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                    self.checkpoint()
        finally:
            progress.close()
            if metrics:
                metrics.close()

    def train_step(self) -> dict:
        """One optimizer step on one global batch; returns its metrics record."""
        cfg, state, t0 = self.cfg, self.state, time.time()
        micro_batch = cfg.batch_size // cfg.grad_accum  # global sequences per micro-step
        local = micro_batch // self.world  # this rank's slice of each micro-batch
        mine = slice(self.rank * local, (self.rank + 1) * local)
        loss_sum = 0.0
        margins = None
        if cfg.margin_eps:  # the certificate's SVDs cost about an MLP step: every 10 steps,
            # and at every checkpoint step, so that a resumed run recomputes where it left off
            if state.step % MARGIN_EVERY == 0 or state.step % cfg.checkpoint_every == 0:
                self.margins = self.margin_offsets()
            margins = self.margins
        for _ in range(cfg.grad_accum):
            x, y = self.task.batch(micro_batch, self.batch_gen)  # the global micro-batch ...
            x, y = x[mine].to(self.device), y[mine].to(self.device)  # ... this rank's slice
            with autocast(self.device, cfg.cpu_bf16):
                logits = self.forward(x)
            # train_temperature τ: the loss sees τ·logits (a margin-seeking loss, as in
            # Lipschitz classifiers); the model, its bound and the evaluation do not
            logits = logits.float().flatten(0, -2)
            if margins is not None:  # z_j + ε·M[y, j]: a win certifies radius ε
                logits = logits + cfg.margin_eps * margins[y.flatten()]
            logits = logits * cfg.train_temperature
            loss = F.cross_entropy(logits, y.flatten())
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        train_loss = loss_sum / cfg.grad_accum
        if self.world > 1:
            train_loss = all_reduce_gradients(self.model, train_loss)
        if not math.isfinite(train_loss):
            ckpt = self.run / self.run.CHECKPOINT
            raise FloatingPointError(
                f"training loss became {train_loss} at step {state.step + 1}; the last good "
                f"checkpoint is {ckpt if ckpt.exists() else 'none'}"
            )
        lr = self.base_lr()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for sched in self.schedulers:
            sched.step()
        state.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # count this step's GPU work in this step
        state.train_time_s += time.time() - t0
        tokens = state.step * cfg.batch_size * self.task.tokens_per_example
        return {"step": state.step, "train_loss": train_loss, "lr": lr, "tokens_seen": tokens}

    @torch.no_grad()
    def verified_accuracy(self, cert) -> float:
        """The fraction of the validation images classified correctly with a certified ℓ2
        radius above VERIFIED_EPS (36/255, the benchmark's), from ``cert``'s pairwise bounds."""
        was_training = self.model.training
        self.model.eval()
        pairwise = torch.tensor(cert.pairwise_l2, device=self.device)
        verified, count = 0, 0
        for x, y in self.task.val_batches():
            x, y = x.to(self.device), y.to(self.device)
            radii = certified_radii(self.model(x).float(), y, cert.lipschitz_l2, pairwise)
            verified += int((radii > VERIFIED_EPS).sum())
            count += len(y)
        self.model.train(was_training)
        return verified / count

    def margin_offsets(self) -> Tensor:
        """M (K, K): the certified ℓ2 constant of each logit difference z_i − z_j for the
        weights as they are now (certify's pairwise_l2; detached: the caps bound it)."""
        cert = certify(self.model)
        if cert.pairwise_l2 is None:
            raise ValueError(f"margin_eps needs an image classifier, not {self.cfg.model!r}")
        return torch.tensor(cert.pairwise_l2, dtype=torch.float32, device=self.device)

    def base_lr(self) -> float:
        """The learning rate of the hidden matrices (``lr`` scheduled), the one ``metrics.jsonl``
        logs; the first group's where no group is hidden (an MLP under AdamW)."""
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        return next((g["lr"] for g in groups if g.get("role") == "hidden"), groups[0]["lr"])

    def eval_record(self) -> dict:
        """Validation metrics (every rank scores its share), and on rank 0 the certificate,
        per-matrix norms, constraint health and activation statistics; every rank returns
        rank 0's record."""
        record = evaluate(self.model, self.task, self.device, self.cfg.train_temperature)
        if self.main:
            record.update(self.certificate())
            norms = record.get("weight_norms")
            found = [v for o in self.optimizers for v in constraint_violations(o, norms)]
            if found:
                record["constraint_violations"] = found
            self.model.eval()
            with torch.no_grad():
                probe = self.task.probe().to(self.device)
                record["activations"] = activation_stats(self.model, probe)
            self.model.train()
        return broadcast_object(record)

    def certificate(self) -> dict:
        """The certified bound (None for LayerNorm baselines), the paper's formula for a
        LipschitzGPT (App. B, to compare with its numbers) and the norm of every matrix."""
        if isinstance(self.model, BaselineGPT):
            return {"lipschitz_bound": None}
        cert = certify(self.model)
        out = {"lipschitz_bound": cert.lipschitz}
        if isinstance(self.model, LipschitzGPT):
            try:
                out["lipschitz_bound_paper_rule"] = certify(self.model, rule="paper").lipschitz
            except TypeError:  # a block the paper has no formula for (LookupAttention)
                out["lipschitz_bound_paper_rule"] = None
        if cert.lipschitz_l2 is not None:
            out["lipschitz_bound_l2"] = cert.lipschitz_l2
        if cert.pairwise_l2 is not None:
            out["val_verified_acc"] = self.verified_accuracy(cert)
        out["weight_norms"] = {layer["name"]: layer["rms_operator_norm"] for layer in cert.layers}
        return out

    def checkpoint(self) -> None:
        """Save the training state (every rank syncs its constraint state; rank 0 writes)."""
        for opt in self.optimizers:
            sync_constraint_state(opt)  # every rank takes part
        work = self.work_per_rank()  # every rank takes part
        if not self.main:
            return
        state = self.state
        self.run.save_checkpoint({
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "batch_generator": self.batch_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "step": state.step,
            "elapsed_s": state.elapsed_s + time.time() - self.t_start,
            "train_time_s": state.train_time_s,
            "world_size": self.world,
            "work_per_rank": work,
            "work_from_step": state.work_from_step,
        })  # fmt: skip

    def work_per_rank(self) -> list[dict]:
        """The matrices each rank orthogonalized (``msign``) and projected (``projections``)
        since step ``state.work_from_step``: this process's counts plus the earlier processes'
        of a resumed run. Every rank takes part (one all-gather)."""
        counts = {k: sum(work_counts(opt)[k] for opt in self.optimizers)
                  for k in ("msign", "projections")}  # fmt: skip
        work = [counts]
        if self.world > 1:
            work = [None] * self.world
            dist.all_gather_object(work, counts)
        before = self.state.work_before or [dict.fromkeys(counts, 0)] * self.world
        return [{k: b[k] + w[k] for k in w} for b, w in zip(before, work, strict=True)]

    def finish(self) -> dict:
        """The final metrics: written to final.json (and curves.png) by rank 0, returned."""
        cfg, state = self.cfg, self.state
        last = state.last_eval or self.eval_record()  # resumed after the last checkpoint's eval
        work = self.work_per_rank()
        tokens = state.step * cfg.batch_size * self.task.tokens_per_example
        final = {key: last.get(key) for key in _FINAL_FROM_EVAL}
        final.update({
            "steps": state.step,
            "tokens_seen": tokens,
            "wall_time_s": state.elapsed_s + time.time() - self.t_start,
            "train_time_s": state.train_time_s,
            "tokens_per_s": tokens / max(state.train_time_s, 1e-9),
            "eval_protocol": cfg.eval_protocol,
            "data_source": self.task.source,
            "device": str(self.device),
            "world_size": self.world,
            "work_per_rank": work,  # matrices orthogonalized / projected by each rank
            "work_from_step": state.work_from_step,  # 0 unless resumed at another world size
            # or from a checkpoint that did not save the counts
        })  # fmt: skip
        if last.get("constraint_violations"):
            final["constraint_violations"] = last["constraint_violations"]
        if has_content(self.model):  # the ablation: what the content terms add
            with content_off(self.model):
                final["val_acc_lags_only"] = evaluate(self.model, self.task, self.device)["val_acc"]
        if isinstance(self.task, CharTask) and cfg.eval_protocol == "paper":  # and the full split
            full = evaluate(self.model, self.task, self.device, protocol="full")
            final.update(val_loss_full=full["val_loss"], val_acc_full=full["val_acc"])
        if self.main:
            self.run.write_final(final)
            plot_curves(self.run.metrics(), self.run / self.run.CURVES)
        if self.world > 1:
            dist.barrier()  # nobody leaves while rank 0 still writes
        return final


_FINAL_FROM_EVAL = ("val_loss", "val_acc", "lipschitz_bound", "lipschitz_bound_l2",
                    "lipschitz_bound_paper_rule", "val_loss_at_train_temperature",
                    "val_verified_acc")  # fmt: skip
MARGIN_EVERY = 10  # steps between recomputations of the margin loss's certified constants
VERIFIED_EPS = 36 / 255  # ℓ2 radius of val_verified_acc: CIFAR-10's standard benchmark radius


def _stop_if_broken(record: dict, step: int) -> None:
    """Raise ConstraintViolation if a constrained weight broke its method's guarantee (or is
    not finite); violations of methods without a guarantee stay recorded in ``record``."""
    broken = [v for v in record.get("constraint_violations", [])
              if v["guaranteed"] or not math.isfinite(v["norm"])]  # fmt: skip
    if broken:
        v = max(broken, key=_severity)
        raise ConstraintViolation(
            f"step {step}: {v['param']} has norm {v['norm']:.6g} above its cap "
            f"w_max={v['w_max']:g} under {v['constraint']} ({len(broken)} matrices broken); "
            "the constraint's guarantee failed (is the learning rate too large?)"
        )


def _severity(v: dict) -> tuple[bool, float]:
    """Order violations: non-finite weights first, then by norm / w_max."""
    finite = math.isfinite(v["norm"])
    return (not finite, v["norm"] / v["w_max"] if finite else 0.0)


def _lr_schedule(cfg: Config):
    """The config's learning-rate multiplier as a function of the step."""
    kwargs: dict = {"warmup_steps": cfg.warmup_steps}
    if cfg.schedule != "constant":
        kwargs["floor"] = cfg.lr_floor
    if cfg.schedule == "constant_cooldown":
        kwargs["cooldown_frac"] = cfg.cooldown_frac
    return schedule(cfg.schedule, cfg.steps, **kwargs)


def _shown(record: dict, last_eval: dict) -> dict:
    """What the progress display shows: loss, and the latest accuracy and bound."""
    shown = {"loss": record["train_loss"]}
    if last_eval:
        shown["val_acc"] = last_eval["val_acc"]
        if last_eval.get("lipschitz_bound") is not None:
            shown["bound"] = last_eval["lipschitz_bound"]
    return shown
