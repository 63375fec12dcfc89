"""The run directory: every file a training run writes, and what it guarantees.

::

    run.json        marker, written first: format, version, the model's input and output sizes
    config.json     the run's Config
    vocab.json      the characters of a character-level run
    metrics.jsonl   one JSON object per line, appended and flushed as training goes
    checkpoint.pt   model, optimizers, schedules, RNG states; integrity-checked (below)
    final.json      the final metrics, written once at the end
    curves.png      loss, accuracy and bound against steps
    .lock           advisory lock held by the process that trains into the directory
    train.log       the output of the run, when `lipschitz sweep` started it

Guarantees:

- **Atomic files.** Everything except ``metrics.jsonl`` is written through a fresh temporary
  file and one rename (:mod:`lipschitz.fileio`): a kill or a full disk leaves the old file or
  none. A partial last line of ``metrics.jsonl`` is dropped (with a warning) on resume.
- **One writer.** Training holds ``.lock`` (``flock``) for its whole duration; a second
  ``train`` or ``--resume`` on the directory fails with "in use by PID …".
- **No silent overwrite.** ``train`` writes only into a missing or empty directory, or into an
  unfinished run of the same config that has no checkpoint yet; a finished run's results are
  never rewritten.
- **Checkpoint integrity.** ``checkpoint.pt`` is loaded with ``weights_only=True`` (it cannot
  run code), carries the SHA-256 of its run's ``config.json`` and a SHA-256 over its contents;
  a foreign, truncated or corrupted file, or one from another config, is an error naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from lipschitz.config import Config
from lipschitz.fileio import (
    atomic_write,
    atomic_write_text,
    lock,
    read_json,
    read_json_object,
    remove_stale_temporaries,
)

RUN_FORMAT = "lipschitz-run"
CHECKPOINT_FORMAT = "lipschitz-checkpoint"
VERSION = 1


def same_config(a: Config, b: Config) -> bool:
    """Whether two configs describe the same run (``data_dir`` may differ: data moves)."""
    return dataclasses.replace(a, data_dir=None) == dataclasses.replace(b, data_dir=None)


MAX_DEPTH = 64  # deepest nesting state_digest follows


def state_digest(state) -> str:
    """SHA-256 over a nested structure of tensors, numbers, strings, lists and dicts: every
    tensor's dtype, shape and bytes, every other leaf's repr, in order."""
    h = hashlib.sha256()

    def visit(obj, depth: int) -> None:
        if depth > MAX_DEPTH:  # a crafted file; a training state is a few levels deep
            raise ValueError(f"a structure nested deeper than {MAX_DEPTH} levels")
        if isinstance(obj, Tensor):
            t = obj.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            h.update(b"D")
            for key, value in obj.items():
                h.update(repr(key).encode())
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            h.update(b"L" if isinstance(obj, list) else b"U")
            for value in obj:
                visit(value, depth + 1)
        else:
            h.update(repr(obj).encode())

    visit(state, 0)
    return h.hexdigest()


class MetricsWriter:
    """Appends one JSON line per record to metrics.jsonl, flushed as it is written."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# final.json's keys every run writes (lipschitz_bound may be null: an unbounded model)
FINAL_NUMBERS = ("val_loss", "val_acc", "lipschitz_bound", "steps", "tokens_seen", "wall_time_s")
MAX_WIDTH = 10**8  # no model has more outputs or input features (a vocabulary, an image)


class RunDir:
    """One run directory (see the module docstring for its files and guarantees)."""

    MARKER, CONFIG, VOCAB, METRICS = "run.json", "config.json", "vocab.json", "metrics.jsonl"
    CHECKPOINT, FINAL, CURVES, LOCK = "checkpoint.pt", "final.json", "curves.png", ".lock"
    LOG = "train.log"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---------------------------------------------------------------- state of the directory

    def is_run(self) -> bool:
        return (self / self.MARKER).exists()

    def marker(self) -> dict:
        """run.json, checked: {"format", "version", "n_outputs", "n_inputs"}."""
        marker = read_json(self / self.MARKER)
        ok = isinstance(marker, dict) and marker.get("format") == RUN_FORMAT
        ok = ok and isinstance(marker.get("n_outputs"), int)
        if not ok or not isinstance(marker.get("n_inputs"), (int, type(None))):
            raise ValueError(f"{self / self.MARKER}: not a lipschitz run marker")
        for key in ("n_outputs", "n_inputs"):
            value = marker[key]
            if value is not None and not 1 <= value <= MAX_WIDTH:
                raise ValueError(
                    f"{self / self.MARKER}: {key} is {value}, not a size in [1, {MAX_WIDTH:,}]"
                )
        return marker

    def is_finished(self) -> bool:
        """Whether final.json holds the run's results (a damaged one does not: it is redone)."""
        try:
            self.final()
        except (OSError, ValueError):
            return False
        return True

    @contextmanager
    def locked(self, create: bool = True) -> Iterator[None]:
        """Hold the directory's lock for the block (creating the directory if ``create``);
        temporary files of killed writes are removed. If no run was started, the lock file this
        call added is removed again, and so is the directory if it created it and it is empty."""
        created = not self.path.exists()
        if created and not create:
            raise FileNotFoundError(f"{self.path}: no such run directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise FileExistsError(f"--out {self.path}: exists and is not a directory") from None
        had_lock = (self / self.LOCK).exists()
        try:
            with lock(self / self.LOCK):
                remove_stale_temporaries(self.path)
                yield
        finally:
            if not had_lock and not self.is_run():  # refused, or failed before starting
                (self / self.LOCK).unlink(missing_ok=True)
                if created and not any(self.path.iterdir()):
                    os.rmdir(self.path)

    def check_can_start(self, cfg: Config) -> None:
        """Raise FileExistsError unless a new run of ``cfg`` may be written here."""
        if not self.path.is_dir():
            return  # to be created (by rank 0, under torchrun)
        others = sorted(p.name for p in self.path.iterdir() if p.name not in (self.LOCK, self.LOG))
        if not others:
            return
        if not self.is_run():
            raise FileExistsError(
                f"--out {self.path}: not empty and not a run directory ({', '.join(others[:3])}"
                f"{', …' if len(others) > 3 else ''}); choose an empty or new directory"
            )
        if (self / self.CONFIG).exists() and not same_config(self.config(), cfg):
            raise FileExistsError(f"--out {self.path}: holds a run of a different config")
        if self.is_finished():
            raise FileExistsError(
                f"--out {self.path}: holds a finished run; its results are kept (choose "
                "another --out)"
            )
        if (self / self.CHECKPOINT).exists():
            raise FileExistsError(f"{self.path} already holds a run; pass --resume or choose "
                                  "another --out")  # fmt: skip

    # ------------------------------------------------------------------------------- writing

    def write_marker(self, n_outputs: int, n_inputs: int | None) -> None:
        marker = {"format": RUN_FORMAT, "version": VERSION, "n_outputs": n_outputs,
                  "n_inputs": n_inputs}  # fmt: skip
        atomic_write_text(self / self.MARKER, json.dumps(marker, indent=2))

    def create(self, cfg: Config, n_outputs: int, n_inputs: int | None, vocab) -> None:
        """Start a new run: the marker first, then config, vocabulary and empty metrics."""
        self.write_marker(n_outputs, n_inputs)
        atomic_write_text(self / self.CONFIG, cfg.to_json())
        if vocab is not None:
            atomic_write_text(self / self.VOCAB, json.dumps(vocab))
        atomic_write_text(self / self.METRICS, "")

    def config(self) -> Config:
        return Config.load(self / self.CONFIG)

    def config_sha256(self) -> str:
        """SHA-256 of config.json as written (never rewritten, so stable across versions)."""
        try:
            return hashlib.sha256((self / self.CONFIG).read_bytes()).hexdigest()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self / self.CONFIG}: no such file") from None

    def vocab(self) -> list[str] | None:
        if not (self / self.VOCAB).exists():
            return None
        vocab = read_json(self / self.VOCAB)
        if not isinstance(vocab, list) or not all(isinstance(c, str) for c in vocab):
            raise ValueError(f"{self / self.VOCAB}: not a list of characters")
        return vocab

    def write_final(self, final: dict) -> None:
        atomic_write_text(self / self.FINAL, json.dumps(final, indent=2))

    def final(self) -> dict:
        """final.json, checked: the keys every run writes, as numbers (a bound may be null)."""
        final = read_json_object(self / self.FINAL)
        for key in FINAL_NUMBERS:
            value = final.get(key)
            if key == "lipschitz_bound" and value is None:
                continue  # an unconstrained model has no bound
            if not (isinstance(value, int | float) and not isinstance(value, bool)):
                raise ValueError(f"{self / self.FINAL}: {key} is {value!r:.40}, not a number")
        return final

    # ------------------------------------------------------------------------------- metrics

    def metrics(self) -> list[dict]:
        """The metrics rows; a partial last line (a kill mid-write) is left out."""
        path = self / self.METRICS
        if not path.exists():
            return []
        try:
            lines = path.read_text().split("\n")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text") from None
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # unterminated last line: an interrupted write
                    warnings.warn(f"{path}: dropping a partial last line", stacklevel=2)
                    continue
                raise ValueError(f"{path}: line {number} is not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"{path}: line {number} is not a metrics record")
            rows.append(row)
        return rows

    def keep_metrics_until(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resumed run redoes the rest), rewritten atomically."""
        kept = [row for row in self.metrics() if row["step"] <= step]
        atomic_write_text(self / self.METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    def metrics_writer(self) -> MetricsWriter:
        return MetricsWriter(self / self.METRICS)

    # --------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, state: dict) -> None:
        """Write the training state atomically, with the config's hash and a content digest."""
        wrapped = {"format": CHECKPOINT_FORMAT, "version": VERSION,
                   "config_sha256": self.config_sha256(), "sha256": state_digest(state),
                   "state": state}  # fmt: skip
        try:
            with atomic_write(self / self.CHECKPOINT) as f:
                torch.save(wrapped, f)
        except RuntimeError as err:  # torch's zip writer on a full disk: "unexpected pos ..."
            raise OSError(
                f"{self / self.CHECKPOINT}: could not be written ({first_line(err)}); is the "
                "disk full? The previous checkpoint, if any, is unchanged"
            ) from None

    def load_checkpoint(self) -> dict:
        """The saved training state, checked: readable, ours, of this run's config, intact."""
        path = self / self.CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: not a readable checkpoint (truncated, corrupted or "
                             f"not written by lipschitz): {first_line(err)}") from None  # fmt: skip
        if _is_legacy(saved):
            return saved  # written before checkpoints carried digests: nothing to check
        keys = ("format", "config_sha256", "sha256", "state")
        if (
            not isinstance(saved, dict)
            or saved.get("format") != CHECKPOINT_FORMAT
            or any(k not in saved for k in keys)
        ):
            raise ValueError(f"{path}: not a lipschitz checkpoint")
        if saved["config_sha256"] != self.config_sha256():
            raise ValueError(f"{path}: the checkpoint belongs to a different config than "
                             f"{self / self.CONFIG}")  # fmt: skip
        try:
            digest = state_digest(saved["state"])
        except ValueError as err:
            raise ValueError(f"{path}: not a lipschitz checkpoint ({err})") from None
        if digest != saved["sha256"]:
            raise ValueError(f"{path}: corrupted (its contents do not match their SHA-256)")
        return saved["state"]


def first_line(err: BaseException) -> str:
    """The first line of an error's message (torch's can run to pages), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_legacy(saved) -> bool:
    """A checkpoint of the first format: the bare training state (model, optimizers, ...)."""
    keys = {"model", "optimizers", "schedulers", "batch_generator", "step"}
    return isinstance(saved, dict) and "format" not in saved and keys <= saved.keys()
