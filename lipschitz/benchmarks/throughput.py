"""Training throughput: the Lipschitz transformer against the baseline of the same size.

Four set-ups of one preset's shape are timed interleaved, one training step (forward, backward,
optimizer step, projection) of each per round, so that machine noise hits all alike:

- ``lipschitz``: LipschitzGPT + Muon + the preset's constraint (what `lipschitz train` runs);
- ``lipschitz-unconstrained``: the same without the projection (its cost is the difference);
- ``lipschitz-adamw``: LipschitzGPT + AdamW, no constraint (the cost of Muon itself);
- ``baseline``: BaselineGPT (LayerNorm, standard q·kᵀ/√d_head attention) + AdamW.

Prints tokens per second and ratios; writes ``throughput.json`` and ``throughput.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function

from lipschitz.benchmarks import write_results
from lipschitz.config import Config, apply_overrides
from lipschitz.nn import build_model
from lipschitz.nn.build import MIXERS
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
        # nanoGPT's attention (q·kᵀ/√d_head), whatever the preset's Lipschitz attention is
        "baseline": dataclasses.replace(
            cfg,
            model="baseline_gpt",
            optimizer="adamw",
            constraint="none",
            lr=3e-3,
            attn_scale=1.0,
            mixer="attention",
            **{key: getattr(Config, key) for key in MIXERS["lookup"].keys},
        ),
    }


def train_step(model, optimizers, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    """One step on inputs x and targets y (B, T): forward, backward, every optimizer's step,
    each under a ``record_function`` label that :mod:`lipschitz.benchmarks.profile` reads."""
    with record_function("forward"):
        with autocast(device):
            logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


def preset_parser(prog: str, description: str | None, rounds: int) -> argparse.ArgumentParser:
    """The options of a benchmark of one preset's set-ups: --preset, --set, --rounds, --out."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", default="shakespeare-cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", default="benchmarks/out")
    return parser


def peak_memory(name: str, overrides: list[str], key: str, steps: int = 3) -> dict:
    """Peak memory of one set-up training alone in this (fresh) process: peak RSS on a CPU
    (with the peak before the model was built, which is Python + torch), or
    ``torch.cuda.max_memory_allocated`` on CUDA."""
    cfg = setups(name, overrides)[key]
    device = select_device(cfg.device)
    before = _peak_rss()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, VOCAB).to(device)
    optimizers = build_optimizers(cfg, model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(VOCAB, (cfg.batch_size, cfg.seq_len + 1), generator=gen).to(device)
        train_step(model, optimizers, x[:, :-1], x[:, 1:], device)
    if device.type == "cuda":
        return {"cuda_max_allocated": torch.cuda.max_memory_allocated(device)}
    return {"peak_rss": _peak_rss(), "rss_before_model": before}


def _peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM on Linux (``ru_maxrss`` would include
    the parent's memory at the fork that started this process), else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    scale = 1 if sys.platform == "darwin" else 1024  # macOS: bytes; Linux, BSD: KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _memory_in_fresh_processes(name: str, overrides: list[str], keys) -> dict:
    """peak_memory of every set-up, each in its own Python process (peak RSS is per process)."""
    out = {}
    for key in keys:
        args = [sys.executable, "-m", "lipschitz.benchmarks.throughput", "--preset", name,
                "--memory-of", key] + [f"--set={o}" for o in overrides]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        out[key] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


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
            train_step(model, optimizers, x[:, :-1], x[:, 1:], device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[key].append(time.perf_counter() - t0)
    cfg = configs["lipschitz"]
    tokens = cfg.batch_size * cfg.seq_len
    step_ms = {key: 1e3 * statistics.median(ts) for key, ts in times.items()}
    memory = _memory_in_fresh_processes(name, overrides or [], ("lipschitz", "baseline"))
    peak = {k: m.get("cuda_max_allocated", m.get("peak_rss")) for k, m in memory.items()}
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
        "memory": memory,
        "lipschitz_over_baseline_peak_memory": peak["lipschitz"] / peak["baseline"],
        "lipschitz_over_baseline_memory_above_import": _above_import(memory),
    }


def _above_import(memory: dict) -> float | None:
    """On a CPU: (peak RSS − RSS before the model), Lipschitz ÷ baseline: the training's own
    memory without Python and torch."""
    if "peak_rss" not in memory["lipschitz"]:
        return None
    own = {k: max(m["peak_rss"] - m["rss_before_model"], 1) for k, m in memory.items()}
    return own["lipschitz"] / own["baseline"]


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
        "",
        "| set-up (alone, in a fresh process) | peak memory |",
        "|---|---|",
    ]
    for key, m in result["memory"].items():
        if "cuda_max_allocated" in m:
            lines.append(f"| {key} | {m['cuda_max_allocated'] / 2**20:.0f} MiB allocated |")
        else:
            lines.append(
                f"| {key} | {m['peak_rss'] / 2**20:.0f} MiB peak RSS "
                f"({m['rss_before_model'] / 2**20:.0f} MiB before the model) |"
            )
    above = result["lipschitz_over_baseline_memory_above_import"]
    lines.append(
        f"\nPeak memory, Lipschitz ÷ baseline: {result['lipschitz_over_baseline_peak_memory']:.2f}"
        + ("." if above is None else f" ({above:.2f} above the memory before the model).")
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = preset_parser("lipschitz bench throughput", __doc__, rounds=20)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one set-up's memory
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps(peak_memory(args.preset, args.set, args.memory_of)))
        return
    result = run(args.preset, args.set, args.rounds)
    write_results(args.out, "throughput", result, markdown(result))


if __name__ == "__main__":
    main()
