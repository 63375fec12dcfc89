"""lipschitz.training.rundir and lipschitz.fileio: tests written to kill mutants that survived
tests/test_rundir.py and tests/test_hostile_inputs.py (docs/testing.md). Each error is checked
word for word: the message is the whole user interface of a refused run directory."""

import json
import pickle
from zipfile import BadZipFile

import pytest
import torch

from lipschitz.config import Config
from lipschitz.fileio import read_json, read_json_object
from lipschitz.training.rundir import RunDir, first_line, same_config

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
