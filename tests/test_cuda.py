"""CUDA paths: constraints on the device against float64 on the CPU, bf16 autocast training,
resume, torch.compile with bf16 Newton–Schulz on GPT-2 token shards, the cifar-vit-gpu preset
on random images. Without a GPU only the constraint comparison runs, on the CPU (which checks
the comparison itself)."""

import os
from functools import cache

import pytest
import torch
from matrices import jacobian_norm, matrix_with_spectrum, rms_singular_values

from lipschitz.config import apply_overrides
from lipschitz.constraints import CONSTRAINTS, METHODS
from lipschitz.data import images
from lipschitz.data.tasks import CharTask
from lipschitz.linalg import rms_operator_norm
from lipschitz.presets import preset
from lipschitz.training import RunDir, load_run, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=(pytest.mark.cuda, needs_cuda))]
DATA_DIR = os.environ.get("LIPSCHITZ_DATA_DIR")


@cache
def _weights_and_reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Three 256×128 float64 matrices with RMS→RMS singular values spread over [0, 2.5] (on
    both sides of w_max = 1), and the constraint applied to them in float64 on the CPU."""
    gen = torch.Generator().manual_seed(0)
    sigma = 2.5 * torch.rand(3, 128, dtype=torch.float64, generator=gen)
    W = matrix_with_spectrum(256, 128, sigma, gen)
    return W, METHODS[name](W, w_max=1.0, update_norm=0.05)


# Largest |Δσ| (RMS→RMS singular values) between the constraint in this dtype and in float64 on
# the CPU. Measured on the CPU (torch 2.13): float32 ≤ 1.8e-6 for every method; bfloat16 ≤
# 1.7e-3 (stiefel; the others 3e-4–1.2e-3), the rounding of the bf16 input and output. The
# bounds leave room for the GPU's own kernels (no TF32: torch's default for matmuls).
DEVICE_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-3}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(set(CONSTRAINTS) - {"none"}))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constraint_on_device_matches_float64_on_cpu(device, name, dtype):
    W, reference = _weights_and_reference(name)
    out = METHODS[name](W.to(device, dtype), w_max=1.0, update_norm=0.05)
    assert out.device.type == device and out.dtype == dtype and out.shape == W.shape
    got = rms_singular_values(out.cpu())
    want = rms_singular_values(reference)
    assert (got - want).abs().max().item() <= DEVICE_TOL[dtype], name


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(not DATA_DIR, reason="needs LIPSCHITZ_DATA_DIR")
def test_tiny_trains_and_resumes_on_cuda(tmp_path, train_interrupted):
    cfg = apply_overrides(preset("tiny"), ["device=cuda"])
    final = train(cfg, tmp_path / "full")
    assert final["device"].startswith("cuda") and final["lipschitz_bound"] < 10
    state = RunDir(tmp_path / "full").load_checkpoint()
    assert state["cuda_rng"] is not None
    # interrupted during step 13 (after the step-10 checkpoint), resumed, on the GPU
    train_interrupted(cfg, tmp_path / "half", CharTask, at=13)
    assert RunDir(tmp_path / "half").load_checkpoint()["step"] == 10
    resumed = train(cfg, tmp_path / "half", resume=True)
    assert resumed["steps"] == cfg.steps
    # the same run continued: equal up to the GPU's nondeterministic reductions (atomic adds in
    # the embedding's backward), far below what a wrong restore (RNG, optimizer state) moves
    assert resumed["val_loss"] == pytest.approx(final["val_loss"], rel=1e-3)
    assert resumed["lipschitz_bound"] == pytest.approx(final["lipschitz_bound"], rel=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_token_run_compiled_with_bf16_newton_schulz_on_cuda(tmp_path, token_shards):
    """The GPU recipe of gpt-145m at toy size: torch.compile, bf16 autocast, bf16 Muon."""
    cfg = apply_overrides(
        preset("tiny"),
        ["dataset=tokens", f"token_dir={token_shards}", "device=cuda", "compile=true",
         "ns_dtype=bfloat16", "nesterov=true", "coefficients=nanogpt5", "steps=8",
         "eval_every=8", "val_tokens=256", "embed_optimizer=adamw"],
    )  # fmt: skip
    final = train(cfg, tmp_path / "run")
    assert final["device"].startswith("cuda") and final["steps"] == 8
    assert final["val_loss"] < 11 and final["lipschitz_bound"] is not None
    model, _ = load_run(tmp_path / "run")
    for name, p in model.named_parameters():
        if name != "embed.weight":  # soft cap in bf16: within the measured 1.3% margin
            assert rms_operator_norm(p).item() <= cfg.w_max * 1.02, name


def _random_cifar(n_train: int, n_test: int):
    """A loader of uniform random images in CIFAR-10's shape (no dataset needed)."""

    def load(data_dir=None) -> images.ImageSplits:
        gen = torch.Generator().manual_seed(0)
        return images.ImageSplits(
            torch.rand(n_train, 3072, generator=gen),
            torch.randint(10, (n_train,), generator=gen),
            torch.rand(n_test, 3072, generator=gen),
            torch.randint(10, (n_test,), generator=gen),
        )

    return load


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("compile_model", [False, True])
def test_cifar_vit_gpu_preset_runs_on_cuda(tmp_path, monkeypatch, compile_model):
    """The GPU image preset as it is (d 256, 8 SLL mixer blocks, batch 512, bf16 autocast,
    spectral hard cap), eager and compiled, for a few steps on random images: it trains on the
    GPU, certifies, and no input's exact Jacobian (on the CPU, float32) exceeds its ℓ2 bound."""
    monkeypatch.setitem(images.LOADERS, "cifar10", _random_cifar(2048, 256))
    cfg = apply_overrides(
        preset("cifar-vit-gpu"),
        ["device=cuda", f"compile={str(compile_model).lower()}", "steps=6", "eval_every=6",
         "checkpoint_every=6"],
    )  # fmt: skip
    final = train(cfg, tmp_path / "run")
    assert final["device"].startswith("cuda") and final["steps"] == 6
    assert 0 < final["lipschitz_bound_l2"] < float("inf") and final["val_verified_acc"] is not None
    model, _ = load_run(tmp_path / "run")
    x = torch.rand(3, 3072, generator=torch.Generator().manual_seed(1))
    slopes = [jacobian_norm(model, xi) for xi in x]
    assert max(slopes) <= final["lipschitz_bound_l2"] * (1 + 1e-4)
