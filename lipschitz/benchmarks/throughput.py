"""Training throughput: the Lipschitz transformer against the baseline of the same size.

Four set-ups of one preset's shape are timed interleaved, one training step (forward, backward,
optimizer step, projection) of each per round, so that machine noise hits all alike:

- ``lipschitz``: LipschitzGPT + Muon + the preset's constraint (what `lipschitz train` runs);
- ``lipschitz-unconstrained``: the same without the projection (its cost is the difference);
- ``lipschitz-adamw``: LipschitzGPT + AdamW, no constraint (the cost of Muon itself);
- ``baseline``: BaselineGPT (LayerNorm) + AdamW.

Prints tokens per second and ratios; writes ``throughput.json`` and ``throughput.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from lipschitz.benchmarks import write_results
from lipschitz.config import apply_overrides
from lipschitz.nn import build_model
from lipschitz.optim import build_optimizers
from lipschitz.presets import preset
from lipschitz.training.runtime import autocast, select_device

VOCAB = 65


def setups(name: str, overrides: list[str]) -> dict:
    cfg = apply_overrides(preset(name), overrides)
    return {
        "lipschitz": cfg,
        "lipschitz-unconstrained": dataclasses.replace(cfg, constraint="none"),
        "lipschitz-adamw": dataclasses.replace(cfg, optimizer="adamw", constraint="none", lr=3e-3),
        "baseline": dataclasses.replace(
            cfg, model="baseline_gpt", optimizer="adamw", constraint="none", lr=3e-3
        ),
    }


def run(
    name: str = "shakespeare-cpu", overrides: list[str] | None = None, rounds: int = 20
) -> dict:
    """Time the four set-ups (denormals flushed, as `lipschitz train` does)."""
    torch.set_flush_denormal(True)
    try:
        return _run(name, overrides, rounds)
    finally:
        torch.set_flush_denormal(False)


def _run(name: str, overrides: list[str] | None, rounds: int) -> dict:
    configs = setups(name, overrides or [])
    device = select_device(configs["lipschitz"].device)
    gen = torch.Generator().manual_seed(0)
    states = {}
    for key, cfg in configs.items():
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, VOCAB).to(device)
        states[key] = (cfg, model, build_optimizers(cfg, model))
    times: dict[str, list[float]] = {key: [] for key in configs}
    for r in range(rounds + 2):  # two warm-up rounds
        for key, (cfg, model, optimizers) in states.items():
            x = torch.randint(VOCAB, (cfg.batch_size, cfg.seq_len + 1), generator=gen).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast(device):
                logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[key].append(time.perf_counter() - t0)
    cfg = configs["lipschitz"]
    tokens = cfg.batch_size * cfg.seq_len
    step_ms = {key: 1e3 * statistics.median(ts) for key, ts in times.items()}
    return {
        "preset": name,
        "overrides": overrides or [],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokens_per_step": tokens,
        "rounds": rounds,
        "step_ms": step_ms,
        "tokens_per_s": {key: tokens / (ms / 1e3) for key, ms in step_ms.items()},
        "constraint_share_of_step": 1 - step_ms["lipschitz-unconstrained"] / step_ms["lipschitz"],
        "lipschitz_over_baseline_tokens_per_s": step_ms["baseline"] / step_ms["lipschitz"],
    }


def markdown(result: dict) -> str:
    lines = [
        f"Preset `{result['preset']}` {' '.join(result['overrides'])}, {result['device']}, "
        f"{result['threads']} threads, torch {result['torch']}, "
        f"{result['tokens_per_step']} tokens per step, median of {result['rounds']} "
        "interleaved steps.",
        "",
        "| set-up | ms / step | tokens / s |",
        "|---|---|---|",
    ]
    for key, ms in result["step_ms"].items():
        lines.append(f"| {key} | {ms:.1f} | {result['tokens_per_s'][key]:.0f} |")
    lines += [
        "",
        f"Projection share of the Lipschitz step: {100 * result['constraint_share_of_step']:.1f}%. "
        f"Lipschitz tokens/s ÷ baseline tokens/s: "
        f"{result['lipschitz_over_baseline_tokens_per_s']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lipschitz bench throughput", description=__doc__)
    parser.add_argument("--preset", default="shakespeare-cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)
    result = run(args.preset, args.set, args.rounds)
    write_results(args.out, "throughput", result, markdown(result))


if __name__ == "__main__":
    main()
