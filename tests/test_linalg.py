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
