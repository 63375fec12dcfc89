"""CIFAR-10 and MNIST: data directory, or a verified download (served here by file:// URLs)."""

import gzip
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lipschitz.data import images
from lipschitz.data.files import md5_of

DATA_DIR = os.environ.get("LIPSCHITZ_DATA_DIR")


def _needs(relpath: str):
    return pytest.mark.skipif(
        not DATA_DIR or not Path(DATA_DIR, relpath).exists(),
        reason=f"needs LIPSCHITZ_DATA_DIR with {relpath}",
    )


@pytest.fixture
def no_data(tmp_path, monkeypatch) -> Path:
    """An empty data directory and an empty cache: only a download can provide the files."""
    monkeypatch.setenv("LIPSCHITZ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LIPSCHITZ_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


@_needs("mnist/train-images-idx3-ubyte.gz")
def test_mnist_downloads_verify_decompressed_content(tmp_path, monkeypatch, no_data):
    reference = images.load_mnist(DATA_DIR)
    assert reference.x_train.shape == (60000, 784) and reference.x_test.shape == (10000, 784)
    assert reference.x_train.min() == 0 and reference.x_train.max() == 1
    # MNIST's published test-set class counts for the digits 0, 1, 2
    assert torch.bincount(reference.y_test).tolist()[:3] == [980, 1135, 1032]

    monkeypatch.setattr(images, "MNIST_URL", Path(DATA_DIR, "mnist").as_uri() + "/")
    downloaded = images.load_mnist(no_data)
    assert torch.equal(downloaded.x_train, reference.x_train)
    assert torch.equal(downloaded.y_test, reference.y_test)
    assert (tmp_path / "cache/mnist/t10k-labels-idx1-ubyte.gz").is_file()

    # A file whose decompressed content differs is refused, naming the file.
    bad = no_data / "mnist"
    bad.mkdir()
    for name, _ in images.MNIST_FILES.values():
        shutil.copy(Path(DATA_DIR, "mnist", name), bad / name)
    with gzip.open(bad / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: decompressed md5"):
        images.load_mnist(no_data)


def _canonical_archive(arrays: dict, path: Path) -> None:
    """Write arrays in the layout of cifar-10-python.tar.gz: pickled dicts of R,G,B planes."""

    def batch(x: np.ndarray, y: np.ndarray) -> bytes:
        data = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # (N, 3·32·32), channel planes
        return pickle.dumps({b"data": data, b"labels": y.tolist(), b"batch_label": b"x"})

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        parts = {f"data_batch_{i + 1}": slice(10000 * i, 10000 * (i + 1)) for i in range(5)}
        files = {name: batch(arrays["x_train"][s], arrays["y_train"][s])
                 for name, s in parts.items()}  # fmt: skip
        files["test_batch"] = batch(arrays["x_test"], arrays["y_test"])
        for name, payload in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.slow
@_needs("cifar10/cifar10.npz")
def test_cifar10_archive_converts_pixel_exact(tmp_path, monkeypatch, no_data):
    with np.load(Path(DATA_DIR, images.CIFAR10_NPZ)) as d:
        arrays = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    assert images.arrays_sha256(arrays) == images.CIFAR10_ARRAYS_SHA256
    assert arrays["y_train"][:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    archive = tmp_path / "cifar-10-python.tar.gz"
    _canonical_archive(arrays, archive)
    monkeypatch.setattr(images, "CIFAR10_URL", archive.as_uri())

    monkeypatch.setattr(images, "CIFAR10_ARCHIVE_MD5", "0" * 32)
    with pytest.raises(ValueError, match="md5"):  # a wrong archive is never converted
        images.load_cifar10(no_data)
    assert not (tmp_path / "cache" / images.CIFAR10_CONVERTED).exists()

    monkeypatch.setattr(images, "CIFAR10_ARCHIVE_MD5", md5_of(archive))
    converted = images.cifar10_from_archive(no_data)
    assert converted == tmp_path / "cache" / images.CIFAR10_CONVERTED
    with np.load(converted) as d:
        assert images.arrays_sha256(d) == images.CIFAR10_ARRAYS_SHA256
    archive.unlink()  # now served from the cache, no download
    downloaded = images.load_cifar10(no_data)
    assert downloaded.x_test.shape == (10000, 3072)
    assert torch.equal(downloaded.x_test[0], torch.from_numpy(
        arrays["x_test"][0].reshape(-1).astype(np.float32) / 255))  # fmt: skip
