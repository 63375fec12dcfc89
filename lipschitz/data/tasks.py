"""Tasks: what a training run learns from, behind one small interface.

A task gives the training loop

- ``batch(n, generator)``: a random training batch (x, y) on the CPU;
- ``val_batches(rank, world, protocol)``: this rank's share of the validation batches;
- ``probe()``: a fixed input for activation statistics;
- ``n_outputs``, ``n_inputs``, ``tokens_per_example``, ``vocab`` (characters, or None), ``source``.

Four tasks: next-character prediction on Tiny Shakespeare (:class:`CharTask`), next-token
prediction on GPT-2 token shards (:class:`TokenTask`), in-context associative recall
(:class:`~lipschitz.data.recall.RecallTask`) and image classification (:class:`ImageTask`).
The model never sees a task; the loop moves batches to the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from lipschitz.config import Config
from lipschitz.data import shakespeare
from lipschitz.data.images import IMAGE_SHAPES, N_CLASSES, augment
from lipschitz.data.images import LOADERS as IMAGE_LOADERS
from lipschitz.data.recall import RecallTask
from lipschitz.data.tokens import GPT2_VOCAB, TokenShards, gpt2_tokenizer, resolve_token_dir

Batch = tuple[Tensor, Tensor]

EVAL_PROTOCOLS = ("full", "paper")


def windows(data: Tensor, starts: Tensor, seq_len: int) -> Batch:
    """Windows at ``starts``: inputs x (B, T) and their next-token targets y (B, T)."""
    w = data[starts[:, None] + torch.arange(seq_len + 1)]  # (B, T + 1)
    return w[:, :-1], w[:, 1:]


def sample_batch(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
    """Random windows: x (B, T) and the next-token targets y (B, T)."""
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    return windows(data, starts, seq_len)


def eval_windows(n_tokens: int, seq_len: int, protocol: str, batch_size: int) -> Tensor:
    """Start offsets of the validation windows.

    ``full``: every non-overlapping window of the whole validation split — each position is
    predicted once. ``paper``: the released code's protocol, windows at every offset (stride 1)
    from 0 to batch_size·20 − 1 — only the first ~1.5K characters of the split at batch 64.
    """
    if protocol == "full":
        return torch.arange(0, n_tokens - seq_len, seq_len)
    if protocol == "paper":
        return torch.arange(0, min(batch_size * 20, n_tokens - seq_len))
    raise ValueError(f"eval_protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")


class CharTask:
    """Next-character prediction on Tiny Shakespeare: windows of seq_len characters."""

    eval_batch_size = 64  # windows per validation batch

    def __init__(self, cfg: Config) -> None:
        self.corpus = shakespeare.load(cfg.data_dir)
        self.seq_len, self.protocol = cfg.seq_len, cfg.eval_protocol
        self.batch_size = cfg.batch_size  # the paper protocol's window count depends on it
        self.vocab = self.corpus.chars
        self.n_outputs, self.n_inputs, self.tokens_per_example = len(self.vocab), None, cfg.seq_len
        self.source = self.corpus.source

    def batch(self, n: int, generator: torch.Generator) -> Batch:
        return sample_batch(self.corpus.train, n, self.seq_len, generator)

    def val_batches(self, rank: int = 0, world: int = 1, protocol: str | None = None) -> Iterator:
        """Validation windows under ``protocol`` (default: the run's eval_protocol); this rank
        scores every world-th window."""
        val = self.corpus.val
        starts = eval_windows(len(val), self.seq_len, protocol or self.protocol, self.batch_size)
        for chunk in starts[rank::world].split(self.eval_batch_size):
            yield windows(val, chunk, self.seq_len)

    def probe(self) -> Tensor:
        return self.corpus.val[: self.seq_len][None]  # (1, T)


class ImageTask:
    """Image classification (CIFAR-10, MNIST): flattened pixels in [0, 1], 10 classes."""

    eval_batch_size = 1000

    def __init__(self, cfg: Config) -> None:
        self.data = IMAGE_LOADERS[cfg.dataset](cfg.data_dir)
        self.vocab = None
        self.n_outputs, self.n_inputs = self.data.n_classes, self.data.n_features
        self.tokens_per_example = 1
        self.source = cfg.dataset
        self.shape = IMAGE_SHAPES[cfg.dataset]
        self.augment, self.augment_pad = cfg.augment, cfg.augment_pad

    def batch(self, n: int, generator: torch.Generator) -> Batch:
        """n random training images (randomly cropped, with ``augment_pad`` pixels of zero
        padding, and flipped with ``augment``)."""
        idx = torch.randint(len(self.data.y_train), (n,), generator=generator)
        x = self.data.x_train[idx]
        if self.augment:
            x = augment(x, self.shape, generator, pad=self.augment_pad)
        return x, self.data.y_train[idx]

    def val_batches(self, rank: int = 0, world: int = 1, protocol: str | None = None) -> Iterator:
        """The whole test split in batches of 1000; this rank takes every world-th batch."""
        n = self.eval_batch_size
        xs, ys = self.data.x_test.split(n), self.data.y_test.split(n)
        return iter(list(zip(xs, ys, strict=True))[rank::world])

    def probe(self) -> Tensor:
        return self.data.x_test[:256]


class TokenTask:
    """Next-token prediction on GPT-2 token shards (``lipschitz prepare``, FineWeb10B).

    Training windows start anywhere in the concatenated train shards (read through memmaps,
    never loaded whole). Validation uses non-overlapping windows of the val shards, each
    position predicted once: all of them, or ``val_tokens // seq_len`` windows spread evenly
    over the split.
    """

    eval_batch_tokens = 8192  # tokens per evaluation batch (logits are batch × vocab floats)

    def __init__(self, cfg: Config) -> None:
        folder = resolve_token_dir(cfg.token_dir, cfg.data_dir)
        self.n_outputs = cfg.vocab_size or GPT2_VOCAB
        self.train = TokenShards.open(folder, "train", vocab_size=self.n_outputs)
        self.val = TokenShards.open(folder, "val", vocab_size=self.n_outputs)
        self.seq_len = cfg.seq_len
        self.n_train_starts = int(self.train.n_starts(cfg.seq_len + 1).sum())
        if self.n_train_starts == 0:
            raise ValueError(f"{folder}: no train shard holds a window of seq_len+1 tokens")
        # non-overlapping validation windows, as indices into val.windows' start numbering
        counts = self.val.n_starts(cfg.seq_len + 1)
        bases = np.cumsum(counts) - counts
        starts = np.concatenate(
            [b + np.arange(0, c, cfg.seq_len) for b, c in zip(bases, counts, strict=True)]
        )
        if len(starts) == 0:
            raise ValueError(f"{folder}: no val shard holds a window of seq_len+1 tokens")
        if cfg.val_tokens is not None and cfg.val_tokens // cfg.seq_len < len(starts):
            n = cfg.val_tokens // cfg.seq_len
            starts = starts[np.arange(n) * len(starts) // n]  # evenly spread over the split
        self.val_starts = starts
        self.vocab, self.n_inputs, self.tokens_per_example = None, None, cfg.seq_len
        self.source = str(folder)

    def _windows(self, shards: TokenShards, starts: np.ndarray) -> Batch:
        w = torch.from_numpy(shards.windows(starts, self.seq_len + 1))  # (B, T + 1)
        return w[:, :-1], w[:, 1:]

    def batch(self, n: int, generator: torch.Generator) -> Batch:
        starts = torch.randint(self.n_train_starts, (n,), generator=generator)
        return self._windows(self.train, starts.numpy())

    def val_batches(self, rank: int = 0, world: int = 1, protocol: str | None = None) -> Iterator:
        """This rank's share (every world-th window) in batches of ~8K tokens."""
        mine = self.val_starts[rank::world]
        per_batch = max(1, self.eval_batch_tokens // self.seq_len)
        for i in range(0, len(mine), per_batch):
            yield self._windows(self.val, mine[i : i + per_batch])

    def probe(self) -> Tensor:
        return self._windows(self.val, self.val_starts[:1])[0]  # (1, T)


Task = CharTask | TokenTask | ImageTask | RecallTask
Codec = tuple[Callable[[str], list[int]], Callable[[list[int]], str]]


def _chars(cfg: Config, vocab: list[str] | None, data_dir: str | None) -> Codec:
    if vocab is None:
        raise ValueError("a character-level run needs its vocab.json to encode text")
    return partial(shakespeare.encode_chars, vocab), partial(shakespeare.decode_chars, vocab)


def _gpt2(cfg: Config, vocab: list[str] | None, data_dir: str | None) -> Codec:
    enc = gpt2_tokenizer(data_dir or cfg.data_dir)

    def decode(ids: list[int]) -> str:
        return enc.decode([i for i in ids if i < enc.n_vocab])  # padded vocabularies

    return partial(enc.encode, allowed_special="all"), decode


def _char_sizes(cfg: Config, vocab: list[str] | None) -> tuple[int, int | None]:
    if vocab is None:
        raise ValueError("a character-level run needs its vocab.json")
    return len(vocab), None


@dataclass(frozen=True)
class TaskKind:
    """What a ``dataset`` name means: how to make its task, what the model reads (``inputs``:
    "tokens" or "images"; the model must read the same), the model's sizes without loading the
    data (for run directories written before run.json recorded them), its text codec and
    sampling prompt (None: no text to sample), the config keys only some datasets read, and a
    check of the config that this dataset needs (a ValueError naming the keys)."""

    make: Callable[[Config], Task]
    inputs: str
    sizes: Callable[[Config, list[str] | None], tuple[int, int | None]]
    codec: Callable[[Config, list[str] | None, str | None], Codec] | None = None
    prompt: str | None = None
    keys: tuple[str, ...] = ()
    check: Callable[[Config], None] | None = None


def _recall(cfg: Config) -> RecallTask:
    return RecallTask(cfg.seq_len, cfg.recall_pairs, cfg.recall_vocab)


def _check_recall(cfg: Config) -> None:
    if not 2 * cfg.recall_pairs < cfg.seq_len:
        raise ValueError(
            f"config: dataset 'recall' needs seq_len > 2·recall_pairs (the pairs, then at least "
            f"one query), got seq_len={cfg.seq_len}, recall_pairs={cfg.recall_pairs}"
        )
    if cfg.recall_pairs > cfg.recall_vocab:
        raise ValueError(
            f"config: recall_pairs={cfg.recall_pairs} distinct keys need recall_vocab >= "
            f"recall_pairs, got recall_vocab={cfg.recall_vocab}"
        )


def _check_tokens(cfg: Config) -> None:
    if not cfg.token_dir:
        raise ValueError(
            "config: dataset 'tokens' needs token_dir=FOLDER of *_train_*.bin / *_val_*.bin "
            "shards (make them with `lipschitz prepare TEXT_FILES... --out FOLDER`)"
        )


def _image_sizes(cfg: Config, vocab: list[str] | None) -> tuple[int, int | None]:
    return N_CLASSES, math.prod(IMAGE_SHAPES[cfg.dataset])


# the image classifiers' training options (lipschitz.training.loop)
IMAGE_KEYS = ("margin_eps", "augment", "augment_pad")

TASKS: dict[str, TaskKind] = {
    "shakespeare": TaskKind(CharTask, "tokens", _char_sizes, _chars, prompt="\n"),
    "tokens": TaskKind(TokenTask, "tokens", lambda cfg, vocab: (cfg.vocab_size or GPT2_VOCAB, None),
                       _gpt2, prompt="<|endoftext|>", check=_check_tokens),
    "recall": TaskKind(_recall, "tokens", lambda cfg, vocab: (2 * cfg.recall_vocab, None),
                       check=_check_recall),
    "cifar10": TaskKind(ImageTask, "images", _image_sizes, keys=IMAGE_KEYS),
    "mnist": TaskKind(ImageTask, "images", _image_sizes, keys=IMAGE_KEYS),
}  # fmt: skip


def model_sizes(cfg: Config, vocab: list[str] | None) -> tuple[int, int | None]:
    """(n_outputs, n_inputs) of a run's model without loading its data."""
    return TASKS[cfg.dataset].sizes(cfg, vocab)


def make_task(cfg: Config) -> Task:
    """The task of ``cfg.dataset``."""
    return TASKS[cfg.dataset].make(cfg)


def text_codec(cfg: Config, vocab: list[str] | None, data_dir: str | None = None) -> Codec:
    """(encode, decode) between text and the token ids of a text run: its characters
    (``vocab``, from the run directory) or GPT-2 tokens (the BPE files in the data dir)."""
    codec = TASKS[cfg.dataset].codec
    if codec is None:
        raise ValueError(f"a {cfg.dataset} run has no text to sample")
    return codec(cfg, vocab, data_dir)
