"""The Lipschitz–accuracy trade-off: collect runs, find Pareto frontiers, plot them.

A run is a directory with ``config.json`` and ``final.json``; a sweep directory is expanded
into its runs. Runs are grouped by (optimizer, method), where the method is the constraint,
or "weight decay" for an unconstrained run with decay. On the frontier no other run of the
group has both a lower-or-equal x and a better-or-equal y (x minimized; y maximized, or
minimized for a loss with ``lower_y=True``).

``plot`` writes an image and a markdown table beside it, both atomically. It never overwrites a
file it did not write: its tables start with :data:`MARKER`, and an existing image is replaced
only when its table sibling carries that marker. A run whose final.json or config.json does not
parse is an error naming the file (not skipped: a silently shorter frontier would mislead).
"""

from __future__ import annotations

import math
from pathlib import Path

from lipschitz.fileio import atomic_write, atomic_write_text, read_json_object
from lipschitz.training.rundir import RunDir

MARKER = "<!-- written by lipschitz plot -->"
IMAGE_FORMATS = (".png", ".pdf", ".svg")


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories under ``paths`` (a run itself, or a folder of runs, searched deeply)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        found = [path] if (path / RunDir.FINAL).exists() else sorted(
            p.parent for p in path.rglob(RunDir.FINAL))  # fmt: skip
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
        final, config = read_json_object(run / RunDir.FINAL), read_json_object(run / RunDir.CONFIG)
        values = {**config, **final}
        for key in (x, y):
            if key not in values:
                raise ValueError(f"{run}: no key {key!r} in final.json or config.json; "
                                 f"keys: {sorted(values)}")  # fmt: skip
            if not (values[key] is None or _is_number(values[key])):
                raise ValueError(f"{run}: {key} is {values[key]!r:.40}, not a number")
            if values[key] is not None and abs(values[key]) > 1e300:  # also ints past float
                raise ValueError(f"{run}: {key} is {values[key]!r:.40}, beyond a float's range")
        if (
            values[x] is None
            or values[y] is None
            or not (math.isfinite(values[x]) and math.isfinite(values[y]))
        ):  # e.g. an unbounded baseline has no lipschitz_bound; a diverged run has NaN
            print(f"plot: leaving out {run} ({x}={values[x]}, {y}={values[y]})")
            continue
        points.append({"run": str(run), "x": float(values[x]), "y": float(values[y]),
                       "group": f"{config.get('optimizer')} + {method_of(config)}"})  # fmt: skip
    return points


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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


def frontier_table(fronts: dict[str, list[dict]], x: str, y: str, image: str) -> str:
    """The frontiers as a markdown table, one row per frontier point (first line: MARKER, then
    the name of the image the table was written with)."""
    lines = [MARKER, _image_line(image), f"| group | {x} | {y} | run |", "|---|---|---|---|"]
    for group, front in fronts.items():
        for p in front:
            lines.append(f"| {group} | {p['x']:.4g} | {p['y']:.4f} | {Path(p['run']).name} |")
    return "\n".join(lines) + "\n"


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """The image and table paths of ``--out``: ``results`` → results.png and results.md,
    ``results.svg`` → results.svg and results.md. Refuses to overwrite files this tool did not
    write (FileExistsError naming the file)."""
    out = Path(out)
    if out.is_dir() or not out.name:
        raise ValueError(f"plot: --out {out} is a directory; name a file such as {out}/pareto.png")
    if out.suffix == "":
        out = out.with_name(out.name + ".png")
    if out.suffix.lower() not in IMAGE_FORMATS:
        raise ValueError(f"plot: --out {out} must end in one of {IMAGE_FORMATS} (or nothing)")
    table = out.with_suffix(".md")
    ours = _starts_with_marker(table)
    # the image only if our table was written with this very image (a.md of --out a.svg does
    # not make a user's a.png ours)
    ours_image = ours and _image_line(out.name) in table.read_text(errors="replace").splitlines()
    for path, mine in ((table, ours), (out, ours_image)):
        if path.is_dir() or (path.exists() and not mine):
            raise FileExistsError(
                f"plot: {path} exists and was not written by lipschitz plot; move it away or "
                "choose another --out"
            )
    return out, table


def _image_line(name: str) -> str:
    return f"<!-- image: {name} -->"


def _starts_with_marker(path: Path) -> bool:
    """Whether ``path`` is a table this tool wrote (its first bytes are MARKER)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(MARKER)) == MARKER.encode()


def plot(
    points: list[dict], x: str, y: str, out: str | Path, log_x: bool = True, lower_y: bool = False
) -> Path:
    """Scatter every run, draw each group's frontier; writes the image ``out`` (PNG when it has
    no suffix) and the frontier table ``out``.md, atomically; returns the image's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if log_x:  # a log axis has no place for 0 or a negative value
        for p in points:
            if p["x"] <= 0:
                print(f"plot: leaving out {p['run']} ({x}={p['x']} cannot go on a log axis)")
        points = [p for p in points if p["x"] > 0]
    if not points:
        raise ValueError(f"no run has both {x} and {y}")
    out, table = output_paths(out)
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
    try:  # the table first: its marker is what lets a later plot replace the image
        atomic_write_text(table, frontier_table(fronts, x, y, out.name))
        with atomic_write(out) as f:
            fig.savefig(f, format=out.suffix[1:].lower(), dpi=130)
    finally:
        plt.close(fig)
    return out
