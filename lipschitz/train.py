"""The training loop: data, model, optimizer, evaluation, certificates, checkpoints, metrics.

A run directory holds ``config.json``, ``vocab.json``, ``metrics.jsonl`` (one JSON object per
line, flushed as it is written), ``checkpoint.pt`` (written atomically), and at the end
``final.json`` and ``curves.png``. ``train(config, out, resume=True)`` continues from the
checkpoint exactly: model, optimizer, schedule, data-sampling generator and RNG states are all
restored, so the final weights equal those of an uninterrupted run.
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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz.certify import certify
from lipschitz.config import Config
from lipschitz.constraints import row_rms_cap, svd_cap
from lipschitz.data import shakespeare
from lipschitz.data.images import LOADERS as IMAGE_LOADERS
from lipschitz.nn import BaselineGPT, BaselineMLP, LipschitzGPT, LipschitzMLP, activation_stats
from lipschitz.optim import Muon, constrain, route_parameters
from lipschitz.schedules import schedule

MODELS = {
    "lipschitz_gpt": LipschitzGPT,
    "baseline_gpt": BaselineGPT,
    "lipschitz_mlp": LipschitzMLP,
    "baseline_mlp": BaselineMLP,
}
IMAGE_SHAPES = {"cifar10": (3072, 10), "mnist": (784, 10)}  # (input features, classes)
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
    return MODELS[cfg.model](**kwargs)


def build_optimizers(cfg: Config, model: nn.Module) -> list[torch.optim.Optimizer]:
    """Muon (matrices) plus AdamW (vectors, if any), or AdamW for everything, with the run's
    constraint attached to every hidden matrix and the head, and a row-RMS cap on embeddings."""
    lipschitz_model = cfg.model == "lipschitz_gpt"
    groups = route_parameters(
        model,
        blocks_mass=cfg.blocks_mass if cfg.optimizer == "muon" else None,
        residual_scale=1 / (2 * cfg.n_layer) if lipschitz_model else 1.0,
        attention_scale=1 / 3 if lipschitz_model else 1.0,
    )
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
    matrices = [g for g in groups if g["role"] != "vector"]
    vectors = [g for g in groups if g["role"] == "vector"]
    if cfg.optimizer == "muon":
        muon = Muon(
            matrices,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            coefficients=cfg.coefficients,
            weight_decay=cfg.weight_decay,
        )
        if not vectors:
            return [muon]
        adamw = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "rule"} for g in vectors],
            lr=cfg.lr * 0.01,  # vectors (e.g. LayerNorm gains) at an Adam-sized step
            betas=cfg.adam_betas,
            weight_decay=0.0,
        )
        return [muon, adamw]
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


@torch.no_grad()
def score(model: nn.Module, batches, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every target of the (x, y) batches."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        logits = logits.float().flatten(0, -2)  # (N, classes)
        y = y.flatten()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    return {"val_loss": total_loss / count, "val_acc": correct / count}


def evaluate(
    model: nn.Module,
    data: Tensor,
    seq_len: int,
    starts: Tensor,
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, float]:
    """Mean cross-entropy and next-token accuracy over every position of the given windows."""
    batches = (windows(data, chunk, seq_len) for chunk in starts.split(batch_size))
    return score(model, batches, device)


class TextTask:
    """Next-character prediction on Tiny Shakespeare: windows of seq_len characters."""

    def __init__(self, cfg: Config) -> None:
        self.corpus = shakespeare.load(cfg.data_dir)
        self.seq_len = cfg.seq_len
        n_val, protocol = len(self.corpus.val), cfg.eval_protocol
        self.starts = eval_windows(n_val, cfg.seq_len, protocol, cfg.batch_size)
        self.vocab = self.corpus.chars
        self.n_outputs, self.n_inputs, self.tokens_per_example = len(self.vocab), None, cfg.seq_len
        self.source = self.corpus.source

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return sample_batch(self.corpus.train, n, self.seq_len, generator)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return evaluate(model, self.corpus.val, self.seq_len, self.starts, device)

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

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.data.y_train), (n,), generator=generator)
        return self.data.x_train[idx], self.data.y_train[idx]

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Cross-entropy and accuracy over the whole test split."""
        batches = zip(self.data.x_test.split(1000), self.data.y_test.split(1000), strict=True)
        return score(model, batches, device)

    def probe(self, device: torch.device) -> Tensor:
        return self.data.x_test[:256].to(device)


def make_task(cfg: Config) -> TextTask | ImageTask:
    return TextTask(cfg) if cfg.dataset == "shakespeare" else ImageTask(cfg)


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash leaves either the old checkpoint or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weight_norms(cert) -> dict[str, float]:
    return {layer["name"]: layer["rms_operator_norm"] for layer in cert.layers}


class Progress:
    """A tqdm bar on a terminal; plain log lines every ``every`` steps otherwise."""

    def __init__(self, total: int, initial: int, every: int) -> None:
        self.total, self.every, self.start = total, every, time.time()
        self.initial = initial
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, info: dict) -> None:
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


def train(cfg: Config, out: str | Path, resume: bool = False) -> dict:
    """Train ``cfg`` into the run directory ``out``; returns the final metrics (final.json).

    Denormal floats (e.g. in the momentum of dead units) slow CPU matmuls ~5×, so they are
    flushed to zero while training; the process-wide setting is restored afterwards.
    """
    torch.set_flush_denormal(True)
    try:
        return _train(cfg, out, resume)
    finally:
        torch.set_flush_denormal(False)


def _train(cfg: Config, out: str | Path, resume: bool) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NotImplementedError(
            "distributed training (torchrun) is not implemented yet: every rank would train a "
            "full copy and write the same files; run a single process"
        )
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
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.device)

    task = make_task(cfg)
    if resume and task.vocab is not None:
        if json.loads((out / "vocab.json").read_text()) != task.vocab:
            raise ValueError(f"--resume: the data's vocabulary differs from {out / 'vocab.json'}")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task.n_outputs, task.n_inputs).to(device)
    optimizers = build_optimizers(cfg, model)
    start_inside_constraints(optimizers)
    lr_lambda = schedule(cfg.schedule, cfg.steps, warmup_steps=cfg.warmup_steps)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) for opt in optimizers]
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1)
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
        # keep the metrics up to the checkpoint; later lines are redone
        kept = [m for m in _read_metrics(metrics_path) if m["step"] <= step]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    else:
        (out / "config.json").write_text(cfg.to_json())
        if task.vocab is not None:
            (out / "vocab.json").write_text(json.dumps(task.vocab))
        metrics_path.write_text("")

    tokens_per_step = cfg.batch_size * task.tokens_per_example
    micro_batch = cfg.batch_size // cfg.grad_accum
    if micro_batch * cfg.grad_accum != cfg.batch_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by grad_accum={cfg.grad_accum}"
        )

    def checkpoint() -> None:
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
            },
        )

    def eval_record() -> dict:
        record = task.evaluate(model, device)
        cert = certify(model) if cfg.model != "baseline_gpt" else None  # LayerNorm: no bound
        record["lipschitz_bound"] = cert.lipschitz if cert is not None else None  # unbounded
        if cert is not None:
            if cert.lipschitz_l2 is not None:
                record["lipschitz_bound_l2"] = cert.lipschitz_l2
            record["weight_norms"] = _weight_norms(cert)
        model.eval()
        with torch.no_grad():
            record["activations"] = activation_stats(model, task.probe(device))
        model.train()
        return record

    t_start = time.time()
    progress = Progress(cfg.steps, step, cfg.log_every)
    last: dict = {}
    model.train()
    with open(metrics_path, "a") as metrics:
        while step < cfg.steps:
            t0 = time.time()
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                x, y = task.batch(micro_batch, batch_gen)
                x, y = x.to(device), y.to(device)
                with autocast(device):
                    logits = forward(x)
                loss = F.cross_entropy(logits.float().flatten(0, -2), y.flatten())
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            train_loss = loss_sum / cfg.grad_accum
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
            if step % cfg.log_every == 0 or "val_loss" in record:
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
    final = {
        "val_loss": last["val_loss"],
        "val_acc": last["val_acc"],
        "lipschitz_bound": last["lipschitz_bound"],
        "lipschitz_bound_l2": last.get("lipschitz_bound_l2"),
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "wall_time_s": elapsed + time.time() - t_start,
        "train_time_s": train_time,
        "tokens_per_s": step * tokens_per_step / max(train_time, 1e-9),
        "eval_protocol": cfg.eval_protocol,
        "data_source": task.source,
        "device": str(device),
    }
    (out / "final.json").write_text(json.dumps(final, indent=2))
    plot_run(out)
    return final


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
    else:
        n_inputs, n_outputs = IMAGE_SHAPES[cfg.dataset]
        model = build_model(cfg, n_outputs, n_inputs)
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
