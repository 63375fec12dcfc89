"""Run directories under careless and hostile use: no code from checkpoints, no silent
overwrites, no success reported for a broken constraint, atomic files, one writer, clear errors.

Every run here is `tiny` on synthetic token shards (no dataset needed), a few steps long."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from zipfile import BadZipFile

import pytest
import torch

from lipschitz.cli import main as cli_main
from lipschitz.config import Config, apply_overrides
from lipschitz.fileio import DirectoryInUse, atomic_write_text, lock, read_json, read_json_object
from lipschitz.presets import preset
from lipschitz.training import ConstraintViolation, RunDir, load_run, train
from lipschitz.training.rundir import first_line, same_config, state_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(token_shards):
    return apply_overrides(preset("tiny"), [
        "dataset=tokens", f"token_dir={token_shards}", "d_model=16", "n_head=1", "steps=4",
        "eval_every=2", "checkpoint_every=2", "log_every=1", "val_tokens=64", "sample_tokens=0",
    ])  # fmt: skip


@pytest.fixture
def finished(cfg, tmp_path):
    out = tmp_path / "run"
    train(cfg, out)
    return out


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI; (exit status, stderr)."""
    capsys.readouterr()
    try:
        cli_main(argv)
        code = 0
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


class Payload:
    """Unpickling this runs code: the attack a weights_only=False load lets through."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


# ---------------------------------------------------------------- 1. checkpoints run no code


def test_a_pickled_checkpoint_runs_no_code(finished, tmp_path, capsys):
    marker = tmp_path / "pwned"
    with open(finished / "checkpoint.pt", "wb") as f:
        torch.save({"model": Payload(marker)}, f)
    with pytest.raises(ValueError, match=r"checkpoint.pt: not a readable checkpoint"):
        load_run(finished)
    code, err = _cli(["certify", str(finished)], capsys)
    assert code == 2 and "checkpoint.pt" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_truncated_foreign_and_corrupted_checkpoints_name_the_file(finished, cfg, tmp_path):
    path = finished / "checkpoint.pt"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"checkpoint.pt: not a readable checkpoint"):
        load_run(finished)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"checkpoint.pt: not a lipschitz checkpoint"):
        load_run(finished)
    # a checkpoint whose tensors were altered after it was written
    saved = torch.load(io_of(good), weights_only=True)
    saved["state"]["model"]["head.weight"][0, 0] += 1.0
    torch.save(saved, path)
    with pytest.raises(ValueError, match=r"checkpoint.pt: corrupted"):
        load_run(finished)
    # a checkpoint of another config in this run's directory
    other = apply_overrides(cfg, ["w_max=0.5"])
    train(other, tmp_path / "other")
    path.write_bytes((tmp_path / "other" / "checkpoint.pt").read_bytes())
    with pytest.raises(ValueError, match="belongs to a different config"):
        load_run(finished)


def io_of(data: bytes):
    import io

    return io.BytesIO(data)


def test_digest_sees_every_tensor_and_value():
    state = {"a": torch.arange(4.0), "b": [1, 2.5, "x"], "c": torch.zeros(2, dtype=torch.bfloat16)}
    same = {"a": torch.arange(4.0), "b": [1, 2.5, "x"], "c": torch.zeros(2, dtype=torch.bfloat16)}
    assert state_digest(state) == state_digest(same)
    for change in (("a", torch.arange(4.0).flip(0)), ("b", [1, 2.5, "y"]),
                   ("c", torch.zeros(2)), ("a", torch.arange(4.0).reshape(2, 2))):  # fmt: skip
        assert state_digest({**state, change[0]: change[1]}) != state_digest(state), change


# ---------------------------------------------------------------- 2. no silent overwrites


def test_train_refuses_a_directory_that_is_not_a_run(cfg, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a run directory"):
        train(cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_finished_run_is_never_rewritten(finished, cfg):
    final = (finished / "final.json").read_text()
    (finished / "checkpoint.pt").unlink()
    with pytest.raises(FileExistsError, match="finished run"):
        train(cfg, finished)
    with pytest.raises(FileExistsError, match="different config"):
        train(apply_overrides(cfg, ["lr=0.05"]), finished)
    assert (finished / "final.json").read_text() == final
    assert json.loads((finished / "config.json").read_text())["lr"] == cfg.lr


def test_resuming_a_finished_run_reports_it_and_rewrites_nothing(finished, cfg):
    def stamps() -> dict:
        return {p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.name != ".lock"}

    before = stamps()
    final = train(cfg, finished, resume=True)
    assert final == json.loads((finished / "final.json").read_text())
    assert stamps() == before


def test_a_run_killed_before_its_first_checkpoint_starts_over(cfg, tmp_path):
    out = tmp_path / "run"
    RunDir(out).path.mkdir()
    RunDir(out).create(cfg, 50257, None, None)  # as if killed right after starting
    assert train(cfg, out)["steps"] == cfg.steps


# ------------------------------------------------- 3. a failed constraint is not a success


def test_a_broken_constraint_stops_the_run_naming_matrix_and_step(cfg, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(ConstraintViolation, match=r"step 2: .*weight has norm .* above its cap"):
        train(apply_overrides(cfg, ["lr=1e6"]), out)
    assert not (out / "final.json").exists()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [
        1, 2]  # fmt: skip
    code, err = _cli(["train", "tiny", "--out", str(tmp_path / "cli"), "--set", "lr=1e6",
                      *[f"--set={k}={v}" for k, v in _overrides(cfg).items()]], capsys)  # fmt: skip
    assert code == 2 and "above its cap" in err


def _overrides(cfg) -> dict:
    return {"dataset": "tokens", "token_dir": cfg.token_dir, "d_model": 16, "n_head": 1,
            "steps": 4, "eval_every": 2, "val_tokens": 64, "sample_tokens": 0}  # fmt: skip


def test_methods_without_a_guarantee_record_their_violations(cfg, tmp_path):
    loose = apply_overrides(cfg, ["constraint=spectral_hammer", "w_max=0.05", "lr=0.5"])
    final = train(loose, tmp_path / "run")
    assert final["constraint_violations"], "a hammer run far above its cap says so"
    v = final["constraint_violations"][0]
    assert v["norm"] > v["w_max"] and not v["guaranteed"]


def test_certify_warns_about_a_matrix_above_its_cap(finished, capsys):
    run = RunDir(finished)
    state = run.load_checkpoint()
    state["model"]["blocks.0.attn.v.weight"] *= 10
    run.save_checkpoint(state)
    code, err = _cli(["certify", str(finished)], capsys)
    assert code == 0 and "blocks.0.attn.v.weight" in err and "above its configured cap" in err


# ------------------------------------------------------------------- 4. atomic run files


def test_resume_drops_a_partial_metrics_line_and_later_lines(cfg, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(cfg, full)
    broken = tmp_path / "broken"
    _interrupt_at_step(monkeypatch, 4, lambda: train(cfg, broken))
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')  # killed mid-write
    with pytest.warns(UserWarning, match="partial last line"):
        train(cfg, broken, resume=True)
    assert (broken / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


def _interrupt_at_step(monkeypatch, step: int, run) -> None:
    """Run ``run()`` with a KeyboardInterrupt when the batch of ``step`` is drawn."""
    import lipschitz.data.tasks as tasks

    real, calls = tasks.TokenTask.batch, {"n": 0}

    def batch(self, n, generator):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(self, n, generator)

    monkeypatch.setattr(tasks.TokenTask, "batch", batch)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(tasks.TokenTask, "batch", real)


def test_a_broken_metrics_line_in_the_middle_is_an_error_naming_the_file(finished, cfg):
    lines = (finished / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (finished / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        RunDir(finished).metrics()


def test_malformed_run_files_are_errors_naming_them(finished, capsys):
    run = RunDir(finished)
    marker = (finished / "run.json").read_text()
    (finished / "run.json").write_text('{"format": "lipschitz-run"}')
    code, err = _cli(["certify", str(finished)], capsys)
    assert code == 2 and "run.json: not a lipschitz run marker" in err
    (finished / "run.json").write_text(marker)
    lines = (finished / "metrics.jsonl").read_text()
    (finished / "metrics.jsonl").write_text("[1, 2]\n" + lines)
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not a metrics record"):
        run.metrics()
    state = run.load_checkpoint()
    torch.save({"format": "lipschitz-checkpoint", "state": state}, finished / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint.pt: not a lipschitz checkpoint"):
        run.load_checkpoint()
    torch.save({**state, "model": {"w": torch.zeros(2)}}, finished / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint.pt: its weights do not fit"):
        load_run(finished)


def test_files_are_readable_like_any_other_file(finished):
    for name in ("run.json", "config.json", "final.json", "checkpoint.pt", "curves.png"):
        mode = (finished / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~_umask(), (name, oct(mode))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_runs_written_before_run_json_still_load_and_resume(finished, cfg):
    """A run of the first format: no run.json, a checkpoint that is the bare state."""
    run = RunDir(finished)
    state = run.load_checkpoint()
    torch.save(state, finished / "checkpoint.pt")
    (finished / "run.json").unlink()
    model, _ = load_run(finished)
    assert model.head.weight.shape == (50257, 16)
    assert train(cfg, finished, resume=True) == run.final()  # finished: reported as it is
    (finished / "final.json").unlink()
    train(cfg, finished, resume=True)  # re-evaluates the last step and adds the marker
    assert run.is_run() and run.is_finished()


def test_a_config_json_of_an_older_version_still_matches(finished, cfg):
    """Keys added to Config later take their defaults; the run stays the same run."""
    run = RunDir(finished)
    state = run.load_checkpoint()
    values = json.loads((finished / "config.json").read_text())
    del values["pos_bias"], values["train_temperature"]  # as if written before they existed
    (finished / "config.json").write_text(json.dumps(values))
    run.save_checkpoint(state)  # what that version would have saved
    load_run(finished)
    with pytest.raises(FileExistsError, match="finished run"):  # not "a different config"
        train(cfg, finished)


def test_a_damaged_final_json_is_redone_on_resume(finished, cfg):
    good = json.loads((finished / "final.json").read_text())
    (finished / "final.json").write_text('{"val_loss": 1.')
    final = train(cfg, finished, resume=True)
    assert final["val_loss"] == good["val_loss"]
    assert json.loads((finished / "final.json").read_text())["val_loss"] == good["val_loss"]


def test_resuming_a_finished_run_needs_no_checkpoint(finished, cfg):
    (finished / "checkpoint.pt").unlink()
    assert train(cfg, finished, resume=True)["steps"] == cfg.steps


def test_temporaries_of_killed_writes_are_cleaned_up(finished, cfg):
    stale = finished / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(cfg, finished, resume=True)
    assert not stale.exists()


def test_a_refused_command_leaves_nothing_behind(cfg, tmp_path, capsys):
    missing = tmp_path / "typo" / "deep" / "run"
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        train(cfg, missing, resume=True)
    assert not (tmp_path / "typo").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _ = _cli(["train", "tiny", "--out", str(mine)], capsys)
    assert code == 2 and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_lock_file_that_is_a_hard_link_is_never_written(cfg, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    os.link(victim, out / ".lock")
    with pytest.raises(FileExistsError, match="not a plain lock file"):
        train(cfg, out)
    assert victim.read_text() == "precious"


def test_spectral_weight_decay_has_no_cap_to_violate(cfg, tmp_path):
    final = train(apply_overrides(cfg, ["constraint=spectral_weight_decay", "w_max=0.01"]),
                  tmp_path / "run")  # fmt: skip
    assert "constraint_violations" not in final


def test_truncated_json_files_are_errors_naming_them(finished, capsys):
    config = (finished / "config.json").read_text()
    (finished / "config.json").write_text(config[:40])
    code, err = _cli(["certify", str(finished)], capsys)
    assert code == 2 and "config.json: not valid JSON" in err


def test_writes_replace_a_planted_symlink_instead_of_following_it(finished, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("final.json", "final.json.tmp", ".final.json.tmp"):
        (finished / name).unlink(missing_ok=True)
        (finished / name).symlink_to(victim)
    RunDir(finished).write_final({"val_loss": 1.0})
    assert victim.read_text() == "precious"
    assert not (finished / "final.json").is_symlink()
    assert json.loads((finished / "final.json").read_text()) == {"val_loss": 1.0}


# ------------------------------------------------------------------------ 5. one writer


def test_a_second_writer_is_told_who_holds_the_run(cfg, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with lock(out / ".lock"):
        with pytest.raises(DirectoryInUse, match=f"in use by PID {os.getpid()}"):
            train(cfg, out)
        code, err = _cli(["train", "tiny", "--out", str(out)], capsys)
        assert code == 2 and f"in use by PID {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written meanwhile


def test_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    script = f"from lipschitz.fileio import lock\nwith lock({str(out / '.lock')!r}): pass\n"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    with lock(out / ".lock"):  # a finished (or killed) holder leaves no stale lock
        pass


# -------------------------------------------------------------- 6. one line, exit status 2


@pytest.mark.parametrize("argv, expected", [
    (["--prompt", ""], "prompt must not be empty"),
    (["--temperature", "nan"], "temperature must be finite"),
    (["--temperature", "-1"], "temperature must be finite and >= 0"),
    (["--tokens", "-5"], "number of tokens must be an int >= 0"),
])  # fmt: skip
def test_bad_sample_arguments_are_one_line_errors(finished, capsys, argv, expected):
    code, err = _cli(["sample", str(finished), *argv], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_filesystem_errors_are_one_line_errors(cfg, tmp_path, capsys):
    code, err = _cli(["certify", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not a lipschitz run directory" in err
    long = tmp_path / ("x" * 300)
    code, err = _cli(["train", "tiny", "--out", str(long)], capsys)
    assert code == 2 and "name too long" in err.lower() and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _cli(["train", "tiny", "--out", str(blocker)], capsys)
    assert code == 2 and "not a directory" in err


def test_pickle_attack_module_is_real():
    """The payload used above does run code when unpickled (so the tests above mean something)."""
    target = Path(os.environ.get("TMPDIR", "/tmp")) / f"lipschitz-pickle-{os.getpid()}"
    pickle.loads(pickle.dumps(Payload(target)))
    assert target.read_text() == "pwned"
    target.unlink()
    atomic_write_text(target, "x")  # and atomic_write_text writes plain files
    assert target.read_text() == "x"
    target.unlink()


BARE_STATE = {"model": {}, "optimizers": [], "schedulers": [], "batch_generator": None, "step": 3}


def _message(err_type, fn, *args) -> str:
    with pytest.raises(err_type) as err:
        fn(*args)
    return str(err.value)


def test_same_config_ignores_data_dir_on_either_side_and_nothing_else():
    a = Config(data_dir="/data/here")
    assert same_config(a, Config(data_dir="/data/there"))
    assert same_config(Config(data_dir="/x"), Config())
    assert same_config(Config(), Config(data_dir="/x"))
    assert not same_config(a, Config(data_dir="/data/here", lr=a.lr * 2))


def test_missing_and_wrongly_typed_json_files_are_named(tmp_path):
    path = tmp_path / "final.json"
    assert _message(FileNotFoundError, read_json, path) == f"{path}: no such file"
    path.write_text("[1, 2]")
    assert _message(ValueError, read_json_object, path) == (
        f"{path}: expected a JSON object, got list"
    )


def test_run_marker_of_another_format_is_refused(tmp_path):
    run = RunDir(tmp_path)
    run.write_marker(65, None)
    assert run.marker()["n_outputs"] == 65
    path = tmp_path / run.MARKER
    path.write_text(json.dumps({"format": "other", "n_outputs": 65}))
    assert _message(ValueError, run.marker) == f"{path}: not a lipschitz run marker"


def test_vocabulary_must_be_a_list_of_strings(tmp_path):
    run = RunDir(tmp_path)
    assert run.vocab() is None  # no vocab.json: a run without one (token or image data)
    path = tmp_path / run.VOCAB
    path.write_text(json.dumps(["a", "b"]))
    assert run.vocab() == ["a", "b"]
    for bad in ({"a": 0}, ["a", 3], "ab"):
        path.write_text(json.dumps(bad))
        assert _message(ValueError, run.vocab) == f"{path}: not a list of characters", bad


def test_config_hash_of_a_run_without_config_names_the_file(tmp_path):
    run = RunDir(tmp_path)
    message = _message(FileNotFoundError, run.config_sha256)
    assert message == f"{tmp_path / run.CONFIG}: no such file"


def test_final_json_is_written_indented(tmp_path):
    final = {"val_acc": 0.5, "steps": 3}
    RunDir(tmp_path).write_final(final)
    assert (tmp_path / "final.json").read_text() == json.dumps(final, indent=2)


def test_checkpoint_errors_word_for_word(tmp_path):
    run = RunDir(tmp_path)
    path = tmp_path / run.CHECKPOINT
    assert _message(FileNotFoundError, run.load_checkpoint) == f"{path}: no checkpoint"
    # unreadable: the message ends with the first line of torch's own error
    path.write_bytes(b"not a zip file at all")
    with pytest.raises((RuntimeError, pickle.UnpicklingError, EOFError, BadZipFile)) as torch_err:
        torch.load(path, weights_only=True)
    assert _message(ValueError, run.load_checkpoint) == (
        f"{path}: not a readable checkpoint (truncated, corrupted or not written by lipschitz): "
        f"{first_line(torch_err.value)}"
    )
    # a dict of another format, even one that also holds every key of a bare training state
    for foreign in (
        {"format": "other", "config_sha256": "", "sha256": "", "state": {}},
        {"format": "other", **BARE_STATE},
    ):
        torch.save(foreign, path)
        assert _message(ValueError, run.load_checkpoint) == f"{path}: not a lipschitz checkpoint"


def test_bare_training_state_of_the_first_format_loads_as_it_is(tmp_path):
    # checkpoints written before they carried a format and digests: exactly these five keys
    run = RunDir(tmp_path)
    torch.save(BARE_STATE, tmp_path / run.CHECKPOINT)
    assert run.load_checkpoint() == BARE_STATE
    torch.save({k: v for k, v in BARE_STATE.items() if k != "step"}, tmp_path / run.CHECKPOINT)
    assert _message(ValueError, run.load_checkpoint).endswith("not a lipschitz checkpoint")


def test_first_line_of_an_error():
    assert first_line(ValueError("  first\nsecond  ")) == "first"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(KeyError()) == "KeyError"


def test_state_digest_tells_keys_and_container_types_apart():
    from lipschitz.training.rundir import state_digest

    t = torch.ones(2)
    digests = [
        state_digest({"a": t}),
        state_digest({"b": t}),  # same value under another key
        state_digest([t]),  # a list of the same tensor
        state_digest((t,)),  # a tuple of it
        state_digest({"a": [t]}),
        state_digest({"a": (t,)}),
    ]
    assert len(set(digests)) == len(digests)
    assert state_digest({"a": t}) == state_digest({"a": torch.ones(2)})  # content, not identity
