"""Sweeps: run a grid of `lipschitz train` runs from a TOML spec, N at a time, resumably.

A spec names a preset, overrides shared by every run, and one or more grids. In a grid a list
is an axis and a scalar is fixed, so a grid with only scalars is a single run::

    preset = "cifar-mlp"
    parallel = 2                      # runs at a time (each gets cpu_count / parallel threads)
    [set]                             # every run
    steps = 1000
    [[grid]]                          # Muon and AdamW with weight decay
    optimizer = ["muon", "adamw"]
    constraint = "none"
    weight_decay = [0.01, 0.1]
    [[grid]]                          # the soft cap at three w_max
    constraint = "spectral_soft_cap"
    w_max = [2, 4, 8]

Every run gets its own directory under the sweep's ``out`` named by its grid values
(``optimizer=adamw,constraint=none,weight_decay=0.1``). Finished runs (``final.json``) are
skipped, interrupted ones are resumed from their checkpoint, failed ones are reported with the
end of their log; a summary table (``summary.md``, ``summary.json``) is written at the end.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lipschitz.choices import check_choices
from lipschitz.config import Config, apply_overrides
from lipschitz.fileio import atomic_write_text, lock, read_json_object
from lipschitz.presets import preset
from lipschitz.training.rundir import RunDir

SPEC_KEYS = {"preset", "out", "parallel", "set", "grid"}
LOCK = ".lock"  # in the sweep directory: held by the running sweep (fileio.lock)
SUMMARY_MARKER = "<!-- written by lipschitz sweep -->"
SUMMARY_HEADER = "| run | status | val acc | val loss | certified bound | wall s |"
MAX_RUNS = 10_000  # a larger grid is a typo (or a job for a cluster scheduler)
SUMMARY_KEYS = ("val_acc", "val_loss", "lipschitz_bound", "lipschitz_bound_l2", "wall_time_s")


@dataclass
class Run:
    name: str  # directory name, from the grid values
    overrides: dict  # every --set of this run: the spec's [set], then the grid values
    config: dict  # the full config it trains (config.json, without data_dir)

    def assignments(self) -> list[str]:
        return _assignments(self.overrides)


def _assignments(overrides: dict) -> list[str]:
    """``--set`` strings for a dict of overrides."""
    return [f"{key}={_format(value)}" for key, value in overrides.items()]


def _format(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(_format(v) for v in value)
    return "none" if value is None else str(value)


def load_spec(path: str | Path) -> dict:
    """Read and check a sweep spec; every run's config is validated before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {path} does not exist (or is not a file)")
    with open(path, "rb") as f:
        try:
            spec = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"sweep spec {path}: {err}") from err
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"sweep spec {path}: unknown keys {sorted(unknown)}; "
                         f"known: {sorted(SPEC_KEYS)}")  # fmt: skip
    if "preset" not in spec:
        raise ValueError(f"sweep spec {path}: missing 'preset'")
    _check_spec_types(path, spec)
    grids = spec.get("grid", [{}])
    spec["grid"] = [grids] if isinstance(grids, dict) else grids
    for grid in spec["grid"]:
        empty = [k for k, v in grid.items() if v == []]
        if empty:
            raise ValueError(f"sweep spec {path}: empty axis {empty} gives no runs")
    return spec


def _check_spec_types(path: Path, spec: dict) -> None:
    """Each top-level key of a spec has the type it needs; ValueError naming the key if not."""
    for key in ("preset", "out"):
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"sweep spec {path}: {key} must be a string, got {spec[key]!r}")
    parallel = spec.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ValueError(f"sweep spec {path}: parallel must be an integer >= 1, got {parallel!r}")
    if not isinstance(spec.get("set", {}), dict):
        raise ValueError(f"sweep spec {path}: [set] must be a table of key = value")
    grids = spec.get("grid", [{}])
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) for g in grids):
        raise ValueError(
            f"sweep spec {path}: grid must be one or more tables ([[grid]] sections), got "
            f"{grids!r:.80}"
        )


def _comparable(config_json: str) -> dict:
    config = json.loads(config_json)
    config.pop("data_dir", None)  # where the data lives does not change the run
    return config


def expand(spec: dict) -> list[Run]:
    """The runs of a spec: the union of its grids' Cartesian products, in order. A point that
    two grids share (same config) is run once; names use the parsed values (2 and 2.0 agree)."""
    base = preset(spec["preset"])  # ValueError naming the presets for a bad name
    total = sum(math.prod(len(v) if isinstance(v, list) else 1 for v in g.values())
                for g in spec["grid"])  # fmt: skip
    if total > MAX_RUNS:  # expanding checks every config (~5 ms each): refuse before that
        raise ValueError(f"the spec's grids make {total:,} runs, more than {MAX_RUNS:,}; "
                         "split it into several specs")  # fmt: skip
    shared = dict(spec.get("set", {}))
    runs: dict[str, Run] = {}
    seen: set[str] = set()
    for grid in spec["grid"]:
        axes = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values, strict=True))
            overrides = {**shared, **point}
            try:
                cfg = apply_overrides(base, _assignments(overrides))
                check_choices(cfg)
            except ValueError as err:
                raise ValueError(f"sweep run {point}: {err}") from err
            name = ",".join(f"{k}={_format(getattr(cfg, k))}" for k in point) or "run"
            name = name.replace("/", "_")
            config = _comparable(cfg.to_json())
            key = json.dumps(config, sort_keys=True)
            if key in seen:
                continue
            if name in runs:
                raise ValueError(f"two different sweep runs share the directory name {name!r}")
            seen.add(key)
            runs[name] = Run(name, overrides, config)
    return list(runs.values())


def check_not_stale(out: Path, runs: list[Run]) -> None:
    """Refuse to skip or resume a run directory that holds a different config (the spec or
    the preset changed since): its results would be reported as this spec's."""
    stale = []
    for run in runs:
        path = out / run.name / RunDir.CONFIG
        if _status(out / run.name) != "new" and path.exists():
            old = _comparable(Config.load(path).to_json())  # keys added since: defaults
            changed = sorted(k for k in run.config.keys() | old.keys()
                             if run.config.get(k) != old.get(k))  # fmt: skip
            if changed:
                stale.append(f"{run.name} ({', '.join(changed)})")
    if stale:
        raise ValueError(
            f"{len(stale)} run directories in {out} were trained with another config: "
            f"{'; '.join(stale[:5])}. Use another --out, or delete them to retrain."
        )


def read_final(run_dir: Path) -> tuple[dict | None, str | None]:
    """A run's final.json and, if it cannot be used, why: ``(None, None)`` when there is none,
    ``(None, reason naming the file)`` when it does not parse as a JSON object (a damaged or
    half-written file: the run counts as unfinished and is run again)."""
    path = run_dir / RunDir.FINAL
    if not path.exists():
        return None, None
    try:
        return read_json_object(path), None
    except (ValueError, OSError) as err:
        return None, str(err)


def _status(run_dir: Path) -> str:
    """done (a final.json that parses), resume (a checkpoint) or new."""
    if read_final(run_dir)[0] is not None:
        return "done"
    if (run_dir / RunDir.CHECKPOINT).exists():
        return "resume"
    return "new"


def _command(spec: dict, run: Run, run_dir: Path, data_dir: str | None, resume: bool) -> list:
    cmd = [sys.executable, "-m", "lipschitz", "train", spec["preset"], "--out", str(run_dir)]
    if resume:
        cmd.append("--resume")
    else:
        for assignment in run.assignments():
            cmd += ["--set", assignment]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    return cmd


def _start(
    spec: dict, run: Run, run_dir: Path, data_dir: str | None, env: dict
) -> subprocess.Popen:
    """Start (or resume, from its checkpoint) one run as a child process logging to train.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = _status(run_dir) == "resume"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW  # never through a symlink
    log = os.fdopen(os.open(run_dir / RunDir.LOG, flags, 0o644), "a")  # the child keeps its own
    proc = subprocess.Popen(_command(spec, run, run_dir, data_dir, resume),
                            stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    log.close()
    print(f"{'resume' if resume else 'start'} {run.name}", flush=True)
    return proc


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def run_sweep(
    spec_path: str | Path,
    out: str | Path | None = None,
    data_dir: str | None = None,
    parallel: int | None = None,
) -> list[dict]:
    """Run every run of the spec that has not finished; returns one summary row per run.

    The sweep directory is locked (``out/.lock``) for the whole sweep: a second sweep into it
    gets :class:`lipschitz.fileio.DirectoryInUse` naming the first one's PID.
    """
    spec = load_spec(spec_path)
    runs = expand(spec)
    out = Path(out or spec.get("out") or Path(spec_path).with_suffix(""))
    parallel = parallel if parallel is not None else spec.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an integer >= 1, got {parallel!r}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"sweep directory {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with lock(out / LOCK):
        check_not_stale(out, runs)
        check_summaries_are_ours(out)  # before the runs, not after hours of them
        return _run_all(spec, spec_path, runs, out, data_dir, parallel)


def _run_all(
    spec: dict, spec_path: str | Path, runs: list[Run], out: Path, data_dir: str | None,
    parallel: int,
) -> list[dict]:  # fmt: skip
    """Start the unfinished runs ``parallel`` at a time, wait for them, summarize."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}

    pending = [r for r in runs if _status(out / r.name) != "done"]
    print(f"sweep {spec_path}: {len(runs)} runs, {len(runs) - len(pending)} already done, "
          f"{parallel} at a time -> {out}", flush=True)  # fmt: skip
    for run in pending:
        problem = read_final(out / run.name)[1]
        if problem:
            print(f"  {run.name} is run again: {problem}", flush=True)
    failed: dict[str, str] = {}
    active: list[tuple[Run, subprocess.Popen, float]] = []
    started = 0

    def stop(signum, frame):  # kill / closed terminal: stop the children like Ctrl-C does
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while pending or active:
            while pending and len(active) < parallel:
                run = pending.pop(0)
                started += 1
                print(f"[{started}/{len(runs)}] ", end="")
                active.append((run, _start(spec, run, out / run.name, data_dir, env), time.time()))
            time.sleep(0.5)
            for item in list(active):
                run, proc, t0 = item
                if proc.poll() is None:
                    continue
                active.remove(item)
                if proc.returncode == 0 and _status(out / run.name) == "done":
                    print(f"  done {run.name} ({time.time() - t0:.0f} s)", flush=True)
                else:
                    failed[run.name] = _tail(out / run.name / RunDir.LOG)
                    print(f"  FAILED {run.name} (exit {proc.returncode}):\n{failed[run.name]}",
                          flush=True)  # fmt: skip
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for _, proc, _ in active:  # interrupted: stop the children, keep their checkpoints
            proc.terminate()
        for _, proc, _ in active:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return summarize(out, runs, failed)


def summarize(out: Path, runs: list[Run], failed: dict[str, str] | None = None) -> list[dict]:
    """Collect each run's final.json into summary.json and a markdown table summary.md (both
    written atomically). A final.json that does not parse is reported, naming the file."""
    failed = failed or {}
    rows = []
    for run in runs:
        final, problem = read_final(out / run.name)
        status = "failed" if run.name in failed else _status(out / run.name)
        row = {"run": run.name, "status": status}
        if final is not None:
            row.update({k: final.get(k) for k in SUMMARY_KEYS})
        if problem is not None:
            row["problem"] = problem
            print(f"sweep: {problem}")
        rows.append(row)
    check_summaries_are_ours(out)
    atomic_write_text(out / "summary.json", json.dumps(rows, indent=2))
    lines = [SUMMARY_MARKER, SUMMARY_HEADER, "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["run"], row["status"]]
        for key, fmt in (("val_acc", ".4f"), ("val_loss", ".4f"), ("lipschitz_bound", ".4g"),
                         ("wall_time_s", ".0f")):  # fmt: skip
            cells.append(_cell(row.get(key), fmt))
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines[1:]))  # the table, without its marker
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (their logs: <run>/train.log)")
    return rows


def check_summaries_are_ours(out: Path) -> None:
    """Refuse to replace a summary.md or summary.json a sweep did not write: ours start with
    SUMMARY_MARKER or, written before it, with SUMMARY_HEADER (the table), or are a list of
    {"run", "status", ...} rows (the JSON)."""
    md, js = out / "summary.md", out / "summary.json"
    refusal = "exists and was not written by lipschitz sweep; move it away or choose another --out"
    if md.exists():
        text = md.read_text(errors="replace") if md.is_file() else ""
        if not text.startswith((SUMMARY_MARKER, SUMMARY_HEADER)):
            raise FileExistsError(f"sweep: {md} {refusal}")
    if js.exists():
        try:
            rows = json.loads(js.read_text()) if js.is_file() else None
        except (ValueError, UnicodeDecodeError):
            rows = None
        if not isinstance(rows, list) or not all(
            isinstance(r, dict) and {"run", "status"} <= r.keys() for r in rows
        ):
            raise FileExistsError(f"sweep: {js} {refusal}")


def _cell(value: object, fmt: str) -> str:
    """A table cell: a number formatted, a missing value as –, anything else as text."""
    if value is None:
        return "–"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)
