"""The Lipschitz–accuracy trade-off: collect runs, find Pareto frontiers, plot them.

A run is a directory with ``config.json`` and ``final.json``; a sweep directory is expanded
into its runs. Runs are grouped by (optimizer, method), where the method is the constraint,
or "weight decay" for an unconstrained run with decay. On the frontier no other run of the
group has both a lower-or-equal x and a better-or-equal y (x minimized; y maximized, or
minimized for a loss with ``lower_y=True``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories under ``paths`` (a run itself, or a folder of runs, searched deeply)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        found = [path] if (path / "final.json").exists() else sorted(
            p.parent for p in path.rglob("final.json"))  # fmt: skip
        if not found:
            raise FileNotFoundError(f"{path}: no finished run (final.json) in it")
        runs += found
    return runs


def method_of(config: dict) -> str:
    """A run's method for grouping: its constraint, or its decay when unconstrained."""
    constraint = config.get("constraint", "none")
    if constraint != "none":
        return constraint
    return "weight decay" if config.get("weight_decay", 0.0) > 0 else "none"


def load_points(run_dirs: list[Path], x: str, y: str) -> list[dict]:
    """One point per run: x and y from final.json (or config.json), its group and its name."""
    points = []
    for run in run_dirs:
        final = json.loads((run / "final.json").read_text())
        config = json.loads((run / "config.json").read_text())
        values = {**config, **final}
        for key in (x, y):
            if key not in values:
                raise ValueError(f"{run}: no key {key!r} in final.json or config.json; "
                                 f"keys: {sorted(values)}")  # fmt: skip
        if values[x] is None or values[y] is None or not (
            math.isfinite(values[x]) and math.isfinite(values[y])
        ):  # e.g. an unbounded baseline has no lipschitz_bound; a diverged run has NaN
            print(f"plot: leaving out {run} ({x}={values[x]}, {y}={values[y]})")
            continue
        points.append({"run": str(run), "x": float(values[x]), "y": float(values[y]),
                       "group": f"{config.get('optimizer')} + {method_of(config)}"})  # fmt: skip
    return points


def frontier(points: list[dict], lower_y: bool = False) -> list[dict]:
    """The Pareto-optimal points (minimize x; maximize y, or minimize it), sorted by x."""
    sign = -1.0 if lower_y else 1.0
    best_y = -math.inf
    kept = []
    for p in sorted(points, key=lambda p: (p["x"], -sign * p["y"])):
        if sign * p["y"] > best_y:
            kept.append(p)
            best_y = sign * p["y"]
    return kept


def frontiers(points: list[dict], lower_y: bool = False) -> dict[str, list[dict]]:
    groups = sorted({p["group"] for p in points})
    return {g: frontier([p for p in points if p["group"] == g], lower_y) for g in groups}


def frontier_table(fronts: dict[str, list[dict]], x: str, y: str) -> str:
    lines = [f"| group | {x} | {y} | run |", "|---|---|---|---|"]
    for group, front in fronts.items():
        for p in front:
            lines.append(f"| {group} | {p['x']:.4g} | {p['y']:.4f} | {Path(p['run']).name} |")
    return "\n".join(lines) + "\n"


def plot(
    points: list[dict], x: str, y: str, out: str | Path, log_x: bool = True, lower_y: bool = False
) -> Path:
    """Scatter every run, draw each group's frontier; writes ``out`` (PNG) and ``out``.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError(f"no run has both {x} and {y}")
    out = Path(out)
    fronts = frontiers(points, lower_y)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (group, front) in enumerate(fronts.items()):
        color = f"C{i % 10}"
        members = [p for p in points if p["group"] == group]
        ax.scatter([p["x"] for p in members], [p["y"] for p in members], color=color, alpha=0.35,
                   s=18)  # fmt: skip
        ax.plot([p["x"] for p in front], [p["y"] for p in front], "o-", color=color,
                label=group, markersize=5)  # fmt: skip
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("every run (faint) and each group's Pareto frontier", fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    out.with_suffix(".md").write_text(frontier_table(fronts, x, y))
    return out
