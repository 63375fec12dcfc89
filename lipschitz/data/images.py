"""Image classification data: CIFAR-10 and MNIST as float pixels in [0, 1].

CIFAR-10 is read from ``cifar10/cifar10.npz`` in a data directory (the layout of
``../shared/data``: ``x_train`` (50000, 32, 32, 3) uint8, ``y_train``, ``x_test``, ``y_test``,
verified by sha256). Without one, the canonical python archive is downloaded from the
authors' site (md5-verified, the only checksum they publish), converted once, checked against
the pixel content of the verified copy and cached. MNIST is read from the four IDX files
``mnist/*-ubyte.gz`` in the data directory or downloaded; either way the decompressed bytes
must match the canonical md5. Pixels are returned raw, scaled to [0, 1] and flattened: any
normalization belongs inside the model, so that attacks and certificates see the same inputs
a user feeds.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lipschitz.data.files import DatasetUnavailable, cache_dir, fetch, md5_of
from lipschitz.fileio import atomic_write

CIFAR10_NPZ = "cifar10/cifar10.npz"
CIFAR10_NPZ_SHA256 = "a44cc18e4ad961b5158c7da062a6232fb65938b615bf013046199b823b75c43d"
CIFAR10_ARCHIVE = "cifar10/cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # published with the archive
CIFAR10_CONVERTED = "cifar10/cifar10-from-archive.npz"
# sha256 of x_train, y_train, x_test, y_test bytes (C order) of the verified copy: a
# conversion of the archive must reproduce it pixel for pixel.
CIFAR10_ARRAYS_SHA256 = "80387ddb9a0edf3fc4a964ee3770296169bb26a651050df20035579673099660"

# (H, W, C) each dataset's images are flattened from (pixels in H, W, C order), and its classes
IMAGE_SHAPES = {"cifar10": (32, 32, 3), "mnist": (28, 28, 1)}
N_CLASSES = 10

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's mirror
MNIST_FILES = {  # key: (file under mnist/, md5 of the decompressed canonical IDX file)
    "train_x": ("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb"),
    "train_y": ("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624"),
    "test_x": ("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
    "test_y": ("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637"),
}


@dataclass
class ImageSplits:
    """Flattened float32 pixels in [0, 1] and int64 labels."""

    x_train: torch.Tensor  # (N, C·H·W)
    y_train: torch.Tensor  # (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int = N_CLASSES

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def _pixels(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(y.astype(np.int64))


def _md5_is(expected: str) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        got = md5_of(path)
        if got != expected:
            raise ValueError(f"{path}: md5 {got} does not match the expected {expected}")

    return check


def _gunzipped_md5_is(expected: str) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        with gzip.open(path, "rb") as f:
            got = hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        if got != expected:
            raise ValueError(f"{path}: decompressed md5 {got} does not match {expected}")

    return check


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in ("x_train", "y_train", "x_test", "y_test"):
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def read_cifar10_archive(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the canonical ``cifar-10-python.tar.gz`` (call only on a verified file:
    its batches are pickles). Each batch row is 3072 bytes: the R, G, B planes of 32×32."""
    batches = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name.startswith("data_batch_") or name == "test_batch":
                batches[name] = pickle.load(tar.extractfile(member), encoding="bytes")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = sorted(set([*names, "test_batch"]) - set(batches))
    if missing:
        raise ValueError(f"{path}: not the CIFAR-10 python archive (missing {missing})")

    def images(batch_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([np.asarray(batches[n][b"data"], np.uint8) for n in batch_names])
        y = np.concatenate([np.asarray(batches[n][b"labels"], np.uint8) for n in batch_names])
        return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y  # (N, 32, 32, 3)

    x_train, y_train = images(names)
    x_test, y_test = images(["test_batch"])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def cifar10_from_archive(data_dir: str | Path | None = None) -> Path:
    """The cached conversion of the canonical archive (downloaded if needed) to an npz."""
    converted = cache_dir() / CIFAR10_CONVERTED
    if converted.is_file():
        return converted
    archive = fetch(CIFAR10_ARCHIVE, CIFAR10_URL, sha256=None, data_dir=data_dir,
                    timeout_s=120.0, check=_md5_is(CIFAR10_ARCHIVE_MD5))  # fmt: skip
    arrays = read_cifar10_archive(archive)
    if arrays_sha256(arrays) != CIFAR10_ARRAYS_SHA256:
        raise ValueError(f"{archive}: its images differ from the canonical CIFAR-10 arrays")
    converted.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(converted) as f:
        np.savez(f, **arrays)
    return converted


def load_cifar10(data_dir: str | Path | None = None) -> ImageSplits:
    try:
        path = fetch(CIFAR10_NPZ, url=None, sha256=CIFAR10_NPZ_SHA256, data_dir=data_dir)
    except DatasetUnavailable:
        path = cifar10_from_archive(data_dir)
    with np.load(path) as d:
        arrays = {key: d[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    if path.name == Path(CIFAR10_CONVERTED).name and arrays_sha256(arrays) != CIFAR10_ARRAYS_SHA256:
        raise ValueError(f"{path}: not the canonical CIFAR-10 arrays; delete it to convert again")
    return ImageSplits(_pixels(arrays["x_train"]), _labels(arrays["y_train"]),
                       _pixels(arrays["x_test"]), _labels(arrays["y_test"]))  # fmt: skip


def augment(
    x: Tensor, shape: tuple[int, int, int], generator: torch.Generator, pad: int = 4
) -> Tensor:
    """Random crop of each image padded with ``pad`` zeros on every side, and a random
    horizontal flip (the standard CIFAR augmentation). x: (N, H·W·C) → (N, H·W·C)."""
    (H, W, C), n = shape, len(x)
    images = F.pad(x.view(n, H, W, C), (0, 0, pad, pad, pad, pad))  # (N, H+2p, W+2p, C)
    dy, dx = torch.randint(2 * pad + 1, (2, n), generator=generator)  # (N,) each
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(H)  # (N, H)
    cols = dx[:, None] + torch.arange(W)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = images[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N,H,W,C)
    return out.reshape(n, -1)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): big-endian header of dims after a 4-byte magic, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(data_dir: str | Path | None = None) -> ImageSplits:
    arrays = {}
    for key, (name, md5) in MNIST_FILES.items():
        path = fetch(f"mnist/{name}", MNIST_URL + name, sha256=None, data_dir=data_dir,
                     check=_gunzipped_md5_is(md5))  # fmt: skip
        arrays[key] = read_idx(path)
    return ImageSplits(
        _pixels(arrays["train_x"]),
        _labels(arrays["train_y"]),
        _pixels(arrays["test_x"]),
        _labels(arrays["test_y"]),
    )


LOADERS = {"cifar10": load_cifar10, "mnist": load_mnist}
