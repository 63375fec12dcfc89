"""lipschitz.linalg against float64 SVD and dense scalar grids."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from matrices import matrix_cases, matrix_with_spectrum, rms_singular_values

from lipschitz.linalg import (
    NS_COEFFICIENTS,
    NS_MAX_OUTPUT,
    NS_OUTPUT_RANGE,
    gram_polynomial,
    msign,
    odd_polynomial,
    power_iteration,
    rms_operator_norm,
    scalar_odd_polynomial,
    spectral_norm_upper_bound,
)

SHAPES = [(7, 7), (12, 5), (5, 12), (2, 3, 9, 6)]


def test_rms_operator_norm_matches_numpy_svd():
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        W = torch.randn(shape, generator=gen)
        expected = np.linalg.norm(W.double().numpy(), ord=2, axis=(-2, -1))
        expected = expected * math.sqrt(shape[-1] / shape[-2])
        got = rms_operator_norm(W)
        assert got.dtype == torch.float64 and got.shape == W.shape[:-2]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(matrix_cases(max_dim=32))
def test_spectral_norm_upper_bound_is_certified(case):
    W = case["W"]
    exact = torch.linalg.matrix_norm(W, ord=2)
    for iters in (1, 3, 6):
        bound = spectral_norm_upper_bound(W, iters=iters)
        assert torch.all(bound >= exact), (iters, bound, exact)
        # Gram iteration over-estimates by at most min(out, in)^(1 / 2^(iters + 1)).
        slack = min(W.shape[-2:]) ** (1 / 2 ** (iters + 1))
        assert torch.all(bound <= exact * slack * (1 + 1e-8) + 1e-300)
    # float32 input: still a bound on the float32 matrix itself
    W32 = W.float()
    assert torch.all(
        spectral_norm_upper_bound(W32) >= torch.linalg.matrix_norm(W32.double(), ord=2)
    )


def test_spectral_norm_upper_bound_zero_and_huge():
    assert spectral_norm_upper_bound(torch.zeros(4, 3)).item() == 0.0
    W = torch.randn(30, 20, dtype=torch.float64) * 1e150  # squaring would overflow unscaled
    ratio = spectral_norm_upper_bound(W) / torch.linalg.matrix_norm(W, ord=2)
    assert 1.0 <= ratio.item() < 1.2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_spectral_norm_upper_bound_of_a_non_finite_matrix_is_inf(bad):
    W = torch.randn(3, 6, 4, dtype=torch.float64)
    W[1, 2, 3] = bad  # one entry of the middle matrix
    bound = spectral_norm_upper_bound(W)
    assert bound[1].item() == math.inf  # not 0 or NaN, which a caller could read as a bound
    exact = torch.linalg.matrix_norm(W[[0, 2]], ord=2)
    assert torch.all(bound[[0, 2]] >= exact) and torch.all(bound[[0, 2]] < 1.2 * exact)


def test_power_iteration_lower_bound_and_warm_start():
    gen = torch.Generator().manual_seed(1)
    sig = torch.tensor([[1.0, 0.8, 0.5, 0.1], [2.0, 1.9, 0.3, 0.2]], dtype=torch.float64)
    W = matrix_with_spectrum(9, 4, sig, gen)  # (2, 9, 4)
    exact = torch.linalg.matrix_norm(W, ord=2)
    result = power_iteration(W, iters=400)  # gap 1.9/2.0 converges like 0.9025^iters
    assert torch.all(result.sigma <= exact * (1 + 1e-12))
    torch.testing.assert_close(result.sigma, exact, rtol=1e-8, atol=0)
    # (sigma, u, v) is a singular triple: W v = sigma u and Wᵀ u ≈ sigma v
    torch.testing.assert_close(
        (W @ result.v.unsqueeze(-1)).squeeze(-1), result.sigma[:, None] * result.u
    )
    torch.testing.assert_close(
        (W.mT @ result.u.unsqueeze(-1)).squeeze(-1),
        result.sigma[:, None] * result.v,
        rtol=1e-6,
        atol=1e-6,
    )
    # Warm start: one iteration from the converged basis of a slightly perturbed matrix is as
    # good as many from a cold start (block=1: plain power iteration).
    W2 = W + 1e-4 * torch.randn(W.shape, generator=gen, dtype=torch.float64)
    warm = power_iteration(W2, iters=1, v0=result.v, block=1)
    cold = power_iteration(W2, iters=1, block=1)
    exact2 = torch.linalg.matrix_norm(W2, ord=2)
    assert torch.all((exact2 - warm.sigma) / exact2 < 1e-6)
    assert torch.all((exact2 - warm.sigma) < (exact2 - cold.sigma))
    assert torch.all(power_iteration(W2, iters=1, v0=result.basis).sigma >= warm.sigma - 1e-12)


def test_block_power_iteration_handles_flat_spectra_and_unlucky_starts():
    gen = torch.Generator().manual_seed(7)
    sig = 1 - 0.1 * torch.rand(3, 64, generator=gen, dtype=torch.float64)  # flat top
    sig[:, 0] = 1.0
    W = matrix_with_spectrum(64, 64, sig, gen)
    exact = torch.linalg.matrix_norm(W, ord=2)
    plain = power_iteration(W, iters=16, block=1).sigma
    blocked = power_iteration(W, iters=16).sigma
    assert torch.all(blocked <= exact * (1 + 1e-12))
    assert torch.all((exact - blocked) < (exact - plain))
    assert torch.all((exact - blocked) / exact < 0.01)
    # a start vector orthogonal to the top singular vector cannot stall the block version
    _, _, Vh = torch.linalg.svd(W[0])
    bad_start = Vh[1]  # second right singular vector: plain power iteration never leaves it
    stuck = power_iteration(W[0], iters=16, v0=bad_start, block=1).sigma
    assert (exact[0] - stuck) / exact[0] > 1e-3
    fresh = power_iteration(W[0], iters=16).sigma
    assert (exact[0] - fresh) / exact[0] < 0.01


def test_gram_polynomial_matches_naive_powers():
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
    for coeffs in [
        (2.0,),
        (1.0, -0.5),
        (0.3, 0.2, -0.1),
        (1.0, 0.0, -3.0, 3.0, -1.0),
        (1, 2, 3, 4, 5, 6),
    ]:
        expected = sum(c * torch.linalg.matrix_power(A, k) for k, c in enumerate(coeffs))
        torch.testing.assert_close(gram_polynomial(A, coeffs), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_odd_polynomial_acts_on_singular_values(dtype, shape):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(shape, generator=gen, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, ord=2)[..., None, None]  # σ ≤ 1 keeps values O(1)
    coeffs = (1.5, -0.8, 0.25)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    expected = U @ (scalar_odd_polynomial(S, coeffs).unsqueeze(-1) * Vh)
    got = odd_polynomial(W.to(dtype), coeffs)
    assert got.dtype == dtype and got.shape == W.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


# The published Newton–Schulz coefficient sets (a, b, c) of a·x + b·x³ + c·x⁵, typed in here, not
# imported: You Jiacheng's six steps in units of 1/1024 (the paper's JAX code), the five steps of
# the paper's NanoGPT script, Keller Jordan's Muon step ×5 (the paper's released code,
# github.com/phess2/lipschitz-transformers: `_orthogonalize` in JAX, `orthogonalize` in NanoGPT).
_YOU6 = [(3955, -8306, 5008), (3735, -6681, 3463), (3799, -6499, 3211),
         (4019, -6385, 2906), (2677, -3029, 1162), (2172, -1833, 682)]  # fmt: skip
_JORDAN = ((3.4445, -4.7750, 2.0315),) * 5
# accurate8 ends with three classical steps: the quintic with p(1) = 1, p'(1) = p''(1) = 0, i.e.
# a + b + c = 1, a + 3b + 5c = 0, 6b + 20c = 0 ⇒ (a, b, c) = (15/8, −10/8, 3/8)
_CLASSICAL = tuple(np.linalg.solve([[1, 1, 1], [1, 3, 5], [0, 6, 20]], [1.0, 0.0, 0.0]))
PUBLISHED_NS = {
    "you6": tuple(tuple(c / 1024 for c in step) for step in _YOU6),
    "nanogpt5": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    "jordan5": _JORDAN,
    "accurate8": _JORDAN + (_CLASSICAL,) * 3,
}


def _published_ns_map(name: str, x: np.ndarray) -> np.ndarray:
    """The composed scalar map of a published set, evaluated in numpy with monomials."""
    for a, b, c in PUBLISHED_NS[name]:
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("name", sorted(NS_COEFFICIENTS))
def test_ns_coefficients_are_the_published_ones(name):
    assert len(NS_COEFFICIENTS[name]) == len(PUBLISHED_NS[name])
    for got, published in zip(NS_COEFFICIENTS[name], PUBLISHED_NS[name], strict=True):
        assert got == pytest.approx(published, rel=1e-15, abs=0)  # the solve rounds 1 ulp


# Output range of each set's scalar map on [1e-3, 1] as documented in linalg.py: regression values
# measured on this grid (commit 75f2fc4), not an independent check. The independent checks are the
# published coefficients above, the numpy evaluation and the paper's constants below.
@pytest.mark.parametrize("name", sorted(NS_COEFFICIENTS))
def test_ns_output_ranges(name):
    x = torch.linspace(0, 1, 2_000_001, dtype=torch.float64)
    y = x
    for step in NS_COEFFICIENTS[name]:
        y = scalar_odd_polynomial(y, step)
    # Horner in torch vs monomials in numpy: roundings amplified by a slope ≤ ~3300 near 0
    np.testing.assert_allclose(y.numpy(), _published_ns_map(name, x.numpy()), rtol=0, atol=1e-13)
    lo, hi = NS_OUTPUT_RANGE[name]  # the library's one table of them
    inside = y[x >= 1e-3]
    assert lo <= inside.min().item() and inside.max().item() <= hi
    # the documented range is tight (to 1e-4)
    assert inside.min().item() - lo < 1e-4 and hi - inside.max().item() < 1e-4
    assert y.max().item() <= NS_MAX_OUTPUT[name]
    assert y[0].item() == 0.0  # odd: zero singular values stay zero


def test_paper_constants_of_coefficient_sets():
    x = np.linspace(0, 1, 2_000_001)
    y = {name: _published_ns_map(name, x) for name in ("you6", "nanogpt5", "jordan5")}
    # the paper's reason for You's set: it never exceeds 1 (max 0.99933, min 0.866 on [1e-3, 1],
    # 0.998 at x = 1: an earlier independent evaluation of the published set, to its digits)
    assert y["you6"].max() < 1.0 and abs(y["you6"].max() - 0.99933) < 1e-5
    assert abs(y["you6"][x >= 1e-3].min() - 0.866) < 1e-3 and abs(y["you6"][-1] - 0.998) < 1e-3
    # the paper's inflation constant 1.14502 of the NanoGPT set (preprint App. D: the coupling is
    # given η·1.14502·1.05); 0.978 at x = 1 (the earlier independent evaluation)
    assert abs(y["nanogpt5"].max() - 1.14502) < 1e-5 and abs(y["nanogpt5"][-1] - 0.978) < 1e-3
    assert abs(y["jordan5"].max() - 1.202) < 1e-3  # the earlier independent evaluation
    for name, values in y.items():  # Muon relies on these bounds (linalg.NS_MAX_OUTPUT)
        assert values.max() <= NS_MAX_OUTPUT[name]


@pytest.mark.parametrize("shape", [*SHAPES, (64, 16), (16, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_msign_band_on_matrices(shape, dtype):
    gen = torch.Generator().manual_seed(4)
    r = min(shape[-2:])
    batch = shape[:-2]
    sig = 10.0 ** (-2 * torch.rand(*batch, r, generator=gen, dtype=torch.float64))  # κ ≤ 100
    W = matrix_with_spectrum(shape[-2], shape[-1], sig, gen)
    O = msign(W.to(dtype))
    assert O.dtype == dtype
    s = rms_singular_values(O) * math.sqrt(shape[-2] / shape[-1])  # raw singular values
    tol = 1e-4 if dtype == torch.float64 else 2e-4
    assert torch.all((s - 1).abs() < tol), s
    # polar factor: O = U Vᵀ with the singular vectors of W
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(O.double(), U @ Vh, rtol=0, atol=5 * tol)


def test_msign_bfloat16_and_rank_deficient():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(32, 16, generator=gen)
    O = msign(W.bfloat16(), "nanogpt5")
    assert O.dtype == torch.bfloat16
    s = torch.linalg.svdvals(O.double())
    assert s.max() < 1.14502 * 1.05 and s.min() > 0.4
    sig = torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    R = matrix_with_spectrum(6, 4, sig, gen)
    s = torch.linalg.svdvals(msign(R))
    torch.testing.assert_close(
        s, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_msign_rejects_unknown_set():
    with pytest.raises(ValueError, match="unknown coefficient set"):
        msign(torch.eye(3), "nope")
