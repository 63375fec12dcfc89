"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): an in-context lookup
task generated on the fly, no download.

A sequence of ``seq_len`` tokens holds N key→value pairs, then queries:

    k₁ v₁ k₂ v₂ … k_N v_N q₁ q₂ … q_M        (M = seq_len − 2N)

Keys are N distinct tokens of a key alphabet [0, V), values any tokens of a separate value
alphabet [V, 2V), each query one of the sequence's N keys. The target at a query is its key's
value; every other position has the target IGNORE, so the loss and the accuracy count the
queries only. Chance is 1/V (a guess among the values); a model that cannot look a key up
by its content does no better, since which value belongs to the query depends on where the
query's key sits in this sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

IGNORE = -100  # torch's cross_entropy ignore_index: positions that are not queries
VAL_SEED = 20231208  # the validation sequences are the same for every run of a shape
VAL_SEQUENCES = 1024


def recall_batch(
    n: int, seq_len: int, pairs: int, vocab: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """n sequences x (n, seq_len) and targets y (n, seq_len), IGNORE except at the queries."""
    keys = torch.rand(n, vocab, generator=generator).argsort(dim=1)[:, :pairs]  # distinct
    values = vocab + torch.randint(vocab, (n, pairs), generator=generator)  # (n, N)
    n_queries = seq_len - 2 * pairs
    which = torch.randint(pairs, (n, n_queries), generator=generator)  # (n, M)
    x = torch.empty(n, seq_len, dtype=torch.long)
    x[:, 0 : 2 * pairs : 2], x[:, 1 : 2 * pairs : 2] = keys, values
    x[:, 2 * pairs :] = keys.gather(1, which)
    y = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    y[:, 2 * pairs :] = values.gather(1, which)
    return x, y


class RecallTask:
    """The training loop's task for ``dataset="recall"`` (see lipschitz.data.tasks)."""

    eval_batch_size = 128

    def __init__(self, seq_len: int, pairs: int, vocab: int) -> None:
        if not 0 < pairs <= vocab or not 2 * pairs < seq_len:
            raise ValueError(
                f"recall needs 0 < pairs <= vocab and 2·pairs < seq_len, got pairs={pairs}, "
                f"vocab={vocab}, seq_len={seq_len}"
            )
        self.seq_len, self.pairs, self.key_vocab = seq_len, pairs, vocab
        self.n_outputs, self.n_inputs, self.tokens_per_example = 2 * vocab, None, seq_len
        self.vocab = None  # token ids, not characters
        self.source = (
            f"recall (generated: {pairs} pairs, {vocab} keys and values, {seq_len} tokens)"
        )
        gen = torch.Generator().manual_seed(VAL_SEED)
        self.val = recall_batch(VAL_SEQUENCES, seq_len, pairs, vocab, gen)

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return recall_batch(n, self.seq_len, self.pairs, self.key_vocab, generator)

    def val_batches(self, rank: int = 0, world: int = 1, protocol: str | None = None) -> Iterator:
        """The fixed validation sequences; this rank takes every world-th batch."""
        x, y = self.val
        n = self.eval_batch_size
        batches = list(zip(x.split(n), y.split(n), strict=True))
        return iter(batches[rank::world])

    def probe(self) -> Tensor:
        return self.val[0][:1]  # (1, T)
