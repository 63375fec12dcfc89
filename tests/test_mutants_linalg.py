"""lipschitz.linalg: tests written to kill mutants that survived tests/test_linalg.py.

Every reference is independent of the function under test: float64 SVD, or a value derived by
hand (docs/testing.md lists the mutants and why the remaining ones are equivalent).
"""

import math

import pytest
import torch
from matrices import matrix_with_spectrum

from lipschitz.linalg import (
    gram_polynomial,
    msign,
    odd_polynomial,
    power_iteration,
    spectral_norm_upper_bound,
)


def _exact_sigma(W):
    return torch.linalg.matrix_norm(W.double(), ord=2)


def test_power_iteration_zero_iterations_is_a_valid_lower_bound():
    # iters=0 is allowed (the error says ">= 0"): Rayleigh–Ritz on the start block alone.
    gen = torch.Generator().manual_seed(11)
    W = torch.randn(3, 10, 6, generator=gen, dtype=torch.float64)
    result = power_iteration(W, iters=0)
    assert torch.all(result.sigma <= _exact_sigma(W) * (1 + 1e-12))
    assert torch.all(result.sigma > 0)
    with pytest.raises(ValueError, match="iters must be >= 0"):
        power_iteration(W, iters=-1)


def test_power_iteration_default_is_sixteen_iterations(monkeypatch):
    # The documented default (signature, and PowerIteration's "not sixteen"): one QR of the
    # start block plus one per iteration.
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda A: calls.append(1) or qr(A))
    power_iteration(torch.randn(6, 5, dtype=torch.float64))
    assert len(calls) == 1 + 16


def test_power_iteration_on_bfloat16_runs_in_float32():
    # Half-precision weights are measured in float32, not in their own precision.
    gen = torch.Generator().manual_seed(12)
    sig = torch.tensor([1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    W = matrix_with_spectrum(16, 8, sig, gen)
    Wb = W.to(torch.bfloat16)
    result = power_iteration(Wb, iters=30)
    assert result.sigma.dtype == torch.float32
    exact = _exact_sigma(Wb)
    assert abs(result.sigma.item() - exact.item()) < 1e-5 * exact.item()


@pytest.mark.parametrize("n", [1, 5, 64])
def test_gram_upper_bound_of_identity_is_hand_derived(n):
    # For the n×n identity every Gram iterate is I, ‖G_k‖_F = sqrt(n), so the bound after k
    # iterations is exactly n^(1/2^(k+1)) (the docstring's worst-case over-estimate), times the
    # documented 1 + 1e-9 margin. Default: iters = 6.
    eye = torch.eye(n, dtype=torch.float64)
    for iters, bound in [(None, spectral_norm_upper_bound(eye))] + [
        (k, spectral_norm_upper_bound(eye, iters=k)) for k in (1, 2, 6)
    ]:
        k = 6 if iters is None else iters
        expected = n ** (1 / 2 ** (k + 1)) * (1 + 1e-9)
        assert bound.item() == pytest.approx(expected, rel=1e-13), (n, iters)
    # a tall and a wide partial isometry ([I; 0] and its transpose) have the same bound
    tall = torch.cat([eye, torch.zeros(3, n, dtype=torch.float64)])
    for W in (tall, tall.T):
        assert spectral_norm_upper_bound(W).item() == pytest.approx(
            n ** (1 / 128) * (1 + 1e-9), rel=1e-13
        )


def test_gram_upper_bound_scales_each_matrix_of_a_stack_separately():
    # A stack never mixes its matrices: a tiny matrix next to a huge one keeps its own bound
    # (one shared rescaling would flush it to zero).
    gen = torch.Generator().manual_seed(13)
    A = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    stack = torch.stack([A * 1e300, A * 1e-300])
    bound = spectral_norm_upper_bound(stack)
    exact = _exact_sigma(A)
    slack = 4 ** (1 / 128)
    assert 1e300 * exact <= bound[0] <= 1e300 * exact * slack * (1 + 1e-8)
    assert 1e-300 * exact <= bound[1] <= 1e-300 * exact * slack * (1 + 1e-8)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        spectral_norm_upper_bound(A, iters=0)


@pytest.mark.parametrize("shape", [(9, 5), (5, 9), (2, 6, 6)])
@pytest.mark.parametrize("gram_scale", [2.0, 0.3])
def test_odd_polynomial_gram_scale_against_svd(shape, gram_scale):
    # σ ↦ σ·p(c·σ²) for c ≠ 1, against a float64 SVD and p evaluated by hand.
    gen = torch.Generator().manual_seed(14)
    W = torch.randn(shape, generator=gen, dtype=torch.float64)
    W = W / _exact_sigma(W)[..., None, None]
    coeffs = (1.0, -0.5, 0.125)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    a = gram_scale * S**2
    mapped = S * (coeffs[0] + coeffs[1] * a + coeffs[2] * a**2)
    expected = U @ (mapped.unsqueeze(-1) * Vh)
    got = odd_polynomial(W, coeffs, gram_scale=gram_scale)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_gram_polynomial_unit_odd_coefficients_against_naive_powers():
    # A coefficient of exactly 1 on an odd power (c₁·A with c₁ = 1) is added like any other.
    gen = torch.Generator().manual_seed(15)
    A = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    for coeffs in [(0.5, 1.0), (0.5, 1.0, 2.0), (0.0, 1.0, -1.0, 1.0)]:
        expected = sum(c * torch.linalg.matrix_power(A, k) for k, c in enumerate(coeffs))
        torch.testing.assert_close(gram_polynomial(A, coeffs), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError) as err:
        gram_polynomial(A, ())
    assert str(err.value) == "gram_polynomial: at least one coefficient is needed"


def test_msign_computes_in_the_requested_dtype():
    # dtype=bfloat16 means the iteration runs in bfloat16 (Muon's ns_dtype): every entry of the
    # result is a bfloat16 number, returned in the input's float64.
    gen = torch.Generator().manual_seed(16)
    W = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    O = msign(W, dtype=torch.bfloat16)
    assert O.dtype == torch.float64
    assert torch.equal(O.to(torch.bfloat16).double(), O)
    # and the default computes in the input dtype: float64 entries are not all bfloat16 numbers
    O64 = msign(W)
    assert not torch.equal(O64.to(torch.bfloat16).double(), O64)


def test_msign_zero_matrix_stays_zero_and_dtype_is_kept():
    # "a zero matrix stays zero" (the 1e-12 floor of the normalization), in the input dtype.
    for shape in [(4, 7), (7, 4)]:
        Z = torch.zeros(shape)
        O = msign(Z)
        assert O.dtype == torch.float32 and torch.equal(O, Z)
    W = torch.randn(8, 3, dtype=torch.float64)
    O = msign(W, dtype=torch.float32)
    assert O.dtype == torch.float64
    s = torch.linalg.svdvals(O)
    assert torch.all((s - 1).abs() < 1e-3), s
    # a tiny (but nonzero) matrix is orthogonalized like any other
    s = torch.linalg.svdvals(msign(W * 1e-10))
    assert torch.all((s - 1).abs() < 1e-4), s
    assert math.isfinite(s.sum().item())
