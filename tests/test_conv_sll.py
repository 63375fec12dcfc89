"""The convolutional SLL layer and the image stem (lipschitz.nn.conv_sll): the operator facts
its proof rests on, checked on dense float64 matrices, and its certificate against exact
Jacobians, for the layer alone and inside a whole ViT."""

import math

import pytest
import torch
import torch.nn.functional as F
from matrices import jacobian_norm

from lipschitz.certify import _Walk, certify
from lipschitz.nn.conv_sll import ConvSLL, GridConvSLL, SLLStem
from lipschitz.nn.vit import LipschitzViT


def _layer(seed: int, channels: int = 2, hidden: int = 3, scale: float = 1.0) -> ConvSLL:
    """A float64 ConvSLL with a random kernel of the given scale, random bias and random q."""
    gen = torch.Generator().manual_seed(seed)
    layer = ConvSLL(channels, hidden).double()
    with torch.no_grad():
        for p in (layer.fc.weight, layer.bias, layer.log_q):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        layer.fc.weight.mul_(scale)
    return layer


def _dense(f, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix (out, in) of a linear map f on (1, *shape) tensors, column by column."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    return f(basis).flatten(1).T  # (out, n)


def _layer_certificate(layer: ConvSLL) -> float:
    return layer.certificate(1.0, _Walk("certified", tokens="all"), "layer")[0]


@pytest.mark.parametrize("seed", range(6))
def test_the_adjoint_and_the_scaling_dominate_the_dense_operator(seed):
    """conv_transpose2d is the adjoint of the zero-padded conv2d, and diag(t) ⊗ I ⪰ K Kᵀ for
    the dense operator K (the Gershgorin bound with q, over channels and offsets)."""
    layer = _layer(seed, channels=2, hidden=3, scale=[0.1, 1.0, 10.0][seed % 3])
    K, p, H = layer.kernel_weight(), layer.padding, 5
    A = _dense(lambda x: F.conv2d(x, K, padding=p), (2, H, H))  # (3·25, 2·25)
    At = _dense(lambda y: F.conv_transpose2d(y, K, padding=p), (3, H, H))  # (2·25, 3·25)
    assert torch.allclose(At, A.T, atol=1e-12)
    t = layer.scaling().detach().repeat_interleave(H * H)  # (3·25,): channel-major, as A's rows
    gap = torch.linalg.eigvalsh(torch.diag(t) - A @ A.T).min()
    assert gap >= -1e-9 * float(t.max())


@pytest.mark.parametrize("seed", range(6))
def test_the_layer_is_certified_above_its_exact_jacobian(seed):
    layer = _layer(seed, scale=[0.1, 1.0, 30.0][seed % 3])
    L = _layer_certificate(layer)
    assert 1.0 <= L <= 1 + 1e-6  # the forward's own t: κ = 1 up to rounding
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(3):
        x = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64)
        assert jacobian_norm(layer, x) <= L * (1 + 1e-9)


def test_a_scaling_too_small_is_charged_to_the_certificate(monkeypatch):
    """With t divided by 3 the layer is no longer 1-Lipschitz; the certificate (t⁶⁴ / t ≤ 3,
    so 2κ − 1 = 5) must say so and still bound the exact slope, which exceeds 1."""
    layer = _layer(1, channels=3, hidden=6)
    with torch.no_grad():
        layer.bias.fill_(50.0)  # every ReLU on: the Jacobian is I − 6·KᵀT⁻¹K everywhere
    honest = layer.scaling
    monkeypatch.setattr(layer, "scaling", lambda: honest() / 3)
    L = _layer_certificate(layer)
    assert L == pytest.approx(5.0, rel=1e-6)
    slope = jacobian_norm(layer, torch.randn(3, 6, 6, dtype=torch.float64))
    assert 1.0 < slope <= L


def test_the_stem_folds_2x2_pixel_blocks_into_channels():
    """Without a lift and with K = 0 (every layer the identity) the stem's output is the
    folded grid: cell (i, j) holds exactly the 12 values of the image's 2×2 block (i, j)."""
    stem = SLLStem((4, 6, 3), n_layer=1, hidden=4).double()
    with torch.no_grad():
        stem.layers[0].fc.weight.zero_()
    image = torch.arange(4 * 6 * 3, dtype=torch.float64).view(4, 6, 3)
    grid = stem(image.flatten()[None]).view(*stem.out_shape)  # (2, 3, 12)
    assert stem.out_shape == (2, 3, 12)
    for i in range(2):
        for j in range(3):
            block = image[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten()
            assert sorted(grid[i, j].tolist()) == sorted(block.tolist())
    with pytest.raises(ValueError, match="channels=8 must be ≥ C·fold² = 12"):
        SLLStem((4, 6, 3), n_layer=1, hidden=4, channels=8)


def test_a_stem_vit_is_certified_above_its_exact_jacobian_and_refuses_bad_input():
    torch.manual_seed(0)
    model = LipschitzViT(image_shape=(8, 8, 3), n_classes=5, patch=4, d_model=8, n_layer=1,
                         n_head=2, block="sll_mixer", bias=True, stem_layers=2,
                         stem_hidden=6, stem_channels=16).double()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            scale = 1.0 if p.dim() == 1 else p.shape[1] ** -0.5
            p.copy_(torch.randn_like(p) * scale)
    cert = certify(model)
    steps = {s["name"]: s["lipschitz"] for s in cert.steps}
    lift = model.stem.lift.weight.detach()  # (16, 12): σ_max is the stem's bound, the layers 1
    sigma = float(torch.linalg.matrix_norm(lift, ord=2))
    assert sigma <= steps["stem"] <= sigma * (1 + 1e-6)
    for _ in range(4):
        x = torch.rand(192, dtype=torch.float64)
        assert jacobian_norm(model, x) <= cert.lipschitz_l2 * (1 + 1e-9)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 192\)"):
        model(torch.rand(2, 191, dtype=torch.float64))


def test_the_float32_rounding_of_the_scaled_kernel_is_charged():
    """A 1×1-channel kernel with only its centre tap is the dense one-unit layer: |1 − k·v| must
    stay below the certificate, which charges the float32 rounding of v = fl(2k/t)."""
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for k in (torch.rand(300, generator=gen) * 3 + 0.1).tolist():
        layer = ConvSLL(1, 1)
        with torch.no_grad():
            layer.fc.weight.zero_()
            layer.fc.weight[0, 4] = k  # the centre of the 3×3 kernel
            layer.bias.fill_(10.0)
        L = _layer_certificate(layer)
        v = float(layer.scaled_kernel().detach()[0, 0, 1, 1])
        worst = max(worst, abs(1 - float(layer.fc.weight[0, 4]) * v) / L)
    assert worst <= 1 + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_the_grid_mixer_is_the_layer_on_the_token_grid_and_certified_above_its_jacobian(seed):
    """GridConvSLL lays tokens (B, T, d) out row by row on the patch grid, so token (r, c) is
    the pixel (r, c) of a d-channel image; its certificate bounds the exact Jacobian and its
    output bound holds in RMS over all entries."""
    gen = torch.Generator().manual_seed(seed)
    grid, d = [(2, 3), (3, 3), (4, 2), (1, 5)][seed], 3
    mixer = GridConvSLL(d, grid, hidden=4).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        mixer.conv.fc.weight.mul_([0.1, 1.0, 10.0, 3.0][seed])
    T = grid[0] * grid[1]
    x = torch.randn(2, T, d, generator=gen, dtype=torch.float64)
    image = x.view(2, *grid, d).permute(0, 3, 1, 2)  # (B, d, gh, gw)
    expected = mixer.conv(image).permute(0, 2, 3, 1).reshape(2, T, d)
    assert torch.allclose(mixer(x), expected, atol=1e-12)
    L, out = mixer.certificate(0.0, _Walk("certified", tokens="all"), "mix")
    slopes = [jacobian_norm(mixer, x[i]) for i in range(2)]
    assert max(slopes) <= L * (1 + 1e-9)
    h0 = mixer(torch.zeros(1, T, d, dtype=torch.float64))  # the output at 0: its RMS ≤ out
    assert float(h0.pow(2).mean().sqrt()) <= out * (1 + 1e-9)
    with pytest.raises(TypeError, match="all tokens"):
        mixer.certificate(1.0, _Walk("certified", tokens="max"), "mix")
    with pytest.raises(ValueError, match="tokens"):
        mixer(torch.zeros(1, T + 1, d, dtype=torch.float64))
