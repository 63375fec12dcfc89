"""GPT-2 tokens: the tokenizer, token shards in modded-nanogpt's ``.bin`` layout, and ``prepare``.

Shard layout (modded-nanogpt, the FineWeb10B GPT-2 shards): a header of 256 little-endian int32
``[20240520, 1, n_tokens, 0, ...]`` (1024 bytes), then ``n_tokens`` little-endian uint16 token
ids. A shard folder holds ``*_train_NNNNNN.bin`` and ``*_val_NNNNNN.bin`` files, e.g.
modded-nanogpt's ``fineweb_train_000001.bin`` ... and ``fineweb_val_000000.bin``, which are read
unchanged. Documents are delimited by ``<|endoftext|>`` (50256) *before* each document.

The tokenizer is ``tiktoken``'s byte-level BPE built offline from OpenAI's ``encoder.json`` and
``vocab.bpe`` (``gpt2_bpe/`` in the data directory, else a verified download into the cache).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipschitz.data.files import fetch, resolve_data_dir
from lipschitz.fileio import atomic_write, atomic_write_text

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
EOT = 50256  # <|endoftext|>
GPT2_VOCAB = 50257
# GPT-2's pre-tokenizer split (the pattern tiktoken uses for its "gpt2" encoding)
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
BPE_FILES = {  # relative path in the data directory -> (url, sha256)
    "gpt2_bpe/encoder.json": (
        _BPE_URL + "encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    "gpt2_bpe/vocab.bpe": (
        _BPE_URL + "vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
}


# --------------------------------------------------------------------------------------------
# Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map byte → printable character used in ``encoder.json``/``vocab.bpe``.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (control characters, space,
    ...) map, in byte order, to the characters 256, 257, ...
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def gpt2_ranks(encoder_json: str | Path, vocab_bpe: str | Path) -> dict[bytes, int]:
    """Mergeable ranks (token bytes → id) from OpenAI's files, checked against the merges.

    ``encoder.json`` maps each token, written in GPT-2's byte characters, to its id; tiktoken
    needs the ids to be the merge priorities, so every merge ``a b`` on line i of ``vocab.bpe``
    must produce the token with id 256 + i. Raises ValueError if the files disagree.
    """
    decode = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        return bytes(decode[c] for c in token)

    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    ranks = {to_bytes(tok): i for tok, i in encoder.items() if tok != "<|endoftext|>"}
    merges = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]  # line 0: a version tag
    merges = [line.split() for line in merges if line.strip()]
    if len(ranks) != 256 + len(merges) or encoder.get("<|endoftext|>") != EOT:
        raise ValueError(
            f"{encoder_json}, {vocab_bpe}: {len(ranks)} tokens and {len(merges)} merges do not "
            "form the GPT-2 vocabulary (expected 256 bytes + 50000 merges and <|endoftext|> = "
            f"{EOT})"
        )
    for i, (a, b) in enumerate(merges):
        if ranks.get(to_bytes(a) + to_bytes(b)) != 256 + i:
            raise ValueError(f"{vocab_bpe}: merge {i} ({a!r} {b!r}) disagrees with encoder.json")
    return ranks


@functools.lru_cache(maxsize=4)
def _encoding(encoder_json: str, vocab_bpe: str):
    import tiktoken

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=gpt2_ranks(encoder_json, vocab_bpe),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=GPT2_VOCAB,
    )


def gpt2_tokenizer(data_dir: str | Path | None = None):
    """GPT-2's BPE as a ``tiktoken.Encoding``, built offline from the data directory's
    ``gpt2_bpe/`` files (else downloaded once, sha256-checked, into the cache).

    ``gpt2_tokenizer().encode("Hello world") == [15496, 995]``.
    """
    paths = [fetch(rel, url, sha, data_dir) for rel, (url, sha) in BPE_FILES.items()]
    return _encoding(str(paths[0]), str(paths[1]))


TOKENIZERS = {"gpt2": gpt2_tokenizer}


# --------------------------------------------------------------------------------------------
# Shards


def write_shard(path: str | Path, tokens: np.ndarray | list[int]) -> Path:
    """Write tokens as one ``.bin`` shard, atomically (a temporary file, then a rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(
            f"write_shard: token ids must be in [0, 65535] to fit uint16, got range "
            f"[{tokens.min()}, {tokens.max()}]"
        )
    if tokens.size >= 2**31:
        raise ValueError(f"write_shard: {tokens.size} tokens do not fit one shard's int32 count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    return path


def read_shard(path: str | Path) -> np.memmap:
    """The tokens of one ``.bin`` shard as a read-only uint16 memmap (nothing is loaded).

    Raises ValueError naming the problem for a bad magic number, an unknown version or a file
    whose size does not match the token count in its header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such shard file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: truncated: {size} bytes, shorter than the 1024-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: bad magic number {header[0]} (a token shard starts {MAGIC})")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {what}: the header announces {n_tokens} tokens ({expected} bytes), the "
            f"file has {size} bytes"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def shard_paths(folder: str | Path, split: str) -> list[Path]:
    """The ``*_{split}_*.bin`` shards of a folder, sorted by name."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return sorted(Path(folder).glob(f"*_{split}_*.bin"))


def resolve_token_dir(token_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """The shard folder: an absolute path as is; a relative one in the data directory
    (``--data-dir`` / ``$LIPSCHITZ_DATA_DIR``) if it is there, else in the working directory."""
    path = Path(token_dir).expanduser()
    candidates = [path]
    root = resolve_data_dir(data_dir)
    if not path.is_absolute() and root is not None:
        candidates.insert(0, root / path)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"token_dir {str(token_dir)!r}: no such folder (looked in "
        f"{', '.join(str(c.absolute()) for c in candidates)}); make the shards with `lipschitz "
        "prepare TEXT_FILES... --out DIR`, or point --set token_dir=DIR / --data-dir at them"
    )


@dataclass
class TokenShards:
    """The shards of one split, read lazily: ``len``, and windows of consecutive tokens.

    A window never crosses a shard boundary (as in modded-nanogpt, shards are independent).
    With ``vocab_size`` set, every window read is checked to hold ids below it: a shard of
    another tokenizer would otherwise index past the embedding (a CUDA assert, or garbage).
    """

    paths: list[Path]
    shards: list[np.ndarray]
    vocab_size: int | None = None

    @classmethod
    def open(cls, folder: str | Path, split: str, vocab_size: int | None = None) -> TokenShards:
        """The ``split`` shards of ``folder``; ``vocab_size``: the model's vocabulary, if the
        windows should be checked against it."""
        paths = shard_paths(folder, split)
        if not paths:
            raise FileNotFoundError(
                f"no {split} shards (*_{split}_*.bin) in {folder}; make them with "
                "`lipschitz prepare TEXT_FILES... --out DIR`"
            )
        return cls(paths, [read_shard(p) for p in paths], vocab_size)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def n_starts(self, length: int) -> np.ndarray:
        """Number of windows of ``length`` tokens that start in each shard."""
        return np.array([max(len(s) - length + 1, 0) for s in self.shards], dtype=np.int64)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Windows (B, length) at global window indices ``starts`` (0 ≤ start < sum(n_starts)):
        index i is the i-th window start, counting shard by shard."""
        counts = self.n_starts(length)
        bounds = np.cumsum(counts)
        if len(starts) and (starts.min() < 0 or starts.max() >= bounds[-1]):
            raise IndexError(f"window index out of range [0, {bounds[-1]})")
        which = np.searchsorted(bounds, starts, side="right")
        offsets = starts - (bounds[which] - counts[which])
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, (s, o) in enumerate(zip(which, offsets, strict=True)):
            out[row] = self.shards[s][o : o + length]
        if self.vocab_size is not None and out.size and out.max() >= self.vocab_size:
            row = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            col = int(np.argmax(out[row] >= self.vocab_size))
            raise ValueError(
                f"{self.paths[which[row]]}: token id {out[row, col]} at token {offsets[row] + col}"
                f" is outside the vocabulary of {self.vocab_size} ids (a shard of another "
                "tokenizer? raise vocab_size or re-make the shards)"
            )
        return out


# --------------------------------------------------------------------------------------------
# Preparing shards from text files


def prepare(
    text_files: list[str | Path],
    out: str | Path,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.1,
    shard_tokens: int = 100_000_000,
    name: str = "tokens",
    data_dir: str | Path | None = None,
) -> dict:
    """Tokenize text files into ``out/{name}_{train,val}_NNNNNN.bin`` shards; returns a summary.

    Every file is one document, preceded by ``<|endoftext|>``. The validation split is the
    last ``val_fraction`` of every document's tokens (so each file is represented in both
    splits); that tail starts with its own ``<|endoftext|>``. Shards hold at most
    ``shard_tokens`` tokens (modded-nanogpt: 10⁸). ``out/prepare.json`` records the files, their
    sizes and the token counts.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; known: {sorted(TOKENIZERS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not shard_tokens > 0:
        raise ValueError(f"shard_tokens must be > 0, got {shard_tokens!r}")
    check_shard_name(name)
    if not text_files:
        raise ValueError("prepare: no text files given")
    missing = [str(f) for f in text_files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"prepare: no such text files: {', '.join(missing)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = shard_paths(out, "train") + shard_paths(out, "val")
    if stale:
        raise FileExistsError(f"{out} already holds shards ({stale[0].name}, ...); pick another")
    enc = TOKENIZERS[tokenizer](data_dir)

    splits, documents = _split_documents(text_files, enc, val_fraction)
    counts = {}
    for split, docs in splits.items():
        stream = np.concatenate(docs)
        counts[f"{split}_tokens"] = len(stream)
        for i, lo in enumerate(range(0, len(stream), shard_tokens)):
            write_shard(out / f"{name}_{split}_{i:06d}.bin", stream[lo : lo + shard_tokens])
    summary = {
        "tokenizer": tokenizer,
        "vocab_size": GPT2_VOCAB,
        "eot": EOT,
        "val_fraction": val_fraction,
        "documents": documents,
        **counts,
    }
    atomic_write_text(out / "prepare.json", json.dumps(summary, indent=2))
    return summary


def _split_documents(
    text_files: list[str | Path], enc, val_fraction: float
) -> tuple[dict[str, list[np.ndarray]], list[dict]]:
    """Tokenize each file into an ``<|endoftext|>``-led train head and val tail; also returns
    one summary dict per document."""
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    documents = []
    for path in text_files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"prepare: {path} is not UTF-8 text ({err})") from None
        tokens = np.array(enc.encode_ordinary(text), np.uint16)
        n_val = round(len(tokens) * val_fraction)
        cut = len(tokens) - n_val
        splits["train"].append(np.concatenate([[EOT], tokens[:cut]]).astype(np.uint16))
        splits["val"].append(np.concatenate([[EOT], tokens[cut:]]).astype(np.uint16))
        documents.append({"file": str(path), "tokens": len(tokens), "val_tokens": n_val})
    return splits, documents


def check_shard_name(name: str) -> None:
    """Refuse a shard prefix that is not a plain file-name stem: a path (``../x``, ``a/b``)
    would write outside ``--out``, and one containing ``_train``/``_val`` would make one
    split's shards match the other split's pattern."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(
            f"prepare: name {name!r} must be a plain file-name prefix: letters, digits, '.', "
            "'_' or '-', starting with a letter or digit (no path separators)"
        )
    if ".." in name:
        raise ValueError(f"prepare: name {name!r} must not contain '..'")
    for split, other in (("train", "val"), ("val", "train")):
        if fnmatch.fnmatchcase(f"{name}_{split}_000000.bin", f"*_{other}_*.bin"):
            raise ValueError(
                f"prepare: name {name!r} would make its {split} shards look like {other} ones"
            )
