"""Test-wide settings: one torch thread, derandomized Hypothesis under CI (CI=true),
synthetic GPT-2 token shards, and a training run interrupted at a chosen step."""

import os

import numpy as np
import pytest
import torch

try:  # absent on some GPU machines; only the property-based tests need it
    from hypothesis import settings
except ImportError:
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


@pytest.fixture
def token_shards(tmp_path):
    """A folder of GPT-2-token shards (two train, one val) holding a noisy repeating pattern."""
    return _write_token_shards(tmp_path)


@pytest.fixture(scope="module")
def module_token_shards(tmp_path_factory):
    """:func:`token_shards`, written once for a test module (for runs that several tests share)."""
    return _write_token_shards(tmp_path_factory.mktemp("shards"))


def _write_token_shards(tmp_path):
    from lipschitz.data.tokens import write_shard

    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(0, 50257, 97), 60)
    noise = rng.random(len(stream)) < 0.1
    stream[noise] = rng.integers(0, 50257, noise.sum())
    folder = tmp_path / "toy"
    folder.mkdir()
    write_shard(folder / "toy_train_000000.bin", stream[:3000])
    write_shard(folder / "toy_train_000001.bin", stream[3000:5000])
    write_shard(folder / "toy_val_000000.bin", stream[5000:])
    return folder


@pytest.fixture
def train_interrupted(monkeypatch):
    """train(cfg, out) that stops with KeyboardInterrupt when the task class's ``batch`` is
    called for the ``at``-th time (step ``at`` with grad_accum 1); the method is restored."""
    from lipschitz.training import train

    def run(cfg, out, task_class, at: int) -> None:
        real, calls = task_class.batch, {"n": 0}

        def batch(self, n, generator):
            calls["n"] += 1
            if calls["n"] == at:
                raise KeyboardInterrupt
            return real(self, n, generator)

        monkeypatch.setattr(task_class, "batch", batch)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out)
        monkeypatch.setattr(task_class, "batch", real)

    return run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tests use small tensors: extra threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
