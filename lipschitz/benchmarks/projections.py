"""Projection benchmark: speed and accuracy of every weight constraint, side by side.

For each shape, a float32 matrix with RMS→RMS norm 2·w_max is projected by every method.
Methods are timed interleaved (one call of each per round, many rounds) so that machine noise
hits all of them alike, and costs are reported as ratios to one Gram product of the same shape
(the ``min×min`` one: ``WᵀW`` for tall, ``WWᵀ`` for wide) and to ``svd_cap``, measured in the
same run. Writes ``projections.json`` and ``projections.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lipschitz.benchmarks import write_results
from lipschitz.constraints import METHODS, spectral_hard_cap
from lipschitz.linalg import rms_operator_norm

SHAPES = [(256, 256), (1024, 256), (256, 1024), (1024, 1024), (4096, 1024)]
W_MAX = 1.0
# The matrix constraints benchmarked (every method but "none" and the per-row ones).
BENCHED = [c for c in METHODS.values() if c.name != "none" and not c.per_row]
# Whether the method bounds σ_max by construction (lipschitz.constraints.METHODS), and that of
# the hard cap's quintic variant, benchmarked next to its default.
GUARANTEE = {c.name: c.guarantee for c in BENCHED} | {
    "spectral_hard_cap[quintic]": "yes (guarded domain)"
}


def methods() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every constraint as a one-argument function projecting a matrix with σ = 2·w_max."""
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for c in BENCHED:  # the soft cap is told a step of norm w_max took W from w_max to 2·w_max
        out[c.name] = lambda W, c=c: c(W, w_max=W_MAX, update_norm=W_MAX)
    out["spectral_hard_cap[quintic]"] = lambda W: spectral_hard_cap(
        W, w_max=W_MAX, method="quintic"
    )
    return out


def fn_near(name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """The method applied to a weight at 1.05·w_max: the soft cap is told the step was 0.05."""
    c = METHODS.get(name)
    if c is not None and c.coupled_to_step:
        return lambda W: c.fn(W, w_max=W_MAX, update_norm=0.05 * W_MAX)
    return fn


def gram(W: torch.Tensor) -> torch.Tensor:
    """One Gram product on the small side: the unit of cost."""
    return W.mT @ W if W.shape[-2] >= W.shape[-1] else W @ W.mT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(
    shapes: list[tuple[int, int]] = SHAPES,
    min_rounds: int = 3,
    max_rounds: int = 15,
    budget_s: float = 20.0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Time every method on every shape; returns the JSON-ready results."""
    dev = torch.device(device)
    fns = {"gram": gram, **methods()}
    rows = []
    for out_features, in_features in shapes:
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
        W = (W * (2 * W_MAX / rms_operator_norm(W))).to(device=dev, dtype=dtype)
        # In training the weight is just outside the ball: σ = 1.05·w_max after a step of 0.05.
        near = W * (1.05 / 2)
        after, after_near = {}, {}
        for name, fn in fns.items():  # warm-up call, also gives the accuracy figures
            result = fn(W)
            if name != "gram":
                after[name] = rms_operator_norm(result).item() / W_MAX
                after_near[name] = rms_operator_norm(fn_near(name, fn)(near)).item() / W_MAX
        times: dict[str, list[float]] = {name: [] for name in fns}
        start = time.perf_counter()
        rounds = 0
        while rounds < min_rounds or (
            rounds < max_rounds and time.perf_counter() - start < budget_s
        ):
            for name, fn in fns.items():
                _sync(dev)
                t0 = time.perf_counter()
                fn(W)
                _sync(dev)
                times[name].append(time.perf_counter() - t0)
            rounds += 1
        median_ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
        for name in fns:
            if name == "gram":
                continue
            rows.append(
                {
                    "method": name,
                    "shape": [out_features, in_features],
                    "median_ms": median_ms[name],
                    "gram_ms": median_ms["gram"],
                    "cost_in_grams": median_ms[name] / median_ms["gram"],
                    "cost_vs_svd_cap": median_ms[name] / median_ms["svd_cap"],
                    "sigma_after_over_w_max": after[name],
                    "sigma_after_from_1.05_over_w_max": after_near[name],
                    "guarantee": GUARANTEE[name],
                    "rounds": rounds,
                }
            )
        print(f"{out_features}x{in_features}: {rounds} rounds, gram {median_ms['gram']:.2f} ms")
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            "dtype": str(dtype),
        },
        "w_max": W_MAX,
        "input_sigma_over_w_max": 2.0,
        "rows": rows,
    }


def markdown(results: dict) -> str:
    """A markdown table: one row per method, one column group per shape."""
    shapes = []
    for row in results["rows"]:
        if tuple(row["shape"]) not in shapes:
            shapes.append(tuple(row["shape"]))
    names = list(dict.fromkeys(row["method"] for row in results["rows"]))
    by = {(row["method"], tuple(row["shape"])): row for row in results["rows"]}
    m = results["machine"]
    lines = [
        f"Machine: {m['device']}, {m['processor']}, {m['threads']} threads, torch {m['torch']}, "
        f"{m['dtype']}. Input: Gaussian matrix with σ_max = 2·w_max.",
        "",
        "Cell: median ms per call / cost in Gram products (`WᵀW`, small side) / "
        "cost relative to `svd_cap` / σ_max ÷ w_max after one projection from σ_max = 2·w_max "
        "(soft cap told the step was w_max) / the same from 1.05·w_max (soft cap: step 0.05).",
        "",
        "| method | guarantee | " + " | ".join(f"{a}×{b}" for a, b in shapes) + " |",
        "|---|---|" + "---|" * len(shapes),
    ]
    gram_row = "| *one Gram product* | | " + " | ".join(
        f"{by[(names[0], s)]['gram_ms']:.2f} ms" for s in shapes
    )
    lines.append(gram_row + " |")
    for name in names:
        cells = []
        for s in shapes:
            r = by[(name, s)]
            cells.append(
                f"{r['median_ms']:.2f} / {r['cost_in_grams']:.1f}× / "
                f"{r['cost_vs_svd_cap']:.2f}× / {r['sigma_after_over_w_max']:.4f} / "
                f"{r['sigma_after_from_1.05_over_w_max']:.4f}"
            )
        lines.append(f"| `{name}` | {GUARANTEE[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lipschitz bench projections", description=__doc__)
    parser.add_argument("--out", default="benchmarks/out", help="folder for JSON and markdown")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of rounds per shape")
    parser.add_argument(
        "--shapes", default=None, help="comma-separated OUTxIN list (default: the five standard)"
    )
    args = parser.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results = run(shapes=shapes, device=args.device, budget_s=args.budget)
    write_results(args.out, "projections", results, markdown(results))


if __name__ == "__main__":
    main()
