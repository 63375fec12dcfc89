"""The training loop: data, model, optimizer, evaluation, certificates, checkpoints, metrics.

A run directory holds ``config.json``, ``vocab.json``, ``metrics.jsonl`` (one JSON object per
line, flushed as it is written), ``checkpoint.pt`` (written atomically), and at the end
``final.json`` and ``curves.png``. ``train(config, out, resume=True)`` continues from the
checkpoint exactly: model, optimizer, schedule, data-sampling generator and RNG states are all
restored, so the final weights equal those of an uninterrupted run.

Under ``torchrun --nproc_per_node=N -m lipschitz train ...`` the same loop runs on every rank:
each computes the gradient of its slice of the global batch, gradients are averaged, each rank
orthogonalizes and projects only its share of the matrices (``lipschitz.optim.distribute``),
and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz.certify import certify
from lipschitz.config import Config
from lipschitz.constraints import row_rms_cap, svd_cap
from lipschitz.data import shakespeare
from lipschitz.data.images import IMAGE_SHAPES, N_CLASSES
from lipschitz.data.images import LOADERS as IMAGE_LOADERS
from lipschitz.data.tokens import GPT2_VOCAB, TokenShards, resolve_token_dir
from lipschitz.fileio import atomic_write
from lipschitz.nn import BaselineGPT, BaselineMLP, LipschitzGPT, LipschitzMLP, activation_stats
from lipschitz.optim import Muon, constrain, distribute, route_parameters, sync_constraint_state
from lipschitz.schedules import schedule

MODELS = {
    "lipschitz_gpt": LipschitzGPT,
    "baseline_gpt": BaselineGPT,
    "lipschitz_mlp": LipschitzMLP,
    "baseline_mlp": BaselineMLP,
}
CHECKPOINT = "checkpoint.pt"


def select_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_model(cfg: Config, n_outputs: int, n_inputs: int | None = None) -> nn.Module:
    """The config's model: a GPT over ``n_outputs`` tokens, or an MLP n_inputs → n_outputs."""
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {cfg.model!r}")
    if cfg.model.endswith("_mlp"):
        return MODELS[cfg.model](
            in_features=n_inputs, hidden=cfg.d_model, out_features=n_outputs, n_layers=cfg.n_layer
        )
    kwargs = dict(
        vocab_size=n_outputs,
        d_model=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        seq_len=cfg.seq_len,
        attn_scale=cfg.attn_scale,
    )
    if cfg.model == "lipschitz_gpt":
        kwargs["final_scale"] = cfg.final_scale
        kwargs["residual"] = cfg.residual
        kwargs["attn_out_mult"] = cfg.attn_out_mult
        kwargs["pos_bias"] = cfg.pos_bias
        kwargs["alpha"] = cfg.residual_alpha
    return MODELS[cfg.model](**kwargs)


def build_optimizers(cfg: Config, model: nn.Module) -> list[torch.optim.Optimizer]:
    """Muon (matrices) plus AdamW (vectors, if any), or AdamW for everything, with the run's
    constraint attached to every hidden matrix and the head, and a row-RMS cap on embeddings."""
    lipschitz_model = cfg.model == "lipschitz_gpt"
    blocks_mass = cfg.blocks_mass if cfg.optimizer == "muon" else None
    unit = cfg.target_norm_scalars == "unit"
    groups = route_parameters(model, blocks_mass=blocks_mass, unit_scalars=unit)
    head_w_max = cfg.w_max if cfg.head_w_max is None else cfg.head_w_max
    for group in groups:
        role = group["role"]
        if role in ("hidden", "head") and cfg.constraint != "none":
            group["constraint"] = cfg.constraint
            group["w_max"] = head_w_max if role == "head" else cfg.w_max
            if cfg.constraint == "spectral_weight_decay":
                group["constraint_kwargs"] = {"spectral_decay": cfg.spectral_decay}
        elif role == "embedding" and lipschitz_model:
            group["constraint"] = "row_rms_cap"
            group["w_max"] = cfg.embed_w_max
        if role == "head" and cfg.head_lr is not None:
            group["lr"] = cfg.head_lr
        if role == "embedding" and cfg.embed_lr is not None:
            group["lr"] = cfg.embed_lr
    if cfg.optimizer == "muon":
        to_adamw = ("vector", "embedding") if cfg.embed_optimizer == "adamw" else ("vector",)
        matrices = [g for g in groups if g["role"] not in to_adamw]
        others = [{k: v for k, v in g.items() if k != "rule"} for g in groups
                  if g["role"] in to_adamw]  # fmt: skip
        muon = Muon(
            matrices,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            momentum_warmup_steps=cfg.momentum_warmup_steps,
            momentum_start=cfg.momentum_start,
            coefficients=cfg.coefficients,
            ns_dtype=getattr(torch, cfg.ns_dtype),
            weight_decay=cfg.weight_decay,
        )
        if not others:
            return [muon]
        for group in others:
            group.pop("target_norm")
            if group["role"] == "vector":  # e.g. LayerNorm gains, at an Adam-sized step
                group["lr"] = cfg.lr * 0.01 if cfg.vector_lr is None else cfg.vector_lr
        adamw = torch.optim.AdamW(others, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=0.0)
        return [muon, constrain(adamw)]
    if cfg.optimizer == "adamw":
        for group in groups:
            group.pop("rule", None)
            # the paper's decay λ·η·tn: torch's AdamW decays by λ·η, so fold tn into λ
            decays = group["role"] in ("hidden", "head")
            group["weight_decay"] = cfg.weight_decay * group["target_norm"] if decays else 0.0
            group.pop("target_norm")
        adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas)
        return [constrain(adamw)]
    raise ValueError(f"optimizer must be 'muon' or 'adamw', got {cfg.optimizer!r}")


@torch.no_grad()
def start_inside_constraints(optimizers: list[torch.optim.Optimizer]) -> None:
    """Move every constrained initial weight into its ball (exactly, by SVD or row scaling).

    Needed because the soft cap only absorbs each step: a weight that starts outside its ball
    (e.g. the norm-1 orthogonal init with w_max < 1) would never be pulled back in.
    """
    for opt in optimizers:
        for group in opt.param_groups:
            name = group.get("constraint", "none")
            if name in ("none", "spectral_weight_decay"):
                continue
            cap = row_rms_cap if name == "row_rms_cap" else svd_cap
            for p in group["params"]:
                p.copy_(cap(p, w_max=group["w_max"]))


def windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Windows at ``starts``: inputs x (B, T) and their next-token targets y (B, T)."""
    w = data[starts[:, None] + torch.arange(seq_len + 1)]  # (B, T + 1)
    return w[:, :-1], w[:, 1:]


def sample_batch(
    data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows: x (B, T) and the next-token targets y (B, T)."""
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    return windows(data, starts, seq_len)


def eval_windows(n_tokens: int, seq_len: int, protocol: str, batch_size: int) -> Tensor:
    """Start offsets of the validation windows.

    ``full``: every non-overlapping window of the whole validation split — each position is
    predicted once. ``paper``: the released code's protocol, windows at every offset (stride 1)
    from 0 to batch_size·20 − 1 — only the first ~1.5K characters of the split at batch 64.
    """
    if protocol == "full":
        return torch.arange(0, n_tokens - seq_len, seq_len)
    if protocol == "paper":
        return torch.arange(0, min(batch_size * 20, n_tokens - seq_len))
    raise ValueError(f"eval_protocol must be 'full' or 'paper', got {protocol!r}")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def score(
    model: nn.Module, batches, device: torch.device, temperature: float = 1.0
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every target of the (x, y) batches.

    With ``temperature`` τ ≠ 1 (a run's train_temperature) also ``val_loss_at_train_temperature``,
    the cross-entropy of softmax(τ·logits): the probabilities the run was trained to give.
    Under torchrun every rank passes its share of the batches and gets the totals of all.
    """
    was_training = model.training
    model.eval()
    total_loss, tempered_loss, correct, count = 0.0, 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        logits = logits.float().flatten(0, -2)  # (N, classes)
        y = y.flatten()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        tempered_loss += F.cross_entropy(logits * temperature, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    if rank_and_world()[1] > 1:
        sums = [total_loss, tempered_loss, correct, count]
        sums = torch.tensor(sums, dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total_loss, tempered_loss, correct, count = sums.tolist()
    result = {"val_loss": total_loss / count, "val_acc": correct / count}
    if temperature != 1.0:
        result["val_loss_at_train_temperature"] = tempered_loss / count
    return result


def evaluate(
    model: nn.Module,
    data: Tensor,
    seq_len: int,
    starts: Tensor,
    device: torch.device,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Mean cross-entropy and next-token accuracy over every position of the given windows
    (under torchrun each rank scores every world-size-th window)."""
    rank, world = rank_and_world()
    batches = (windows(data, chunk, seq_len) for chunk in starts[rank::world].split(batch_size))
    return score(model, batches, device, temperature)


class TextTask:
    """Next-character prediction on Tiny Shakespeare: windows of seq_len characters."""

    def __init__(self, cfg: Config) -> None:
        self.corpus = shakespeare.load(cfg.data_dir)
        self.seq_len = cfg.seq_len
        self.protocol, self.batch_size = cfg.eval_protocol, cfg.batch_size
        self.temperature = cfg.train_temperature
        self.vocab = self.corpus.chars
        self.n_outputs, self.n_inputs, self.tokens_per_example = len(self.vocab), None, cfg.seq_len
        self.source = self.corpus.source

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return sample_batch(self.corpus.train, n, self.seq_len, generator)

    def evaluate(
        self, model: nn.Module, device: torch.device, protocol: str | None = None
    ) -> dict[str, float]:
        """Validation loss and accuracy under ``protocol`` (default: the run's eval_protocol)."""
        n_val = len(self.corpus.val)
        starts = eval_windows(n_val, self.seq_len, protocol or self.protocol, self.batch_size)
        return evaluate(
            model, self.corpus.val, self.seq_len, starts, device, temperature=self.temperature
        )

    def probe(self, device: torch.device) -> Tensor:
        return self.corpus.val[: self.seq_len].to(device)[None]  # (1, T)


class ImageTask:
    """Image classification (CIFAR-10, MNIST): flattened pixels in [0, 1], 10 classes."""

    def __init__(self, cfg: Config) -> None:
        self.data = IMAGE_LOADERS[cfg.dataset](cfg.data_dir)
        self.vocab = None
        self.n_outputs, self.n_inputs = self.data.n_classes, self.data.n_features
        self.tokens_per_example = 1
        self.source = cfg.dataset
        self.temperature = cfg.train_temperature

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.data.y_train), (n,), generator=generator)
        return self.data.x_train[idx], self.data.y_train[idx]

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Cross-entropy and accuracy over the whole test split."""
        rank, world = rank_and_world()
        batches = zip(self.data.x_test.split(1000), self.data.y_test.split(1000), strict=True)
        return score(model, list(batches)[rank::world], device, self.temperature)

    def probe(self, device: torch.device) -> Tensor:
        return self.data.x_test[:256].to(device)


class TokenTask:
    """Next-token prediction on GPT-2 token shards (``lipschitz prepare``, FineWeb10B).

    Training windows start anywhere in the concatenated train shards (read through memmaps,
    never loaded whole). Validation uses non-overlapping windows of the val shards, each
    position predicted once: all of them, or ``val_tokens // seq_len`` windows spread evenly
    over the split.
    """

    eval_batch_tokens = 8192  # tokens per evaluation batch (logits are batch × vocab floats)

    def __init__(self, cfg: Config) -> None:
        folder = resolve_token_dir(cfg.token_dir, cfg.data_dir)
        self.train, self.val = TokenShards.open(folder, "train"), TokenShards.open(folder, "val")
        self.seq_len = cfg.seq_len
        self.temperature = cfg.train_temperature
        self.n_train_starts = int(self.train.n_starts(cfg.seq_len + 1).sum())
        if self.n_train_starts == 0:
            raise ValueError(f"{folder}: no train shard holds a window of seq_len+1 tokens")
        # non-overlapping validation windows, as indices into val.windows' start numbering
        counts = self.val.n_starts(cfg.seq_len + 1)
        bases = np.cumsum(counts) - counts
        starts = np.concatenate(
            [b + np.arange(0, c, cfg.seq_len) for b, c in zip(bases, counts, strict=True)]
        )
        if len(starts) == 0:
            raise ValueError(f"{folder}: no val shard holds a window of seq_len+1 tokens")
        if cfg.val_tokens is not None and cfg.val_tokens // cfg.seq_len < len(starts):
            n = cfg.val_tokens // cfg.seq_len
            starts = starts[np.arange(n) * len(starts) // n]  # evenly spread over the split
        self.val_starts = starts
        self.vocab, self.n_inputs, self.tokens_per_example = None, None, cfg.seq_len
        self.n_outputs = cfg.vocab_size or GPT2_VOCAB
        self.source = str(folder)

    def _windows(self, shards: TokenShards, starts: np.ndarray) -> tuple[Tensor, Tensor]:
        w = torch.from_numpy(shards.windows(starts, self.seq_len + 1))  # (B, T + 1)
        return w[:, :-1], w[:, 1:]

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        starts = torch.randint(self.n_train_starts, (n,), generator=generator)
        return self._windows(self.train, starts.numpy())

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        rank, world = rank_and_world()
        mine = self.val_starts[rank::world]
        per_batch = max(1, self.eval_batch_tokens // self.seq_len)
        chunks = (mine[i : i + per_batch] for i in range(0, len(mine), per_batch))
        return score(
            model, (self._windows(self.val, c) for c in chunks), device, self.temperature
        )

    def probe(self, device: torch.device) -> Tensor:
        return self._windows(self.val, self.val_starts[:1])[0].to(device)  # (1, T)


def make_task(cfg: Config) -> TextTask | TokenTask | ImageTask:
    if cfg.dataset == "shakespeare":
        return TextTask(cfg)
    return TokenTask(cfg) if cfg.dataset == "tokens" else ImageTask(cfg)


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash leaves either the old checkpoint or the new one, never half."""
    with atomic_write(path) as f:
        torch.save(state, f)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weight_norms(cert) -> dict[str, float]:
    return {layer["name"]: layer["rms_operator_norm"] for layer in cert.layers}


class Progress:
    """A tqdm bar on a terminal; plain log lines every ``every`` steps otherwise; silent when
    not ``enabled`` (ranks other than 0)."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool = True) -> None:
        self.total, self.every, self.start = total, every, time.time()
        self.initial, self.enabled = initial, enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, info: dict) -> None:
        if not self.enabled:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown, refresh=False)
        elif step % self.every == 0 or step == self.total:
            done = step - self.initial
            eta = (time.time() - self.start) / max(done, 1) * (self.total - step)
            items = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"step {step}/{self.total} {items} eta={eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def init_distributed(device: str) -> bool:
    """Join torchrun's process group (NCCL on CUDA, else gloo) if WORLD_SIZE > 1 and it is not
    joined yet; returns whether it was started here (and must be destroyed by the caller)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


@torch.no_grad()
def all_reduce_gradients(model: nn.Module, loss: float) -> float:
    """Average every gradient (and the loss) over the ranks, in one flat all-reduce; returns
    the mean loss. Parameters without a gradient are skipped (the same ones on every rank)."""
    world = dist.get_world_size()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [grads[0].new_tensor([loss]).float()])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1].item()


def train(cfg: Config, out: str | Path, resume: bool = False) -> dict:
    """Train ``cfg`` into the run directory ``out``; returns the final metrics (final.json).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank runs this: ``batch_size`` is the global
    batch, each rank computes the gradient of its slice of it, gradients are averaged, and the
    optimizers split their matrix work across ranks (:func:`lipschitz.optim.distribute`). The
    result equals a single-process run with the same global batch. Only rank 0 writes files.

    Denormal floats (e.g. in the momentum of dead units) slow CPU matmuls ~5×, so they are
    flushed to zero while training; the process-wide setting is restored afterwards.
    """
    started = init_distributed(cfg.device)
    torch.set_flush_denormal(True)
    try:
        return _train(cfg, out, resume)
    finally:
        torch.set_flush_denormal(False)
        if started:
            dist.destroy_process_group()


def _train(cfg: Config, out: str | Path, resume: bool) -> dict:
    rank, world = rank_and_world()
    main = rank == 0  # the only rank that writes files
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        data_dir = cfg.data_dir  # the caller's data directory wins: the data may have moved
        cfg = Config.load(out / "config.json")
        cfg = dataclasses.replace(cfg, data_dir=data_dir or cfg.data_dir)
    elif ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")
    if cfg.batch_size % (cfg.grad_accum * world) != 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by grad_accum={cfg.grad_accum} "
            f"× the number of processes ({world})"
        )
    device = select_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    if main:
        out.mkdir(parents=True, exist_ok=True)

    task = make_task(cfg)
    if resume and task.vocab is not None:
        if json.loads((out / "vocab.json").read_text()) != task.vocab:
            raise ValueError(f"--resume: the data's vocabulary differs from {out / 'vocab.json'}")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task.n_outputs, task.n_inputs).to(device)
    optimizers = build_optimizers(cfg, model)
    start_inside_constraints(optimizers)
    if world > 1:
        for p in model.parameters():  # identical by seeding; made bit-identical here
            dist.broadcast(p.detach(), 0)
        for opt in optimizers:
            if getattr(opt, "_lipschitz_constrained", False):
                distribute(opt)
    sched_kw: dict = {"warmup_steps": cfg.warmup_steps}
    if cfg.schedule != "constant":
        sched_kw["floor"] = cfg.lr_floor
    if cfg.schedule == "constant_cooldown":
        sched_kw["cooldown_frac"] = cfg.cooldown_frac
    lr_lambda = schedule(cfg.schedule, cfg.steps, **sched_kw)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) for opt in optimizers]
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same global batches everywhere
    forward = torch.compile(model) if cfg.compile else model
    step, elapsed, train_time = 0, 0.0, 0.0

    metrics_path = out / "metrics.jsonl"
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        for sched, s in zip(schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(s)
        batch_gen.set_state(state["batch_generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step, elapsed, train_time = state["step"], state["elapsed_s"], state["train_time_s"]
        if main:  # keep the metrics up to the checkpoint; later lines are redone
            kept = [m for m in _read_metrics(metrics_path) if m["step"] <= step]
            metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    elif main:
        (out / "config.json").write_text(cfg.to_json())
        if task.vocab is not None:
            (out / "vocab.json").write_text(json.dumps(task.vocab))
        metrics_path.write_text("")

    tokens_per_step = cfg.batch_size * task.tokens_per_example
    micro_batch = cfg.batch_size // cfg.grad_accum  # global sequences per micro-step
    local = micro_batch // world  # this rank's slice of each micro-batch
    mine = slice(rank * local, (rank + 1) * local)

    def checkpoint() -> None:
        for opt in optimizers:
            sync_constraint_state(opt)  # every rank takes part
        if not main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
                "batch_generator": batch_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                "step": step,
                "elapsed_s": elapsed + time.time() - t_start,
                "train_time_s": train_time,
                "world_size": world,
            },
        )

    def eval_record() -> dict:
        record = task.evaluate(model, device)  # every rank scores its share
        if main:
            cert = certify(model) if cfg.model != "baseline_gpt" else None  # LayerNorm: no bound
            record["lipschitz_bound"] = cert.lipschitz if cert is not None else None
            if cfg.model == "lipschitz_gpt":  # the paper's formula (App. B), to compare with it
                record["lipschitz_bound_paper_rule"] = certify(model, rule="paper").lipschitz
            if cert is not None:
                if cert.lipschitz_l2 is not None:
                    record["lipschitz_bound_l2"] = cert.lipschitz_l2
                record["weight_norms"] = _weight_norms(cert)
            model.eval()
            with torch.no_grad():
                record["activations"] = activation_stats(model, task.probe(device))
            model.train()
        if world > 1:  # rank 0's certificate, so that every rank returns the same metrics
            shared = [record]
            dist.broadcast_object_list(shared, src=0)
            record = shared[0]
        return record

    t_start = time.time()
    progress = Progress(cfg.steps, step, cfg.log_every, enabled=main)
    last: dict = {}
    model.train()
    with open(metrics_path, "a") if main else contextlib.nullcontext() as metrics:
        while step < cfg.steps:
            t0 = time.time()
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                x, y = task.batch(micro_batch, batch_gen)  # the global micro-batch ...
                x, y = x[mine].to(device), y[mine].to(device)  # ... and this rank's slice
                with autocast(device):
                    logits = forward(x)
                # train_temperature τ: the loss sees τ·logits (a margin-seeking loss, as in
                # Lipschitz classifiers); the model, its bound and the evaluation do not
                logits = logits.float().flatten(0, -2) * cfg.train_temperature
                loss = F.cross_entropy(logits, y.flatten())
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            train_loss = loss_sum / cfg.grad_accum
            if world > 1:
                train_loss = all_reduce_gradients(model, train_loss)
            if not math.isfinite(train_loss):
                progress.close()
                raise FloatingPointError(
                    f"training loss became {train_loss} at step {step + 1}; the last good "
                    f"checkpoint is {ckpt_path if ckpt_path.exists() else 'none'}"
                )
            lr = optimizers[0].param_groups[0]["lr"]
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            for sched in schedulers:
                sched.step()
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()  # count this step's GPU work in this step's time
            train_time += time.time() - t0
            record = {"step": step, "train_loss": train_loss, "lr": lr,
                      "tokens_seen": step * tokens_per_step}  # fmt: skip
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record.update(eval_record())
                last = record
            if main and (step % cfg.log_every == 0 or "val_loss" in record):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            shown = {"loss": train_loss}
            if last:
                shown["val_acc"] = last["val_acc"]
                if last["lipschitz_bound"] is not None:
                    shown["bound"] = last["lipschitz_bound"]
            progress.update(step, shown)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
    progress.close()
    if not last:  # resumed a finished run: evaluate what is there
        last = eval_record()
    counts = {k: sum(_work(opt)[k] for opt in optimizers) for k in ("msign", "projections")}
    work = [counts]
    if world > 1:
        work = [None] * world
        dist.all_gather_object(work, counts)
    final = {
        "val_loss": last["val_loss"],
        "val_acc": last["val_acc"],
        "lipschitz_bound": last["lipschitz_bound"],
        "lipschitz_bound_l2": last.get("lipschitz_bound_l2"),
        "lipschitz_bound_paper_rule": last.get("lipschitz_bound_paper_rule"),
        "val_loss_at_train_temperature": last.get("val_loss_at_train_temperature"),
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "wall_time_s": elapsed + time.time() - t_start,
        "train_time_s": train_time,
        "tokens_per_s": step * tokens_per_step / max(train_time, 1e-9),
        "eval_protocol": cfg.eval_protocol,
        "data_source": task.source,
        "device": str(device),
        "world_size": world,
        # matrices orthogonalized / projected by each rank since this process started
        "work_per_rank": work,
    }
    if isinstance(task, TextTask) and cfg.eval_protocol == "paper":  # the full split as well
        full = task.evaluate(model, device, protocol="full")
        final.update(val_loss_full=full["val_loss"], val_acc_full=full["val_acc"])
    if main:
        (out / "final.json").write_text(json.dumps(final, indent=2))
        plot_run(out)
    if world > 1:
        dist.barrier()  # nobody leaves while rank 0 still writes
    return final


def _work(opt: torch.optim.Optimizer) -> dict[str, int]:
    return getattr(opt, "lipschitz_work", {"msign": 0, "projections": 0})


def plot_run(out: str | Path) -> Path:
    """curves.png: losses, validation accuracy and certified bound against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = _read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train")
    axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0].legend()
    axes[1].plot([r["step"] for r in evals], [r["val_acc"] for r in evals], "o-")
    axes[1].set(xlabel="step", ylabel="accuracy", title="validation accuracy")
    bounded = [r for r in evals if r["lipschitz_bound"] is not None]
    if bounded:
        axes[2].semilogy([r["step"] for r in bounded], [r["lipschitz_bound"] for r in bounded])
    axes[2].set(xlabel="step", ylabel="bound", title="certified Lipschitz bound")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_run(out: str | Path) -> tuple[nn.Module, Config]:
    """The trained model of a run directory (eval mode, on CPU) and its config."""
    out = Path(out)
    cfg = Config.load(out / "config.json")
    if cfg.dataset == "shakespeare":
        model = build_model(cfg, len(json.loads((out / "vocab.json").read_text())))
    elif cfg.dataset == "tokens":
        model = build_model(cfg, cfg.vocab_size or GPT2_VOCAB)
    else:
        model = build_model(cfg, N_CLASSES, math.prod(IMAGE_SHAPES[cfg.dataset]))
    state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: Tensor,
    n_tokens: int,
    seq_len: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Append ``n_tokens`` sampled tokens to idx (B, T); temperature 0 is greedy."""
    for _ in range(n_tokens):
        logits = model(idx[:, -seq_len:])[:, -1].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
