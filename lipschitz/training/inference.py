"""Using a model: score it on a task's validation batches, load a trained one, sample from it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz.choices import check_choices
from lipschitz.config import Config
from lipschitz.data.recall import IGNORE
from lipschitz.data.tasks import model_sizes, text_codec
from lipschitz.nn import build_model
from lipschitz.training.rundir import RunDir, first_line
from lipschitz.training.runtime import autocast, rank_and_world


@torch.no_grad()
def score(
    model: nn.Module, batches: Iterable, device: torch.device, temperature: float = 1.0
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every target of the (x, y) batches (targets equal
    to ``IGNORE``, -100, are skipped).

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
        scored = y != IGNORE  # a recall run scores its queries only
        correct += ((logits.argmax(-1) == y) & scored).sum().item()
        count += scored.sum().item()
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
    task,
    device: torch.device,
    temperature: float = 1.0,
    protocol: str | None = None,
) -> dict[str, float]:
    """Validation loss and accuracy of ``model`` on ``task`` (a :mod:`lipschitz.data.tasks`
    task); under torchrun every rank scores its share and all get the totals."""
    rank, world = rank_and_world()
    return score(model, task.val_batches(rank, world, protocol), device, temperature)


def _check_sampling(n_tokens: int, temperature: float) -> None:
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"the number of tokens must be an int >= 0, got {n_tokens!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: Tensor,
    n_tokens: int,
    seq_len: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Append ``n_tokens`` sampled tokens to idx (B, T ≥ 1); temperature 0 is greedy."""
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate: the prompt must be (B, T) with T ≥ 1, got {tuple(idx.shape)}")
    _check_sampling(n_tokens, temperature)
    for _ in range(n_tokens):
        logits = model(idx[:, -seq_len:])[:, -1].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def load_run(out: str | Path) -> tuple[nn.Module, Config]:
    """The trained model of a run directory (eval mode, on CPU) and its config; a missing,
    foreign, truncated or corrupted checkpoint is an error naming the file."""
    run = RunDir(out)
    if not (run / run.CONFIG).exists():
        raise FileNotFoundError(f"{run.path}: not a lipschitz run directory (no {run.CONFIG})")
    cfg = run.config()
    check_choices(cfg)
    if run.is_run():
        marker = run.marker()
        n_outputs, n_inputs = marker["n_outputs"], marker["n_inputs"]
    else:  # a run directory written before run.json existed
        n_outputs, n_inputs = model_sizes(cfg, run.vocab())
    model = build_model(cfg, n_outputs, n_inputs)
    load_weights(model, run.load_checkpoint()["model"], run / run.CHECKPOINT)
    return model.eval(), cfg


def load_weights(model: nn.Module, weights, source: Path) -> None:
    """``model.load_state_dict(weights)``; weights that do not fit are an error naming source."""
    try:
        model.load_state_dict(weights)
    except (KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{source}: its weights do not fit the run's model: {first_line(err)}"
        ) from None


def sample_text(
    out: str | Path,
    prompt: str,
    n_tokens: int,
    temperature: float = 0.8,
    seed: int = 0,
    data_dir: str | None = None,
) -> str:
    """Prompt plus ``n_tokens`` sampled continuations from the run in ``out``. ``temperature``
    is relative to the probabilities the run was trained to give, softmax(τ·logits)."""
    if not prompt:
        raise ValueError("the prompt must not be empty")
    _check_sampling(n_tokens, temperature)  # before anything is loaded
    model, cfg = load_run(out)
    vocab = RunDir(out).vocab()
    if vocab is not None and len(vocab) != model.head.out_features:
        raise ValueError(f"{RunDir(out) / RunDir.VOCAB}: {len(vocab)} characters for a model "
                         f"of {model.head.out_features} outputs")  # fmt: skip
    encode, decode = text_codec(cfg, vocab, data_dir)
    idx = torch.tensor([encode(prompt)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    tau = cfg.train_temperature
    return decode(generate(model, idx, n_tokens, cfg.seq_len, temperature / tau, gen)[0].tolist())
