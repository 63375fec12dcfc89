"""Careless or hostile inputs get one clear error naming the thing at fault, never a traceback
from deep inside, a write outside the requested folder, or a good file overwritten."""

import json
import re
import struct
import sys

import numpy as np
import pytest
import torch

from lipschitz import fileio, robustness
from lipschitz.choices import check_choices
from lipschitz.config import Config, apply_overrides
from lipschitz.constraints import CONSTRAINTS, METHODS
from lipschitz.data import tokens as tk
from lipschitz.pareto import MARKER, find_runs, load_points, plot
from lipschitz.sweep import expand, load_spec, read_final, run_sweep, summarize

# --------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("device", ["foo", "cuda:x", "gpu", "", "cuda:-1", "cpu,cuda"])
def test_config_rejects_an_unknown_device(device):
    with pytest.raises(ValueError, match="device"):
        apply_overrides(Config(), [f"device={device}"])
    with pytest.raises(ValueError, match="device"):
        Config(device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_config_accepts_every_device_form(device):
    assert apply_overrides(Config(), [f"device={device}"]).device == device


@pytest.mark.parametrize(
    "assignment",
    ["lr=inf", "lr=nan", "lr=-inf", "w_max=inf", "head_w_max=nan", "attn_scale=nan",
     "momentum=inf", "adam_betas=nan,0.95", "train_temperature=inf"],
)  # fmt: skip
def test_config_rejects_non_finite_floats_naming_the_key(assignment):
    key = assignment.split("=")[0]
    with pytest.raises(ValueError, match=rf"config: {key} must be finite"):
        apply_overrides(Config(), [assignment])


BIG = str(10**30)


@pytest.mark.parametrize(
    "assignment",
    ["w_max=1e300", "lr=-1e300", "head_w_max=1e9", "content_scale=1e20", "train_temperature=1e40",
     "seed=1180591620717411303424", "seed=-1", "steps=" + BIG,
     "sample_tokens=" + BIG, "eval_every=" + BIG, "warmup_steps=" + BIG, "final_scale=0",
     "attn_scale=-1"],
)  # fmt: skip
def test_config_rejects_extreme_numbers_naming_the_key(assignment):
    key = assignment.split("=")[0]
    with pytest.raises(ValueError, match=rf"config: {key}"):
        apply_overrides(Config(mixer="lookup"), [assignment])


# numeric keys whose extreme values the config accepts: checked against the model or the data
# when the run starts (one line naming the key), or harmless (val_tokens: the whole split)
CHECKED_WHEN_THE_RUN_STARTS = {"n_head", "recall_pairs", "val_tokens"}


@pytest.mark.parametrize(
    ("assignments", "words"),
    [(["n_head=" + BIG], "n_head"), (["recall_pairs=" + BIG], "recall_pairs")],
)  # fmt: skip
def test_extreme_values_checked_at_the_start_are_one_line(assignments, words, tmp_path, capsys):
    from lipschitz.cli import main

    sets = [arg for a in assignments for arg in ("--set", a)]
    with pytest.raises(SystemExit) as done:
        main(["train", "recall-cpu", "--out", str(tmp_path / "run"), *sets])  # no dataset to read
    err = capsys.readouterr().err
    assert done.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_every_numeric_option_refuses_extreme_values_or_is_checked_at_the_start():
    from dataclasses import fields

    numeric = [f.name for f in fields(Config) if any(t in str(f.type) for t in ("int", "float"))]
    assert len(numeric) > 40  # the probe reaches every numeric key
    for key in numeric:
        for value in ("1e300", "-1e300", str(10**30), str(-(10**30))):
            try:
                check_choices(apply_overrides(Config(mixer="lookup"), [f"{key}={value}"]))
            except ValueError as err:
                assert key in str(err), (key, value, str(err))
            else:
                assert key in CHECKED_WHEN_THE_RUN_STARTS, (key, value)
                assert not value.startswith("-"), (key, value)


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["sample", "RUN", "--seed", str(2**70)], "argument --seed: must be in [0, 2**63)"),
     (["train", "tiny", "--out", "RUN", "--set", "seed=" + str(2**70)], "config: seed")],
)  # fmt: skip
def test_cli_refuses_a_seed_torch_cannot_take_in_one_line(argv, words, tmp_path, capsys):
    from lipschitz.cli import main

    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and words in capsys.readouterr().err


def test_certify_table_refuses_non_finite_or_negative_sigmas(capsys):
    from lipschitz.certify import main

    with pytest.raises(SystemExit) as done:
        main(["--table", "--sigmas", "nan", "-1"])
    assert done.value.code == 2 and "--sigmas must be finite and > 0" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["WORLD_SIZE", "LOCAL_RANK"])
def test_a_bad_torchrun_variable_is_named(name, monkeypatch):
    from lipschitz.training.runtime import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(name, "abc")
    with pytest.raises(ValueError, match=f"environment variable {name}='abc' is not an integer"):
        init_distributed("cuda")


@pytest.mark.parametrize(
    ("assignments", "key"),
    [(["d_model=1000000000"], "d_model"), (["n_layer=100000000", "d_model=4096"], "n_layer"),
     (["batch_size=1000000000000"], "batch_size"), (["seq_len=10000000000"], "seq_len")],
)  # fmt: skip
def test_config_rejects_sizes_that_cannot_fit_naming_the_key(assignments, key):
    with pytest.raises(ValueError, match=key):
        apply_overrides(Config(), assignments)


def test_a_damaged_config_json_is_an_error_naming_the_file_and_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"lr": 0.1, "steps"')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        Config.load(path)
    path.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(ValueError, match=r"config\.json: config: lr must be float"):
        Config.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: a config must be a JSON object"):
        Config.load(path)


# --------------------------------------------------------------------------------------------
# token shards and `prepare`


@pytest.mark.parametrize("name", ["../x", "a/b", "/tmp/x", "", "..", "a..b", "x_val", "a_train_b"])
def test_prepare_refuses_a_name_that_is_not_a_plain_prefix(tmp_path, name):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="name"):
        tk.prepare([text], out, name=name)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_token_ids_outside_the_vocabulary_name_the_shard(tmp_path):
    tk.write_shard(tmp_path / "d_train_000000.bin", np.arange(10))
    tk.write_shard(tmp_path / "d_train_000001.bin", [1, 2, 60000, 3, 4])
    shards = tk.TokenShards.open(tmp_path, "train", vocab_size=50257)
    assert shards.windows(np.arange(7), 4).max() == 9  # the first shard is fine
    with pytest.raises(ValueError, match=r"d_train_000001\.bin: token id 60000 at token 2"):
        shards.windows(np.array([0, 8]), 4)
    unchecked = tk.TokenShards.open(tmp_path, "train")  # no vocabulary given: no check
    assert unchecked.windows(np.array([8]), 4).max() == 60000


def test_truncated_or_foreign_shards_name_the_file(tmp_path):
    tk.write_shard(tmp_path / "d_val_000000.bin", np.arange(10))
    (tmp_path / "d_train_000000.bin").write_bytes(b"\x00" * 100)  # shorter than a header
    with pytest.raises(ValueError, match=r"d_train_000000\.bin: truncated"):
        tk.TokenShards.open(tmp_path, "train")
    foreign = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "d_train_000000.bin").write_bytes(foreign)
    with pytest.raises(ValueError, match=r"d_train_000000\.bin: bad magic number"):
        tk.TokenShards.open(tmp_path, "train")
    header = struct.pack("<3i", tk.MAGIC, tk.VERSION, 1000) + bytes(1012)
    (tmp_path / "d_train_000000.bin").write_bytes(header + bytes(20))
    with pytest.raises(ValueError, match=r"d_train_000000\.bin: truncated.*1000 tokens"):
        tk.TokenShards.open(tmp_path, "train")
    (tmp_path / "d_train_000000.bin").unlink()
    (tmp_path / "d_train_000000.bin").mkdir()  # a folder that looks like a shard
    with pytest.raises(FileNotFoundError, match=r"d_train_000000\.bin"):
        tk.TokenShards.open(tmp_path, "train")


# --------------------------------------------------------------------------------------------
# sweeps


def _spec(tmp_path, text):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key"),
    [('preset = "tiny"\ngrid = 5\n', "grid"), ('preset = "tiny"\ngrid = [1, 2]\n', "grid"),
     ('preset = "tiny"\ngrid = "w_max"\n', "grid"), ("preset = 5\n", "preset"),
     ('preset = "tiny"\nout = 3\n', "out"), ('preset = "tiny"\nparallel = "two"\n', "parallel"),
     ('preset = "tiny"\nparallel = 1.5\n', "parallel"),
     ('preset = "tiny"\nparallel = 0\n', "parallel")],
)  # fmt: skip
def test_a_spec_with_wrong_types_names_the_key(tmp_path, text, key):
    with pytest.raises(ValueError, match=key):
        expand(load_spec(_spec(tmp_path, text)))


@pytest.mark.parametrize("name", ["summary.md", "summary.json"])
def test_a_sweep_never_replaces_a_users_summary_file(tmp_path, name):
    """Into an existing folder holding the user's own summary.md or summary.json: refused
    before any run starts, the file untouched; ours (and an older version's table) are
    replaced."""
    spec = _spec(tmp_path, 'preset = "tiny"\n[[grid]]\nw_max = [1.0]\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("my own notes\n")
    with pytest.raises(FileExistsError, match=rf"{name} exists and was not written by lipschitz"):
        run_sweep(spec, out)
    assert (out / name).read_text() == "my own notes\n" and not (out / "w_max=1.0").exists()
    (out / name).unlink()
    (out / "summary.md").write_text(
        "| run | status | val acc | val loss | certified bound | wall s |\n|---|\n"
    )  # fmt: skip  (an older version's)
    (out / "summary.json").write_text('[{"run": "w_max=1.0", "status": "failed"}]')
    summarize(out, expand(load_spec(spec)))  # both ours: replaced
    assert (out / "summary.md").read_text().startswith("<!-- written by lipschitz sweep -->")


def test_an_absurd_grid_is_refused_before_it_is_expanded(tmp_path):
    """10⁶ runs took minutes of silence to expand (a config check each); refused at once."""
    axis = "[" + ", ".join(str(1 + i / 1000) for i in range(1000)) + "]"
    text = f'preset = "tiny"\n[[grid]]\nw_max = {axis}\nlr = {axis}\n'
    with pytest.raises(ValueError, match="make 1,000,000 runs, more than 10,000"):
        expand(load_spec(_spec(tmp_path, text)))


def test_a_second_sweep_on_the_same_directory_is_refused(tmp_path):
    spec = _spec(tmp_path, 'preset = "tiny"\n[[grid]]\nw_max = [1.0, 2.0]\n')
    out = tmp_path / "sweep"
    out.mkdir()
    with fileio.lock(out / ".lock"):  # the first sweep, still running
        with pytest.raises(fileio.DirectoryInUse, match=r"in use by PID \d+"):
            run_sweep(spec, out)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing started


def test_a_truncated_final_json_counts_as_unfinished_and_is_named(tmp_path, capsys):
    runs = expand(load_spec(_spec(tmp_path, 'preset = "tiny"\n[[grid]]\nw_max = [1.0, 2.0]\n')))
    out = tmp_path / "sweep"
    (out / runs[0].name).mkdir(parents=True)
    (out / runs[0].name / "final.json").write_text('{"val_acc": 0.5, "val_lo')
    (out / runs[1].name).mkdir()
    (out / runs[1].name / "final.json").write_text(json.dumps({"val_acc": 0.6, "val_loss": "x"}))
    final, problem = read_final(out / runs[0].name)
    assert final is None and "final.json: not valid JSON" in problem
    rows = summarize(out, runs)
    assert rows[0]["status"] == "new" and "final.json" in rows[0]["problem"]
    assert rows[1]["status"] == "done" and rows[1]["val_acc"] == 0.6
    assert "final.json: not valid JSON" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == rows
    assert "| w_max=2.0 | done | 0.6000 | x |" in (out / "summary.md").read_text()


# --------------------------------------------------------------------------------------------
# `lipschitz plot`


def _fake_run(root, name, final="", config=None):
    (root / name).mkdir(parents=True)
    config = config or {"optimizer": "muon", "constraint": "spectral_soft_cap"}
    (root / name / "config.json").write_text(json.dumps(config))
    (root / name / "final.json").write_text(final or json.dumps({"lipschitz_bound": 2.0,
                                                                  "val_acc": 0.5}))  # fmt: skip


def test_plot_never_overwrites_files_it_did_not_write(tmp_path):
    _fake_run(tmp_path / "runs", "r0")
    points = load_points(find_runs([tmp_path / "runs"]), "lipschitz_bound", "val_acc")
    results = tmp_path / "results"
    (tmp_path / "results.md").write_text("# my notes\n")
    with pytest.raises(FileExistsError, match=r"results\.md"):
        plot(points, "lipschitz_bound", "val_acc", results)
    assert (tmp_path / "results.md").read_text() == "# my notes\n"
    assert not (tmp_path / "results.png").exists()

    (tmp_path / "results.md").unlink()
    assert plot(points, "lipschitz_bound", "val_acc", results) == tmp_path / "results.png"
    expected = MARKER + "\n<!-- image: results.png -->\n| group |"
    assert (tmp_path / "results.md").read_text().startswith(expected)
    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    plot(points, "lipschitz_bound", "val_acc", results)  # its own files: replaced
    assert (tmp_path / "results.png").read_bytes() == png

    (tmp_path / "mine.png").write_bytes(b"a user's picture")  # no table of ours beside it
    with pytest.raises(FileExistsError, match=r"mine\.png"):
        plot(points, "lipschitz_bound", "val_acc", tmp_path / "mine.png")
    assert (tmp_path / "mine.png").read_bytes() == b"a user's picture"
    with pytest.raises(ValueError, match=r"results\.md"):
        plot(points, "lipschitz_bound", "val_acc", tmp_path / "results.md")


def test_plot_never_replaces_a_user_image_beside_a_table_of_another_image(tmp_path):
    """a.md written with --out a.svg does not make the user's a.png ours."""
    _fake_run(tmp_path / "runs", "r0")
    points = load_points(find_runs([tmp_path / "runs"]), "lipschitz_bound", "val_acc")
    plot(points, "lipschitz_bound", "val_acc", tmp_path / "a.svg")
    (tmp_path / "a.png").write_bytes(b"a user's picture")
    with pytest.raises(FileExistsError, match=r"a\.png exists and was not written"):
        plot(points, "lipschitz_bound", "val_acc", tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == b"a user's picture"
    plot(points, "lipschitz_bound", "val_acc", tmp_path / "a.svg")  # its own: replaced


def test_plot_names_a_damaged_final_json(tmp_path):
    _fake_run(tmp_path / "runs", "good")
    _fake_run(tmp_path / "runs", "bad", final='{"lipschitz_bound": 2.0, "val_')
    with pytest.raises(ValueError, match=r"bad/final\.json: not valid JSON"):
        load_points(find_runs([tmp_path / "runs"]), "lipschitz_bound", "val_acc")
    (tmp_path / "runs" / "bad" / "final.json").write_text(
        '{"lipschitz_bound": "big", "val_acc": 1}'
    )
    with pytest.raises(ValueError, match=r"bad: lipschitz_bound is 'big', not a number"):
        load_points(find_runs([tmp_path / "runs"]), "lipschitz_bound", "val_acc")


def test_plot_leaves_out_bounds_a_log_axis_cannot_show(tmp_path, capsys):
    for name, bound in (("zero", 0.0), ("negative", -3.0), ("good", 2.0)):
        _fake_run(tmp_path / "runs", name, json.dumps({"lipschitz_bound": bound, "val_acc": 0.9}))
    points = load_points(find_runs([tmp_path / "runs"]), "lipschitz_bound", "val_acc")
    plot(points, "lipschitz_bound", "val_acc", tmp_path / "p.png")
    said = capsys.readouterr().out
    assert "zero (lipschitz_bound=0.0 cannot go on a log axis)" in said and "negative" in said
    table = (tmp_path / "p.md").read_text()
    assert "negative" not in table and "zero" not in table and "good" in table


def test_plot_names_a_number_beyond_a_float(tmp_path):
    _fake_run(tmp_path / "runs", "huge", '{"lipschitz_bound": 1' + "0" * 400 + ', "val_acc": 1}')
    with pytest.raises(ValueError, match=r"huge: lipschitz_bound is 1000.*beyond a float's range"):
        load_points(find_runs([tmp_path / "runs"]), "lipschitz_bound", "val_acc")


# --------------------------------------------------------------------------------------------
# `lipschitz robustness`


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"n": 0}, "n"), ({"n": -5}, "n"), ({"eps_list": (float("nan"),)}, "eps"),
     ({"eps_list": (float("inf"),)}, "eps"), ({"eps_list": (-0.1,)}, "eps"),
     ({"eps_list": ()}, "eps"), ({"pgd_steps": -1}, "pgd_steps")],
)  # fmt: skip
def test_robustness_refuses_bad_arguments_before_touching_the_run(tmp_path, kwargs, argument):
    good = '{"clean_acc": 0.5}'
    (tmp_path / "robustness.json").write_text(good)
    with pytest.raises(ValueError, match=rf"robustness: {argument}\b"):
        robustness.report(str(tmp_path), **kwargs)
    assert (tmp_path / "robustness.json").read_text() == good


def test_robust_accuracy_is_the_renamed_evaluate_and_pgd_takes_zero_steps():
    assert not hasattr(robustness, "evaluate")  # one evaluate in the package: training.inference
    model = torch.nn.Linear(4, 3)
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    assert torch.equal(robustness.pgd_l2(model, x, y, eps=0.5, steps=0), x)
    result = robustness.robust_accuracy(model, x, y, 10.0, eps_list=(0.1,), pgd_steps=0)
    assert result["eps"][0]["pgd_acc"] == result["clean_acc"]
    with pytest.raises(ValueError, match="robustness: n"):
        robustness.robust_accuracy(model, x[:0], y[:0], 10.0, eps_list=(0.1,))


# --------------------------------------------------------------------------------------------
# certify: what it bounds must be what runs


def _recall_cfg_overrides(steps: int) -> list[str]:
    """A seconds-long run on generated data (no dataset needed)."""
    return ["dataset=recall", "seq_len=16", "recall_pairs=4", "recall_vocab=8", f"steps={steps}",
            "eval_every=2", "checkpoint_every=2", "sample_tokens=0"]  # fmt: skip


def _recall_cfg(steps: int):
    from lipschitz.presets import preset

    return apply_overrides(preset("tiny"), _recall_cfg_overrides(steps))


def _small_gpt(**kwargs):
    from lipschitz.nn import LipschitzGPT

    torch.manual_seed(0)
    return LipschitzGPT(vocab_size=7, d_model=8, n_layer=1, n_head=2, seq_len=4,
                        zero_init_out=False, zero_init_head=False, **kwargs)  # fmt: skip


def test_certify_refuses_a_forward_hook_on_any_module():
    from lipschitz.certify import certify

    model = _small_gpt()
    before = certify(model).lipschitz
    handle = model.blocks[0].mlp.register_forward_hook(lambda m, args, out: out * 1000)
    with pytest.raises(ValueError, match=r"'blocks.0.mlp' \(MLP\) has a forward hook"):
        certify(model)
    handle.remove()
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, args: (args[0] * 10,))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn"):
        certify(model)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        with pytest.raises(ValueError, match="global forward hook"):
            certify(model)
    finally:
        handle.remove()
    assert certify(model).lipschitz == before


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [("blocks.0", "alpha", 1.5), ("blocks.0", "alpha", 0.0), ("blocks.0.attn", "out_mult", -1.0),
     ("blocks.0.attn", "attn_scale", float("nan")), ("", "final_scale", float("inf"))],
)  # fmt: skip
def test_certify_revalidates_constants_set_after_construction(where, key, value):
    from lipschitz.certify import certify

    model = _small_gpt()
    setattr(model.get_submodule(where), key, value)
    with pytest.raises(ValueError, match=key):
        certify(model)


def test_certify_refuses_non_finite_parameters():
    from lipschitz.certify import certify

    model = _small_gpt(pos_bias=True, attn_scale=0.0)
    with torch.no_grad():
        model.blocks[0].attn.pos_bias.bias[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"'blocks.0.attn.pos_bias.bias' holds a non-finite"):
        certify(model)


def test_cli_certify_json_never_puts_the_papers_formula_under_a_bound_key(tmp_path, capsys):
    """--rule paper prints the paper's formula as paper_formula_not_a_bound, never as
    lipschitz_bound or lipschitz (a JSON reader takes those for the certified bound)."""
    from lipschitz.cli import main
    from lipschitz.training import train

    train(_recall_cfg(2), tmp_path / "run")
    capsys.readouterr()
    main(["certify", str(tmp_path / "run"), "--json", "--rule", "paper"])
    paper = json.loads(capsys.readouterr().out)
    assert "lipschitz_bound" not in paper and "lipschitz" not in paper
    assert paper["rule"] == "paper" and paper["paper_formula_not_a_bound"] > 0
    main(["certify", str(tmp_path / "run"), "--json"])
    certified = json.loads(capsys.readouterr().out)
    assert certified["lipschitz_bound"] == certified["lipschitz"] > 0


# --------------------------------------------------------------------------------------------
# crafted checkpoints: every field of a resumed state is checked, whatever its format


@pytest.mark.parametrize(
    ("change", "words"),
    [(dict(step=60), "step 60 is not an int in [0, steps=4]"),
     (dict(step=-10), "step -10"), (dict(step="abc"), "step 'abc'"), (dict(step=2.0), "step 2.0"),
     (dict(elapsed_s=float("nan")), "elapsed_s nan"), ("nan weight", "non-finite")],
)  # fmt: skip
def test_a_crafted_checkpoint_is_refused_in_one_line_naming_the_field(
    tmp_path, train_interrupted, change, words
):
    """The bare (first-format) state carries no digest, so a crafted one must still pass a
    check of every field: a 60-step state over a 4-step run's checkpoint, steps below 0 or not
    ints, non-finite times and weights."""
    from lipschitz.data.recall import RecallTask
    from lipschitz.training import train
    from lipschitz.training.rundir import RunDir

    cfg = _recall_cfg(4)
    train_interrupted(cfg, tmp_path / "run", RecallTask, at=3)  # after the step-2 checkpoint
    run = RunDir(tmp_path / "run")
    state = run.load_checkpoint()
    if change == "nan weight":
        state["model"]["head.weight"][0, 0] = float("nan")
    else:
        state.update(change)
    torch.save(state, run / run.CHECKPOINT)  # the bare state: the first checkpoint format
    with pytest.raises(ValueError, match="does not fit this run") as err:
        train(cfg, tmp_path / "run", resume=True)
    assert words in str(err.value) and "checkpoint.pt" in str(err.value)


def test_a_stale_rank_variable_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from lipschitz.training import train

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="RANK=1 but WORLD_SIZE is 1"):
        train(_recall_cfg(2), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train", "tiny"], ["sweep", "SPEC"], ["plot", "DIR"]])
def test_an_empty_out_is_refused_in_one_line(command, capsys):
    from lipschitz.cli import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--out", " "])
    assert done.value.code == 2
    assert "argument --out: must name a file or folder" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, capsys):
    """`lipschitz certify RUN | head -1`: the reader leaves; no message, SIGPIPE's status."""
    from lipschitz import cli

    def closed(args):
        raise BrokenPipeError

    monkeypatch.setattr(cli, "cmd_presets", closed)
    with pytest.raises(SystemExit) as done:
        cli.main(["presets"])
    assert done.value.code == 141 and capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------
# constraints through the API: a guarantee met, or an error naming the constraint


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
@pytest.mark.parametrize(
    ("weight", "words"),
    [(torch.zeros(0, 4), "has no entries"), (torch.full((8, 4), 1e20), "entries up to 1e+20"),
     (torch.full((8, 4), float("inf")), "non-finite"), (torch.zeros(3, 4).fill_(float("nan")),
                                                         "non-finite")],
)  # fmt: skip
def test_every_constraint_names_itself_and_the_problem_for_an_impossible_weight(
    name, weight, words
):
    """Before: IndexError on empty weights, torch's private _LinAlgError at 1e20 entries (and
    stiefel returned a matrix of norm 0 there)."""
    with pytest.raises(ValueError, match=rf"^{name}: weight of shape .*{re.escape(words)}"):
        METHODS[name](weight, w_max=1.0)


# --------------------------------------------------------------------------------------------
# hand-edited run files


@pytest.mark.parametrize("final", ["{}", '{"val_acc": null}', '{"val_loss": 1, "val_acc": "x"}'])
def test_a_hand_edited_final_json_is_redone_on_resume(tmp_path, final):
    """Before: KeyError / TypeError tracebacks; now final.json must hold every key it promises
    as a number, or it counts as damaged and --resume evaluates the run again."""
    from lipschitz.training import train
    from lipschitz.training.rundir import RunDir

    cfg = _recall_cfg(2)
    good = train(cfg, tmp_path / "run")
    (tmp_path / "run" / "final.json").write_text(final)
    assert not RunDir(tmp_path / "run").is_finished()
    again = train(cfg, tmp_path / "run", resume=True)
    assert again["val_acc"] == good["val_acc"] and again["steps"] == 2


@pytest.mark.parametrize("n_outputs", [10**15, -5, 0])
def test_a_run_json_with_an_impossible_size_names_the_file_and_key(tmp_path, n_outputs):
    from lipschitz.training import load_run, train

    train(_recall_cfg(2), tmp_path / "run")
    marker = tmp_path / "run" / "run.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "n_outputs": n_outputs}))
    with pytest.raises(ValueError, match=rf"run\.json: n_outputs is {n_outputs}, not a size"):
        load_run(tmp_path / "run")


def test_a_deeply_nested_checkpoint_is_refused_naming_the_file(tmp_path):
    """Before: RecursionError in the state digest."""
    from lipschitz.training.rundir import CHECKPOINT_FORMAT, RunDir

    nested: list = []
    for _ in range(5000):
        nested = [nested]
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(Config().to_json())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # pickling 5000 levels needs it; loading them does not
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "config_sha256": run.config_sha256(),
                    "sha256": "", "state": nested}, run / run.CHECKPOINT)  # fmt: skip
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a lipschitz checkpoint \(a struct"):
        run.load_checkpoint()


def test_a_full_disk_at_the_first_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    """torch's zip writer reports a full disk as RuntimeError('... unexpected pos ...'): a
    traceback with exit 1 before; now one line naming the checkpoint, exit 2, nothing left
    half-written."""
    from lipschitz.cli import main

    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    argv = ["train", "tiny", "--out", str(tmp_path / "run")]
    argv += [f"--set={a}" for a in _recall_cfg_overrides(2)]
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert "checkpoint.pt: could not be written" in err and "disk full" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_stiefel_on_a_rank_deficient_weight_keeps_its_documented_band():
    """σ ≥ 1e-3·‖W‖_F land in [0.9999, 1.0001]·w_max, the rest in [0, 1.0001]·w_max (the
    README and the docstring say so; a rank-1 weight cannot be made orthogonal)."""
    g = torch.Generator().manual_seed(0)
    W = torch.outer(torch.randn(8, generator=g), torch.randn(4, generator=g))  # rank 1
    sigma = torch.linalg.svdvals(CONSTRAINTS["stiefel"](W, w_max=2.0).double()) * (4 / 8) ** 0.5
    assert 0.9999 * 2 <= float(sigma[0]) <= 1.0001 * 2
    assert float(sigma[1:].max()) <= 1.0001 * 2


# --------------------------------------------------------------------------------------------
# the README's promises, each tried by at least one test

PROMISE_TESTS = {
    "Resume": ["test_train.py::test_tiny_interrupt_resume_certify_sample",
               "test_resume.py::test_image_run_resumes_bit_identically",
               "test_distributed.py::test_two_gloo_processes_resume_bit_identically",
               "test_rundir.py::test_resume_drops_a_partial_metrics_line_and_later_lines",
               "test_rundir.py::test_resuming_a_finished_run_reports_it_and_rewrites_nothing",
               "test_hostile_inputs.py::test_a_full_disk_at_the_first_checkpoint_is_one_line"],
    "Atomic files": [
        "test_rundir.py::test_writes_replace_a_planted_symlink_instead_of_following_it",
        "test_rundir.py::test_temporaries_of_killed_writes_are_cleaned_up"],
    "One writer": ["test_rundir.py::test_a_second_writer_is_told_who_holds_the_run",
                   "test_rundir.py::test_the_lock_dies_with_its_process",
                   "test_hostile_inputs.py::test_a_second_sweep_on_the_same_directory_is_refused"],
    "No silent overwrite": [
        "test_rundir.py::test_train_refuses_a_directory_that_is_not_a_run",
        "test_rundir.py::test_a_finished_run_is_never_rewritten",
        "test_hostile_inputs.py::test_plot_never_overwrites_files_it_did_not_write",
        "test_hostile_inputs.py::test_plot_never_replaces_a_user_image_beside_a_table_of_another_image",
        "test_hostile_inputs.py::test_a_sweep_never_replaces_a_users_summary_file"],
    "Integrity": ["test_rundir.py::test_a_pickled_checkpoint_runs_no_code",
                  "test_rundir.py::test_truncated_foreign_and_corrupted_checkpoints_name_the_file",
                  "test_hostile_inputs.py::test_a_crafted_checkpoint_is_refused_in_one_line_naming_the_field"],
    "Certificates of what runs": [
        "test_hostile_inputs.py::test_certify_refuses_a_forward_hook_on_any_module",
        "test_hostile_inputs.py::test_certify_revalidates_constants_set_after_construction",
        "test_hostile_inputs.py::test_certify_refuses_non_finite_parameters"],
    "Honest results": [
        "test_rundir.py::test_a_broken_constraint_stops_the_run_naming_matrix_and_step",
        "test_rundir.py::test_methods_without_a_guarantee_record_their_violations",
        "test_train.py::test_nan_loss_names_the_step",
        "test_rundir.py::test_certify_warns_about_a_matrix_above_its_cap"],
}  # fmt: skip


def test_every_readme_guarantee_has_tests_that_try_to_break_it():
    """The README's run-directory guarantees (its bold bullets) each name tests that exist."""
    from pathlib import Path

    root = Path(__file__).resolve().parent
    readme = (root.parent / "README.md").read_text()
    promised = set(re.findall(r"^- \*\*([^*]+?)\.\*\*", readme, flags=re.M))
    assert promised == set(PROMISE_TESTS), "a README guarantee without tests, or tests without one"
    for ids in PROMISE_TESTS.values():
        for test_id in ids:
            file, name = test_id.split("::")
            assert re.search(rf"^def {name}\(", (root / file).read_text(), flags=re.M), test_id


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_every_constraint_and_optimizer_step_keeps_a_zero_weight_finite(name):
    """A zero-initialised matrix (a head, a residual branch's output) has no direction: every
    constraint and a Muon step from it must still give finite weights within the cap."""
    from lipschitz.linalg import rms_operator_norm
    from lipschitz.optim.muon import Muon

    for shape in [(65, 128), (128, 128), (4, 16)]:
        out = METHODS[name](torch.zeros(shape), w_max=1.0)
        assert torch.isfinite(out).all(), (name, shape)
        if METHODS[name].tolerance is not None:
            assert float(rms_operator_norm(out)) <= 1.0 + METHODS[name].tolerance, (name, shape)
        for grad in (torch.zeros(shape), torch.randn(shape)):
            W = torch.nn.Parameter(torch.zeros(shape))
            W.grad = grad
            Muon([W], lr=0.1, constraint=name, w_max=1.0).step()
            assert torch.isfinite(W).all(), (name, shape)
