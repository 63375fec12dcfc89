"""Where a training step's time goes, for a preset's Lipschitz set-up and its baseline.

Each set-up (the ones of :mod:`lipschitz.benchmarks.throughput`) runs alone: warm-up steps,
then ``rounds`` steps under ``torch.profiler``. The phases are ``record_function`` labels:
``batch`` here, ``forward``, ``backward`` and ``optimizer`` in
:func:`~lipschitz.benchmarks.throughput.train_step`; inside the optimizer, ``msign``
(Muon's Newton–Schulz, in :class:`~lipschitz.optim.Muon`) and ``projection`` (the constraint
hook, :mod:`lipschitz.optim.projection`). The rest of the optimizer (momentum, decay, the
update, AdamW) is ``optimizer`` minus those two. Times are per step, CPU wall time of each
labelled range (on CUDA: device time).

Writes ``profile.json`` and ``profile.md``; the ten most expensive operators of the Lipschitz
set-up are in the JSON.
"""

from __future__ import annotations

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from lipschitz.benchmarks import write_results
from lipschitz.benchmarks.throughput import VOCAB, preset_parser, setups, train_step
from lipschitz.data.tasks import sample_batch
from lipschitz.nn import build_model
from lipschitz.optim import build_optimizers
from lipschitz.training.runtime import select_device

PHASES = ("batch", "forward", "backward", "optimizer", "msign", "projection")


def _step(cfg, model, optimizers, data: torch.Tensor, gen: torch.Generator, device) -> None:
    with record_function("batch"):
        x, y = sample_batch(data, cfg.batch_size, cfg.seq_len, gen)
        x, y = x.to(device), y.to(device)
    train_step(model, optimizers, x, y, device)  # labels forward, backward, optimizer


def profile_setup(cfg, device: torch.device, rounds: int) -> tuple[dict, list]:
    """ms per step of every phase, and the ten most expensive operators (self time)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, VOCAB).to(device)
    optimizers = build_optimizers(cfg, model)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(VOCAB, (1_000_000,), generator=gen)  # a stand-in token stream
    for _ in range(3):  # warm-up
        _step(cfg, model, optimizers, data, gen, device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            _step(cfg, model, optimizers, data, gen, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    timed = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    ms = {e.key: getattr(e, timed) / 1e3 / rounds for e in events if e.key in PHASES}
    phases = {name: ms.get(name, 0.0) for name in PHASES}
    phases["optimizer_other"] = phases["optimizer"] - phases["msign"] - phases["projection"]
    phases["step"] = sum(phases[k] for k in ("batch", "forward", "backward", "optimizer"))
    self_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted((e for e in events if e.key not in PHASES), key=lambda e: getattr(e, self_time))[
        ::-1
    ][:10]
    top = [{"op": e.key, "ms_per_step": getattr(e, self_time) / 1e3 / rounds} for e in ops]
    return phases, top


def run(name: str = "shakespeare-cpu", overrides: list[str] | None = None, rounds: int = 10):
    configs = setups(name, overrides or [])
    device = select_device(configs["lipschitz"].device)
    torch.set_flush_denormal(True)  # as `lipschitz train` does
    try:
        lip, top = profile_setup(configs["lipschitz"], device, rounds)
        base, _ = profile_setup(configs["baseline"], device, rounds)
    finally:
        torch.set_flush_denormal(False)
    return {
        "preset": name,
        "overrides": overrides or [],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": rounds,
        "ms_per_step": {"lipschitz": lip, "baseline": base},
        "top_ops_lipschitz": top,
    }


def markdown(result: dict) -> str:
    lip, base = result["ms_per_step"]["lipschitz"], result["ms_per_step"]["baseline"]
    rows = [
        ("batch", "batch"),
        ("forward", "forward"),
        ("backward", "backward"),
        ("Newton–Schulz (msign)", "msign"),
        ("projection", "projection"),
        ("rest of the optimizer", "optimizer_other"),
        ("**step**", "step"),
    ]
    lines = [
        f"Preset `{result['preset']}` {' '.join(result['overrides'])}, {result['device']}, "
        f"{result['threads']} threads, torch {result['torch']}, {result['rounds']} profiled "
        "steps per set-up (ms per step; share of the Lipschitz step).",
        "",
        "| phase | Lipschitz (Muon + constraint) | share | baseline (LayerNorm + AdamW) |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        share = 100 * lip[key] / lip["step"] if lip["step"] else 0.0
        lines.append(f"| {label} | {lip[key]:.1f} | {share:.1f}% | {base[key]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = preset_parser("lipschitz bench profile", __doc__, rounds=10).parse_args(argv)
    result = run(args.preset, args.set, args.rounds)
    write_results(args.out, "profile", result, markdown(result))


if __name__ == "__main__":
    main()
