"""Benchmarks, run as ``lipschitz bench NAME`` (or ``python -m lipschitz.benchmarks.NAME``):
``projections`` (cost and accuracy of every constraint), ``throughput`` (training steps per
second and peak memory against the baseline), ``profile`` (where a step's time goes) and
``vit_step`` (the image transformer's step: bfloat16 against float32, the SLL layers' fused
forward against the formula as written).
Results and the machines they ran on: docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path

from lipschitz.fileio import atomic_write_text


def write_results(out: str | Path, name: str, result: dict, table: str) -> None:
    """``NAME.json`` (the numbers) and ``NAME.md`` (the table) in ``out``, atomically; the
    table is printed too."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2))
    atomic_write_text(out / f"{name}.md", table)
    print(table)
