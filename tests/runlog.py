"""Reading a run directory's metrics in tests that compare two runs."""

import json
from pathlib import Path


def untimed_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows without their wall-clock fields (times, tokens/s): what two runs
    of the same steps must agree on exactly."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and k != "tokens_per_s"} for r in rows]
