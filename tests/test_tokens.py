"""GPT-2 tokens: the offline tokenizer, the .bin shard format, prepare, and windows over shards."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from lipschitz.data import tokens as tk

DATA_DIR = os.environ.get("LIPSCHITZ_DATA_DIR")
needs_bpe = pytest.mark.skipif(
    not DATA_DIR or not Path(DATA_DIR, "gpt2_bpe/encoder.json").exists(),
    reason="needs LIPSCHITZ_DATA_DIR with gpt2_bpe/",
)
MOBY = (
    "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about "
    "a little and see the watery part of the world. It is a way I have of driving off the "
    "spleen, and regulating the circulation.\n\n  Whenever I find myself growing grim about "
    "the mouth; whenever it is a damp, drizzly November in my soul... I'm 1,000 times sure "
    "they've   gone!\t“Quoted” café naïve 日本語 🙂"
)


@needs_bpe
def test_gpt2_tokenizer_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("LIPSCHITZ_CACHE_DIR", str(tmp_path / "empty-cache"))  # data dir only
    enc = tk.gpt2_tokenizer(DATA_DIR)
    # GPT-2's ids of the single-token words "Hello" and " world" (Ġ = space), read from the file
    encoder = json.loads(Path(DATA_DIR, "gpt2_bpe/encoder.json").read_text())
    assert [encoder["Hello"], encoder["Ġworld"]] == [15496, 995]
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == tk.EOT
    ids = enc.encode_ordinary(MOBY)
    assert enc.decode(ids) == MOBY and max(ids) < 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tk.EOT]
    assert not (tmp_path / "empty-cache").exists()  # nothing was downloaded


def test_bytes_to_unicode_is_a_printable_bijection():
    m = tk.bytes_to_unicode()
    assert sorted(m) == list(range(256)) and len(set(m.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in m.values())
    assert m[ord("A")] == "A" and m[ord(" ")] == "Ġ"  # GPT-2 writes a space as Ġ


def test_ranks_must_agree_with_the_merges(tmp_path):
    chars = tk.bytes_to_unicode()
    encoder = {chars[b]: i for i, b in enumerate(range(256))}
    encoder["ab"] = 256
    encoder["<|endoftext|>"] = tk.EOT
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\n")
    ranks = tk.gpt2_ranks(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert ranks[b"ab"] == 256 and ranks[b"\x00"] == 0 and len(ranks) == 257
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nb a\n")
    with pytest.raises(ValueError, match=r"disagrees with encoder\.json"):
        tk.gpt2_ranks(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_shard_layout_round_trip_and_errors(tmp_path):
    toks = np.array([tk.EOT, 0, 1, 65535, 15496, 995], dtype=np.int64)
    path = tk.write_shard(tmp_path / "x_train_000000.bin", toks)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(toks)
    assert struct.unpack("<3i", raw[:12]) == (20240520, 1, len(toks))
    assert raw[12:1024] == bytes(1012)  # the rest of the header is zero
    assert struct.unpack(f"<{len(toks)}H", raw[1024:]) == tuple(toks)
    got = tk.read_shard(path)
    assert got.dtype == np.uint16 and np.array_equal(got, toks)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically

    with pytest.raises(ValueError, match=r"\[0, 65535\]"):
        tk.write_shard(tmp_path / "big.bin", [1, 65536])
    with pytest.raises(ValueError, match=r"\[0, 65535\]"):
        tk.write_shard(tmp_path / "neg.bin", [-1])
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<3i", 1234, 1, 0) + bytes(1012))
    with pytest.raises(ValueError, match="bad magic number 1234"):
        tk.read_shard(bad)
    bad.write_bytes(struct.pack("<3i", 20240520, 7, 0) + bytes(1012))
    with pytest.raises(ValueError, match="unsupported shard version 7"):
        tk.read_shard(bad)
    bad.write_bytes(raw[:-2])
    with pytest.raises(ValueError, match=r"truncated.*announces 6 tokens"):
        tk.read_shard(bad)
    bad.write_bytes(raw[:100])
    with pytest.raises(ValueError, match="truncated"):
        tk.read_shard(bad)
    bad.write_bytes(raw + b"\x00\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        tk.read_shard(bad)


def test_windows_index_every_start_once_and_stay_inside_a_shard(tmp_path):
    tk.write_shard(tmp_path / "d_train_000000.bin", np.arange(10))
    tk.write_shard(tmp_path / "d_train_000001.bin", np.arange(100, 106))
    tk.write_shard(tmp_path / "d_val_000000.bin", np.arange(3))
    shards = tk.TokenShards.open(tmp_path, "train")
    assert len(shards) == 16 and shards.paths[0].name == "d_train_000000.bin"
    assert list(shards.n_starts(4)) == [7, 3]
    w = shards.windows(np.arange(10), 4)
    assert w[0].tolist() == [0, 1, 2, 3] and w[6].tolist() == [6, 7, 8, 9]
    assert w[7].tolist() == [100, 101, 102, 103] and w[9].tolist() == [102, 103, 104, 105]
    with pytest.raises(IndexError):
        shards.windows(np.array([10]), 4)
    with pytest.raises(FileNotFoundError, match="no val shards"):
        tk.TokenShards.open(tmp_path / "nowhere", "val")


@needs_bpe
def test_prepare_writes_documents_delimited_by_endoftext(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(MOBY)
    b.write_text("Hello world. " * 50)
    summary = tk.prepare([a, b], tmp_path / "out", val_fraction=0.2, shard_tokens=100,
                         data_dir=DATA_DIR)  # fmt: skip
    enc = tk.gpt2_tokenizer(DATA_DIR)
    train = np.concatenate([tk.read_shard(p) for p in tk.shard_paths(tmp_path / "out", "train")])
    val = np.concatenate([tk.read_shard(p) for p in tk.shard_paths(tmp_path / "out", "val")])
    assert len(tk.shard_paths(tmp_path / "out", "train")) == -(-len(train) // 100)  # ≤100 each
    n_a, n_b = (len(enc.encode_ordinary(t)) for t in (MOBY, "Hello world. " * 50))
    assert summary["train_tokens"] + summary["val_tokens"] == n_a + n_b + 4  # one EOT per piece
    # each document (and each validation tail) starts with <|endoftext|>
    train_docs = enc.decode(train.tolist()).split("<|endoftext|>")
    val_docs = enc.decode(val.tolist()).split("<|endoftext|>")
    assert train_docs[0] == "" and val_docs[0] == "" and len(train_docs) == len(val_docs) == 3
    assert train_docs[1] + val_docs[1] == MOBY
    assert train_docs[2] + val_docs[2] == "Hello world. " * 50
    assert summary["documents"][0]["val_tokens"] == round(0.2 * n_a)
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["eot"] == tk.EOT
    with pytest.raises(FileExistsError, match="already holds shards"):
        tk.prepare([a], tmp_path / "out", data_dir=DATA_DIR)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        tk.prepare([tmp_path / "missing.txt"], tmp_path / "other", data_dir=DATA_DIR)
