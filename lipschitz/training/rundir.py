"""The run directory: every file a training run writes, and what it guarantees.

::

    run.json        marker, written first: format, version, config hash, model input/output sizes
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
  run code), carries the hash of its run's config and a SHA-256 over its contents; a foreign,
  truncated or corrupted file is an error naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from lipschitz.config import Config
from lipschitz.fileio import atomic_write, atomic_write_text, lock, read_json

RUN_FORMAT = "lipschitz-run"
CHECKPOINT_FORMAT = "lipschitz-checkpoint"
VERSION = 1


def config_hash(cfg: Config) -> str:
    """SHA-256 of the config, without ``data_dir`` (the data may move between sessions)."""
    values = dataclasses.asdict(cfg)
    values.pop("data_dir")
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def state_digest(state) -> str:
    """SHA-256 over a nested structure of tensors, numbers, strings, lists and dicts: every
    tensor's dtype, shape and bytes, every other leaf's repr, in order."""
    h = hashlib.sha256()

    def visit(obj) -> None:
        if isinstance(obj, Tensor):
            t = obj.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            h.update(b"D")
            for key, value in obj.items():
                h.update(repr(key).encode())
                visit(value)
        elif isinstance(obj, (list, tuple)):
            h.update(b"L" if isinstance(obj, list) else b"U")
            for value in obj:
                visit(value)
        else:
            h.update(repr(obj).encode())

    visit(state)
    return h.hexdigest()


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
        marker = read_json(self / self.MARKER)
        if not isinstance(marker, dict) or marker.get("format") != RUN_FORMAT:
            raise ValueError(f"{self / self.MARKER}: not a lipschitz run marker")
        return marker

    def is_finished(self) -> bool:
        return (self / self.FINAL).exists()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Create the directory if needed and hold its lock for the block."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise FileExistsError(f"--out {self.path}: exists and is not a directory") from None
        with lock(self / self.LOCK):
            yield

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
        if self.marker().get("config_sha256") != config_hash(cfg):
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

    def create(self, cfg: Config, n_outputs: int, n_inputs: int | None, vocab) -> None:
        """Start a new run: the marker first, then config, vocabulary and empty metrics."""
        marker = {"format": RUN_FORMAT, "version": VERSION, "config_sha256": config_hash(cfg),
                  "n_outputs": n_outputs, "n_inputs": n_inputs}  # fmt: skip
        atomic_write_text(self / self.MARKER, json.dumps(marker, indent=2))
        atomic_write_text(self / self.CONFIG, cfg.to_json())
        if vocab is not None:
            atomic_write_text(self / self.VOCAB, json.dumps(vocab))
        atomic_write_text(self / self.METRICS, "")

    def adopt(self, cfg: Config, n_outputs: int, n_inputs: int | None) -> None:
        """Write the marker of a run made before markers existed (config.json + checkpoint)."""
        warnings.warn(f"{self.path}: a run without {self.MARKER}; adding it", stacklevel=2)
        marker = {"format": RUN_FORMAT, "version": VERSION, "config_sha256": config_hash(cfg),
                  "n_outputs": n_outputs, "n_inputs": n_inputs}  # fmt: skip
        atomic_write_text(self / self.MARKER, json.dumps(marker, indent=2))

    def config(self) -> Config:
        return Config.from_dict(read_json(self / self.CONFIG))

    def vocab(self) -> list[str] | None:
        return read_json(self / self.VOCAB) if (self / self.VOCAB).exists() else None

    def write_final(self, final: dict) -> None:
        atomic_write_text(self / self.FINAL, json.dumps(final, indent=2))

    def final(self) -> dict:
        return read_json(self / self.FINAL)

    # ------------------------------------------------------------------------------- metrics

    def metrics(self) -> list[dict]:
        """The metrics rows; a partial last line (a kill mid-write) is left out."""
        path = self / self.METRICS
        if not path.exists():
            return []
        lines = path.read_text().split("\n")
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # unterminated last line: an interrupted write
                    warnings.warn(f"{path}: dropping a partial last line", stacklevel=2)
                    continue
                raise ValueError(f"{path}: line {number} is not valid JSON") from None
        return rows

    def keep_metrics_until(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resumed run redoes the rest), rewritten atomically."""
        kept = [row for row in self.metrics() if row["step"] <= step]
        atomic_write_text(self / self.METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    def open_metrics(self):
        """The metrics file, opened for appending one line per record."""
        return open(self / self.METRICS, "a")

    # --------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, state: dict, cfg: Config) -> None:
        """Write the training state atomically, with the config hash and a content digest."""
        wrapped = {"format": CHECKPOINT_FORMAT, "version": VERSION,
                   "config_sha256": config_hash(cfg), "sha256": state_digest(state),
                   "state": state}  # fmt: skip
        with atomic_write(self / self.CHECKPOINT) as f:
            torch.save(wrapped, f)

    def load_checkpoint(self, cfg: Config | None = None) -> dict:
        """The saved training state, checked: readable, ours, of ``cfg`` (if given), intact."""
        path = self / self.CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: not a readable checkpoint (truncated, corrupted or "
                             f"not written by lipschitz): {first}") from None  # fmt: skip
        if isinstance(saved, dict) and "model" in saved and "format" not in saved:
            return saved  # written before checkpoints carried a digest
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a lipschitz checkpoint")
        if cfg is not None and saved["config_sha256"] != config_hash(cfg):
            raise ValueError(f"{path}: the checkpoint belongs to a different config than "
                             f"{self / self.CONFIG}")  # fmt: skip
        if state_digest(saved["state"]) != saved["sha256"]:
            raise ValueError(f"{path}: corrupted (its contents do not match their SHA-256)")
        return saved["state"]
