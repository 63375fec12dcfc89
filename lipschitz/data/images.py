"""Image classification data: CIFAR-10 and MNIST as float pixels in [0, 1].

CIFAR-10 comes from ``cifar10/cifar10.npz`` in a data directory (the layout of
``../shared/data``: ``x_train`` (50000, 32, 32, 3) uint8, ``y_train``, ``x_test``, ``y_test``),
verified by sha256. MNIST comes from the four IDX files ``mnist/*-ubyte.gz``. Pixels are
returned raw, scaled to [0, 1] and flattened: any normalization belongs inside the model, so
that attacks and certificates see the same inputs a user feeds.

Not done yet: downloading the canonical CIFAR-10 python archive and the MNIST files for users
without a data directory (their published checksums are md5 and could not be verified here).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipschitz.data.files import fetch

CIFAR10_NPZ = "cifar10/cifar10.npz"
SHA256 = {
    CIFAR10_NPZ: "a44cc18e4ad961b5158c7da062a6232fb65938b615bf013046199b823b75c43d",
    "mnist/train-images-idx3-ubyte.gz": (
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"
    ),
    "mnist/train-labels-idx1-ubyte.gz": (
        "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203"
    ),
    "mnist/t10k-images-idx3-ubyte.gz": (
        "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be"
    ),
    "mnist/t10k-labels-idx1-ubyte.gz": (
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b"
    ),
}  # the files in ../shared/data (the MNIST gzips are re-packed: canonical content)
MNIST_FILES = {
    "train_x": "mnist/train-images-idx3-ubyte.gz",
    "train_y": "mnist/train-labels-idx1-ubyte.gz",
    "test_x": "mnist/t10k-images-idx3-ubyte.gz",
    "test_y": "mnist/t10k-labels-idx1-ubyte.gz",
}


@dataclass
class ImageSplits:
    """Flattened float32 pixels in [0, 1] and int64 labels."""

    x_train: torch.Tensor  # (N, C·H·W)
    y_train: torch.Tensor  # (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int = 10

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def _pixels(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(y.astype(np.int64))


def load_cifar10(data_dir: str | Path | None = None) -> ImageSplits:
    path = fetch(CIFAR10_NPZ, url=None, sha256=SHA256[CIFAR10_NPZ], data_dir=data_dir)
    with np.load(path) as d:
        return ImageSplits(
            _pixels(d["x_train"]), _labels(d["y_train"]), _pixels(d["x_test"]), _labels(d["y_test"])
        )


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
    arrays = {
        key: read_idx(fetch(rel, url=None, sha256=SHA256[rel], data_dir=data_dir))
        for key, rel in MNIST_FILES.items()
    }
    return ImageSplits(
        _pixels(arrays["train_x"]),
        _labels(arrays["train_y"]),
        _pixels(arrays["test_x"]),
        _labels(arrays["test_y"]),
    )


LOADERS = {"cifar10": load_cifar10, "mnist": load_mnist}
