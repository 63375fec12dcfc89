"""Sweeps run a grid resumably and report failures; Pareto frontiers match brute force."""

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lipschitz.cli import main as cli_main
from lipschitz.pareto import find_runs, frontier, load_points, method_of, plot
from lipschitz.sweep import check_not_stale, expand, load_spec, run_sweep

DATA_DIR = os.environ.get("LIPSCHITZ_DATA_DIR")
needs_data = pytest.mark.skipif(
    not DATA_DIR or not Path(DATA_DIR, "tinyshakespeare/input.txt").exists(),
    reason="needs LIPSCHITZ_DATA_DIR with tinyshakespeare/input.txt",
)


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_grids_expand_to_the_union_of_their_products(tmp_path):
    spec = load_spec(
        _spec(
            tmp_path,
            """
preset = "tiny"
[set]
steps = 4
[[grid]]
optimizer = ["muon", "adamw"]
constraint = "none"
weight_decay = [0.0, 0.1]
[[grid]]
w_max = [1.0, 2.0, 3.0]
""",
        )
    )
    runs = expand(spec)
    assert len(runs) == 2 * 2 + 3
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert names[0] == "optimizer=muon,constraint=none,weight_decay=0.0"
    assert runs[-1].overrides == {"steps": 4, "w_max": 3.0}
    assert "steps=4" in runs[0].assignments()


def test_the_same_point_in_two_grids_runs_once_under_one_name(tmp_path):
    spec = load_spec(
        _spec(
            tmp_path,
            """
preset = "tiny"
[[grid]]
w_max = [2, 3.0]
[[grid]]
w_max = 2.0
""",
        )
    )
    assert [r.name for r in expand(spec)] == ["w_max=2.0", "w_max=3.0"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('preset = "tiny"\n[[grid]]\nw_maxx = [1.0]\n', "w_maxx"),
        ('preset = "tiny"\n[[grid]]\nconstraint = ["nope"]\n', "constraint"),
        ('preset = "no-such-preset"\n', "no-such-preset"),
        ('preset = "tiny"\ngrids = 3\n', "grids"),
        ("[[grid]]\nw_max = [1.0]\n", "preset"),
        ('preset = "tiny"\n[[grid]\n', "spec.toml"),
        ('preset = "tiny"\n[[grid]]\nw_max = []\n', "empty axis"),
        ('preset = "tiny"\ngrid = []\n', "one or more tables"),
        ('preset = "tiny"\nset = 3\n', "table"),
    ],
)
def test_bad_specs_are_refused_before_anything_runs(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        expand(load_spec(_spec(tmp_path, text)))
    assert not any(p.is_dir() for p in tmp_path.iterdir())


@needs_data
def test_sweep_runs_skips_resumes_and_reports_failures(tmp_path, capsys):
    spec = _spec(
        tmp_path,
        """
preset = "tiny"
parallel = 2
[set]
steps = 4
eval_every = 2
checkpoint_every = 2
sample_tokens = 0
[[grid]]
w_max = [1.0, 2.0]
[[grid]]
grad_accum = 3  # passes validation, fails in the trainer: batch_size 8 is not divisible by 3
""",
    )
    out = tmp_path / "sweep"
    rows = run_sweep(spec, out, data_dir=DATA_DIR)
    status = {row["run"]: row["status"] for row in rows}
    assert status == {"w_max=1.0": "done", "w_max=2.0": "done", "grad_accum=3": "failed"}
    assert "FAILED grad_accum=3" in capsys.readouterr().out  # reported with its log
    for name in ("w_max=1.0", "w_max=2.0"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["steps"] == 4 and config["w_max"] == float(name.split("=")[1])
    summary = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in summary] == [r["run"] for r in rows]
    assert "| w_max=1.0 | done |" in (out / "summary.md").read_text()

    # A finished run is skipped; an interrupted one (checkpoint, no final.json) is resumed.
    log = (out / "w_max=1.0" / "train.log").read_text()
    (out / "w_max=2.0" / "final.json").unlink()
    rows = run_sweep(spec, out, data_dir=DATA_DIR)
    assert (out / "w_max=1.0" / "train.log").read_text() == log
    assert (out / "w_max=2.0" / "final.json").exists()
    assert "resume w_max=2.0" in capsys.readouterr().out

    # A run written before a config key existed reads that key's default: not stale.
    old = json.loads((out / "w_max=1.0" / "config.json").read_text())
    del old["lr_floor"]
    (out / "w_max=1.0" / "config.json").write_text(json.dumps(old))
    check_not_stale(out, expand(load_spec(spec)))

    # Changing the spec's shared settings makes the old directories stale: refused, not reused.
    spec.write_text(spec.read_text().replace("steps = 4", "steps = 5"))
    with pytest.raises(ValueError, match=r"another config: w_max=1\.0 \(steps\)"):
        run_sweep(spec, out, data_dir=DATA_DIR)
    with pytest.raises(ValueError, match="parallel"):
        run_sweep(spec, tmp_path / "other", data_dir=DATA_DIR, parallel=0)


def _brute_force_frontier(points):
    def dominated(p):
        return any(q["x"] <= p["x"] and q["y"] >= p["y"] and (q["x"], q["y"]) != (p["x"], p["y"])
                   for q in points)  # fmt: skip

    return {(p["x"], p["y"]) for p in points if not dominated(p)}


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25))
def test_frontier_equals_brute_force(pairs):
    points = [{"x": float(x), "y": float(y), "run": str(i), "group": "g"}
              for i, (x, y) in enumerate(pairs)]  # fmt: skip
    front = frontier(points)
    assert {(p["x"], p["y"]) for p in front} == _brute_force_frontier(points)
    assert len(front) == len({(p["x"], p["y"]) for p in front})  # each point once
    assert [p["x"] for p in front] == sorted(p["x"] for p in front)
    # minimizing y is maximizing -y
    flipped = [{**p, "y": -p["y"]} for p in points]
    lower = frontier(flipped, lower_y=True)
    assert {(p["x"], -p["y"]) for p in lower} == {(p["x"], p["y"]) for p in front}


def test_methods_group_runs():
    soft_cap = {"constraint": "spectral_soft_cap", "weight_decay": 0.1}
    assert method_of(soft_cap) == "spectral_soft_cap"
    assert method_of({"constraint": "none", "weight_decay": 0.1}) == "weight decay"
    assert method_of({"constraint": "none", "weight_decay": 0.0}) == "none"


def _fake_run(root: Path, name: str, config: dict, final: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "config.json").write_text(json.dumps(config))
    (root / name / "final.json").write_text(json.dumps(final))


def test_plot_writes_png_and_frontier_table(tmp_path, capsys):
    runs = tmp_path / "runs"
    for i, (opt, bound, acc) in enumerate([("muon", 10, 0.5), ("muon", 100, 0.6),
                                           ("muon", 50, 0.4), ("adamw", 1000, 0.55)]):  # fmt: skip
        _fake_run(runs, f"r{i}", {"optimizer": opt, "constraint": "none", "weight_decay": 0.1},
                  {"lipschitz_bound": bound, "val_acc": acc})  # fmt: skip
    _fake_run(
        runs,
        "baseline",
        {"optimizer": "adamw", "constraint": "none"},
        {"lipschitz_bound": None, "val_acc": 0.7},
    )  # no bound: left out of the plot
    _fake_run(
        runs,
        "diverged",
        {"optimizer": "muon", "constraint": "none"},
        {"lipschitz_bound": float("nan"), "val_acc": 0.9},
    )  # NaN: left out too
    points = load_points(find_runs([runs]), "lipschitz_bound", "val_acc")
    assert len(points) == 4
    cli_main(["plot", str(runs), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 0
    table = (tmp_path / "p.md").read_text()
    assert "| muon + weight decay | 10 | 0.5000 | r0 |" in table
    assert "| r2 |" not in table  # dominated by r0 (lower bound, higher accuracy)
    with pytest.raises(ValueError, match="no_such_key"):
        load_points(find_runs([runs]), "no_such_key", "val_acc")
    with pytest.raises(FileNotFoundError):
        find_runs([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no run"):
        plot([], "lipschitz_bound", "val_acc", tmp_path / "q.png")
