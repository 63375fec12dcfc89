"""Weight constraints: maps that keep a weight matrix inside an RMS→RMS norm ball.

Every function takes a weight of shape ``(..., out, in)`` (a stack of matrices is projected one
matrix at a time), a bound ``w_max`` in RMS→RMS units (see :mod:`lipschitz.linalg`), and returns a
new tensor of the same shape and dtype. bfloat16/float16 weights are computed in float32 and
rounded back (rounding can move σ_max by ~0.4%). They are plain functions of a tensor, so they
work on any PyTorch weight::

    with torch.no_grad():
        layer.weight.copy_(spectral_hard_cap(layer.weight, w_max=1.0))

Each takes ``fn(W, *, w_max, ...)`` (``none`` and ``spectral_weight_decay`` bound nothing and
take no ``w_max``); the soft cap, whose strength is coupled to the step, also takes
``update_norm``, the RMS→RMS norm of the step just taken, and ``weight_decay``, the fraction
λ·η·tn the weight was decayed by before it.

:data:`METHODS` describes every method once (a :class:`Constraint`): whether it needs ``w_max``,
keeps per-weight state, may project a stack in one call, is coupled to the step, and how far
σ_max may end up above ``w_max``. The optimizer, the benchmark and the health check read these
facts from there; adding a constraint means adding its function and its entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lipschitz.linalg import (
    msign,
    odd_polynomial,
    power_iteration,
    rms_scale,
    row_rms,
    spectral_norm_upper_bound,
)

__all__ = [
    "CONSTRAINTS",
    "HARD_CAP_QUINTICS",
    "METHODS",
    "SOFT_CAP_MAX_K",
    "Constraint",
    "none",
    "row_rms_cap",
    "soft_cap_alpha",
    "spectral_hammer",
    "spectral_hard_cap",
    "spectral_normalize",
    "spectral_soft_cap",
    "spectral_weight_decay",
    "stiefel",
    "svd_cap",
]


MAX_ENTRY = 1e15  # largest |entry| a projection accepts (see _checked)


def _checked(name: str, W: Tensor, w_max: float) -> Tensor:
    """Validate the common arguments; return W detached, in its compute dtype."""
    if not isinstance(W, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor weight, got {type(W).__name__}")
    if W.ndim < 2:
        raise ValueError(
            f"{name}: weight must have at least 2 dimensions (..., out, in), "
            f"got shape {tuple(W.shape)}"
        )
    if not isinstance(w_max, (int, float)) or not w_max > 0:  # `not >` also rejects NaN
        raise ValueError(f"{name}: w_max must be a number > 0, got {w_max!r}")
    if not W.is_floating_point():
        raise ValueError(f"{name}: weight must be floating point, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{name}: weight of shape {tuple(W.shape)} has no entries")
    largest = float(W.detach().abs().amax())  # NaN propagates through amax
    if not math.isfinite(largest):
        raise ValueError(
            f"{name}: weight of shape {tuple(W.shape)} has non-finite entries (nan or inf)"
        )
    if largest > MAX_ENTRY:  # Gram matrices of such entries overflow float32 (SVD, iterations)
        raise ValueError(
            f"{name}: weight of shape {tuple(W.shape)} has entries up to {largest:.3g}, beyond "
            f"the {MAX_ENTRY:g} the projections compute with"
        )
    W = W.detach()
    return W if W.dtype in (torch.float32, torch.float64) else W.float()


def none(W: Tensor) -> Tensor:
    """No constraint: returns (a copy of) W. Weight decay, if any, is the optimizer's job."""
    return _checked("none", W, math.inf).to(W.dtype, copy=True)


# svd_cap's Gram path: the largest σ_max/cap it trusts, per compute dtype (float32 loses about
# eps·(σ_max/cap)³ relative to the cap by squaring: 6e-8·4³ ≈ 4e-6; float64 1e-16·100³ = 1e-10)
GRAM_CAP_MAX_RATIO = {torch.float32: 4.0, torch.float64: 100.0}


def svd_cap(W: Tensor, *, w_max: float) -> Tensor:
    """Exact clip σᵢ ← min(σᵢ, w_max) of every singular value (RMS units).

    With V, λ the eigenvectors and eigenvalues of the small Gram matrix G = XᵀX (XXᵀ for a wide
    X, on the left) and sᵢ = √λᵢ the singular values, X ← X − X·V·diag(1 − min(1, c/sᵢ))·Vᵀ:
    directions below the cap c are left as they are, those above are scaled onto it. On a CPU
    that costs about a third of an SVD (docs/benchmarks.md, "Projections": 5–16 Gram products
    against 14–46); squaring costs precision far below σ_max, so a matrix
    more than GRAM_CAP_MAX_RATIO above its cap (a first projection) is clipped by SVD instead.
    """
    X = _checked("svd_cap", W, w_max)
    c = w_max * rms_scale(X)
    wide = X.shape[-2] < X.shape[-1]
    G = X @ X.mT if wide else X.mT @ X  # (..., k, k), k = min(out, in)
    lam, V = torch.linalg.eigh(G)  # ascending λ, (..., k), (..., k, k)
    if float(lam[..., -1].max()) <= (GRAM_CAP_MAX_RATIO[X.dtype] * c) ** 2:
        s = lam.clamp_min(0).sqrt()
        shrink = 1 - c / s.clamp_min(c)  # 1 − min(1, c/s): 0 below the cap
        if wide:
            out = X - (V * shrink.unsqueeze(-2)) @ (V.mT @ X)
        else:
            out = X - ((X @ V) * shrink.unsqueeze(-2)) @ V.mT
        return out.to(W.dtype)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return (U @ (S.clamp_max(c).unsqueeze(-1) * Vh)).to(W.dtype)


def _power_iterate(X: Tensor, iters: int, state: dict | None):
    """Power iteration warm-started from ``state["basis"]`` when present; stores it there."""
    v0 = None if state is None else state.get("basis")
    if v0 is not None and v0.shape[:-1] != X.shape[:-2] + X.shape[-1:]:
        v0 = None  # the weight changed shape: start afresh
    result = power_iteration(X, iters=iters, v0=v0)
    if state is not None:
        state["basis"] = result.basis
    return result


def spectral_normalize(
    W: Tensor,
    *,
    w_max: float,
    iters: int = 16,
    state: dict | None = None,
) -> Tensor:
    """W ← W / max(1, σ̂/w_max): scale the whole matrix down only if it is outside the ball.

    σ̂ comes from ``iters`` block power iterations (a lower bound on σ_max, so the result can
    exceed w_max by the power-iteration error, stated in ``tests/test_constraints.py``; pass a
    ``state`` dict to warm-start across training steps). A matrix inside the ball is returned
    unchanged.
    """
    X = _checked("spectral_normalize", W, w_max)
    sigma = _power_iterate(X, iters, state).sigma / rms_scale(X)  # RMS→RMS units
    factor = (w_max / sigma).clamp_max(1.0)  # 1 inside the ball, < 1 outside
    return (X * factor[..., None, None]).to(W.dtype)


def spectral_hammer(
    W: Tensor,
    *,
    w_max: float,
    iters: int = 16,
    state: dict | None = None,
) -> Tensor:
    """W ← W + (w_max − σ₁)·u₁v₁ᵀ: set the top singular value to w_max, leave the rest.

    No guarantee: the second singular value may exceed w_max (the paper pairs it with AdamW,
    whose updates have low stable rank).
    """
    X = _checked("spectral_hammer", W, w_max)
    sigma, u, v, _ = _power_iterate(X, iters, state)
    delta = w_max * rms_scale(X) - sigma  # (...,) raw spectral units
    return (X + delta[..., None, None] * u.unsqueeze(-1) * v.unsqueeze(-2)).to(W.dtype)


def spectral_weight_decay(
    W: Tensor,
    *,
    spectral_decay: float = 0.1,
    iters: int = 16,
    state: dict | None = None,
) -> Tensor:
    """W ← W − λ_s·σ₁u₁v₁ᵀ: shrink only the top singular value by the factor (1 − λ_s).

    ``spectral_decay`` is λ_s, a per-step constant (not scaled by the learning rate, as in the
    paper). Enforces no bound, so it takes no ``w_max``.
    """
    X = _checked("spectral_weight_decay", W, math.inf)  # it bounds nothing: no w_max
    if not 0.0 <= spectral_decay <= 1.0:
        raise ValueError(
            f"spectral_weight_decay: spectral_decay must be in [0, 1], got {spectral_decay}"
        )
    sigma, u, v, _ = _power_iterate(X, iters, state)
    shrink = spectral_decay * sigma
    return (X - shrink[..., None, None] * u.unsqueeze(-1) * v.unsqueeze(-2)).to(W.dtype)


def stiefel(
    W: Tensor,
    *,
    w_max: float,
    coefficients: str = "accurate8",
) -> Tensor:
    """W ← w_max·msign(W): every singular value set to w_max (RMS units).

    Band (``accurate8``, float32 or float64): every singular value σᵢ with σᵢ ≥ 1e-3·‖W‖_F lands
    in [0.9999, 1.0001]·w_max; smaller ones land in [0, 1.0001]·w_max and exact zeros stay zero
    (a rank-deficient matrix cannot be made orthogonal). Other coefficient sets have the ranges
    listed in :data:`lipschitz.linalg.NS_COEFFICIENTS`.
    """
    X = _checked("stiefel", W, w_max)
    return (w_max * rms_scale(X) * msign(X, coefficients)).to(W.dtype)


# The paper's four odd quintics (credited to Cesista) whose composition approximates min(1, x)
# on [0, 3]; it diverges for x ≳ 3.7, hence the guarded pre-scaling below.
HARD_CAP_QUINTICS = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)
_QUINTIC_DOMAIN = 3.0  # largest σ/w_max the quintic composition handles (q(3) = 1.0009)


def _hard_cap_stage(Y: Tensor, beta: float, coefficients: str) -> Tensor:
    """One exact-identity hard cap of a tall (..., m, n) matrix at β (raw units); see below."""
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    S = msign(beta**2 * eye - Y.mT @ Y, coefficients)  # (..., n, n) ≈ V sign(β² − Σ²) Vᵀ
    P = 0.5 * (eye - S)  # ≈ projector onto the right singular vectors with σ > β
    YP = Y @ P
    return Y - YP + beta * (msign(YP, coefficients) @ P)


def spectral_hard_cap(
    W: Tensor,
    *,
    w_max: float,
    method: str = "msign",
    coefficients: str = "accurate8",
) -> Tensor:
    """σᵢ ← min(σᵢ, w_max) for every singular value, without an SVD.

    ``method="msign"`` (default) is exact up to Newton–Schulz error. With β = w_max (raw units),
    A = WᵀW, S = msign(β²I − A) = V·sign(β² − Σ²)·Vᵀ and the projector P = ½(I − S) onto the
    right singular vectors with σ > β:

        cap(W) = W·(I − P) + β·msign(W·P)·P

    keeps every σ ≤ β exactly and sends every σ > β to β. Where the sign is not resolved
    (|β² − σ²| below ~1e-3·‖β²I − A‖_F), sᵢ ∈ (−1, 1) and the result is the convex combination
    ½(1 + sᵢ)·σᵢ + ½(1 − sᵢ)·β, which lies between σᵢ and β: σ_max can exceed w_max only by
    that unresolved gap (3e-4·w_max for a 1024×256 matrix at σ_max = 2·w_max), and small
    singular values are untouched. Zero singular values stay zero. Cost: two msign calls (one on
    the small Gram matrix), plus 8 power iterations (and one host sync) to choose the stages: a
    matrix more than 2.5× outside the ball is capped in stages (…, 4·w_max, 2·w_max, w_max),
    two msign calls per stage. Measured overshoot: ≤ 8e-4·w_max up to 4096×1024
    (docs/benchmarks.md).

    ``method="quintic"`` composes the paper's four quintics: about 3.4% low at σ = w_max, and
    every singular value shrinks by up to 4.9% per call. Its domain is guarded: when a certified
    upper bound puts σ_max above 3·w_max, the matrix is first scaled down into that range.
    """
    X = _checked("spectral_hard_cap", W, w_max)
    beta = w_max * rms_scale(X)  # the cap in raw spectral units
    if method == "msign":
        tall = X.shape[-2] >= X.shape[-1]
        Y = X if tall else X.mT  # (..., m, n) with m ≥ n: the Gram matrix is the small one
        # The sign of β² − σ² is resolved relative to ‖β²I − WᵀW‖, so far outside the ball cap
        # in stages (…, 4β, 2β, β): each stage starts at most ~2× above its cap.
        sigma = float(power_iteration(Y, iters=8).sigma.max())
        caps = [beta]
        while sigma > 2.5 * caps[-1]:
            caps.append(2 * caps[-1])
        for cap in reversed(caps):
            Y = _hard_cap_stage(Y, cap, coefficients)
        return (Y if tall else Y.mT).to(W.dtype)
    if method == "quintic":
        Y = X / beta
        bound = spectral_norm_upper_bound(Y).to(Y.dtype)  # certified σ_max(Y) upper bound
        Y = Y * (_QUINTIC_DOMAIN / bound).clamp_max(1.0)[..., None, None]
        for step in HARD_CAP_QUINTICS:
            Y = odd_polynomial(Y, step)
        return (beta * Y).to(W.dtype)
    raise ValueError(f"spectral_hard_cap: method must be 'msign' or 'quintic', got {method!r}")


# The soft cap keeps its promise while k = w_max·(1 − decay) + update_norm ≤ (81/62)·w_max
# (see soft_cap_alpha), i.e. steps up to ~0.306·w_max without decay.
SOFT_CAP_MAX_K = 81 / 62


def soft_cap_alpha(w_max: float, weight_decay: float, update_norm: float) -> float:
    """Strength α of the spectral soft cap that maps k = w_max·(1 − weight_decay) + update_norm
    exactly onto w_max (paper, Thm 3.1). All norms are RMS→RMS.

    The soft cap is x ↦ p₂(p₁(x)) with p₁(x) = x − αx³, p₂(x) = x + αx³, i.e.
    x·g(αx²) with g(u) = 1 − 3u² + 3u³ − u⁴. The paper's quartic in α is g(αk²) = w_max/k.
    Since g'(u) = −u·(4u² − 9u + 6) < 0 for u > 0, g falls strictly from 1 to 0 on [0, 1]: the
    smallest non-negative root is the unique root in [0, 1), found here by bisection in float64.
    Returns 0 when no projection is needed (k ≤ w_max), never the released code's fallback 1.

    The cap is monotone on [0, k] (so every singular value ≤ k lands ≤ w_max) while αk² ≤ 1/3,
    i.e. k ≤ (81/62)·w_max ≈ 1.306·w_max: the coupling is a guarantee for steps up to ~0.3·w_max.
    """
    if not isinstance(w_max, (int, float)) or not w_max > 0 or math.isinf(w_max):
        raise ValueError(f"soft_cap_alpha: w_max must be a finite number > 0, got {w_max!r}")
    if not 0.0 <= weight_decay < 1.0:
        raise ValueError(f"soft_cap_alpha: weight_decay must be in [0, 1), got {weight_decay!r}")
    if not 0.0 <= update_norm < math.inf:
        raise ValueError(
            f"soft_cap_alpha: update_norm must be finite and >= 0, got {update_norm!r}"
        )
    k = w_max * (1.0 - weight_decay) + update_norm
    if k <= w_max:
        return 0.0
    target = w_max / k  # in (0, 1)
    lo, hi = 0.0, 1.0  # g(lo) > target >= g(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if 1.0 - mid * mid * (3.0 - 3.0 * mid + mid * mid) > target:
            lo = mid
        else:
            hi = mid
    return hi / (k * k)  # the upper end, so g(αk²)·k ≤ w_max after rounding


def spectral_soft_cap(
    W: Tensor, *, w_max: float, update_norm: float = 0.0, weight_decay: float = 0.0
) -> Tensor:
    """The paper's spectral soft cap: σ ↦ p₂(p₁(σ)) with α from :func:`soft_cap_alpha`.

    Coupled to the step: if the weight was inside the ball before it was decayed by
    ``weight_decay`` and moved by a step of RMS→RMS norm ≤ ``update_norm``, it is inside again
    afterwards (for update_norm ≲ 0.3·w_max, see :func:`soft_cap_alpha`). With no step
    (update_norm = 0) it is the identity. Singular values well below w_max are untouched to
    fourth order: the composition is σ·(1 − 3u² + 3u³ − u⁴), u = α·σ².
    Cost: one Gram product, two products of the small side, one product back.
    """
    X = _checked("spectral_soft_cap", W, w_max)
    alpha = soft_cap_alpha(w_max, weight_decay, update_norm)
    if alpha == 0.0:
        return X.to(W.dtype, copy=True)
    # σ ↦ σ·g(u) with u = α·σ_rms² = (α/s²)·σ²: the Gram matrix scaled by α/s² holds u.
    Y = odd_polynomial(X, (1.0, 0.0, -3.0, 3.0, -1.0), gram_scale=alpha / rms_scale(X) ** 2)
    return Y.to(W.dtype)


def row_rms_cap(W: Tensor, *, w_max: float) -> Tensor:
    """Embedding constraint: scale every row (token) of W down to RMS ≤ w_max.

    An embedding is measured per row (ℓ1→RMS for one-hot inputs), not as a matrix, so this is
    not in :data:`CONSTRAINTS`; it is the paper's ``E_row /= max(1, rms(E_row))``.
    """
    X = _checked("row_rms_cap", W, w_max)
    return (X / (row_rms(X, keepdim=True) / w_max).clamp_min(1.0)).to(W.dtype)


@dataclass(frozen=True)
class Constraint:
    """The facts about one constraint method that code other than its function needs.

    Fields:
        name: the key in :data:`METHODS` (and a param group's ``constraint`` option).
        fn: the function: ``fn(W, *, w_max, ...)``, without ``w_max`` where it bounds nothing.
        needs_w_max: takes ``w_max``; the others enforce no bound.
        stackable: the result on a stack (k, out, in) equals that of each matrix alone, so
            same-shaped weights may be projected in one batched call.
        guarantee: what the method promises about σ_max, in words (the benchmark's column).
        tolerance: how far above ``w_max``, relative, the norm may be right after the
            projection when the guarantee holds (float32 weights); None: no guarantee.
        per_row: measured per row (largest row RMS: an embedding, ℓ1→RMS for one-hot inputs),
            not as a matrix by its RMS→RMS norm. Such methods are not in :data:`CONSTRAINTS`.
        stateful: takes ``state=`` (a dict it keeps its power-iteration warm start in).
        coupled_to_step: needs ``update_norm`` and ``weight_decay`` of the step just taken (the
            soft cap): only an optimizer that bounds its step's norm can drive it.
    """

    name: str
    fn: Callable[..., Tensor]
    needs_w_max: bool
    stackable: bool
    guarantee: str
    tolerance: float | None
    per_row: bool = False
    stateful: bool = False
    coupled_to_step: bool = False

    def __call__(
        self,
        W: Tensor,
        *,
        w_max: float | None = None,
        update_norm: float = 0.0,
        weight_decay: float = 0.0,
        **options,
    ) -> Tensor:
        """``fn(W, ...)`` given only what it reads: ``w_max`` if it needs one, the step's norm
        and decay if it is coupled to the step, and its own ``options`` (``iters``, ``state``,
        ``spectral_decay``, ...), so every method can be called the same way."""
        if self.needs_w_max:
            options["w_max"] = w_max
        if self.coupled_to_step:
            options.update(update_norm=update_norm, weight_decay=weight_decay)
        return self.fn(W, **options)


# Tolerances (relative to w_max; float32 weights, bfloat16/float16 add their own rounding):
#   svd_cap             exact clip; float32 rounding of the Gram path (≤ 4e-6 by GRAM_CAP_MAX_RATIO,
#                       tests/test_constraints.py) or of U·S·Vᵀ beyond it
#   spectral_hard_cap   the unresolved sign gap of msign: ≤ 8e-4 measured up to 4096×1024
#                       (docs/benchmarks.md), 1e-3 stated in the function's docstring
#   stiefel             accurate8 band [0.9999, 1.0001]·w_max plus float32 rounding (the
#                       default coefficients; other sets reach linalg.NS_MAX_OUTPUT)
#   spectral_soft_cap   the coupling maps k onto w_max (paper Thm 3.1) while k ≤ SOFT_CAP_MAX_K
#                       ·w_max: float32 rounding only, measured ≤ 3.1e-7 under worst-case steps
#                       aligned with the top singular vectors
#   spectral_normalize  16 power iterations give a lower bound on σ_max: worst seen 2.2% from a
#                       cold start (4400 matrices drawn as tests/matrices.py does;
#                       docs/testing.md), 1.8% in training before the warm start caught up
#   row_rms_cap         one exact division per row; float32 rounding
#   the others          bound nothing (spectral_hammer leaves σ₂ free, see its docstring)
METHODS: dict[str, Constraint] = {
    c.name: c
    for c in (
        Constraint(
            "none", none, needs_w_max=False, stackable=True, guarantee="no bound", tolerance=None
        ),
        Constraint(
            "spectral_normalize", spectral_normalize, needs_w_max=True, stackable=False,
            guarantee="up to power-iteration error", tolerance=5e-2, stateful=True,
        ),
        Constraint(
            "spectral_hammer", spectral_hammer, needs_w_max=True, stackable=False,
            guarantee="no", tolerance=None, stateful=True,
        ),
        Constraint(
            "spectral_soft_cap", spectral_soft_cap, needs_w_max=True, stackable=True,
            guarantee="if step ≤ 0.3·w_max", tolerance=1e-5, coupled_to_step=True,
        ),
        Constraint(  # not stackable: the number of stages comes from the whole stack's σ_max
            "spectral_hard_cap", spectral_hard_cap, needs_w_max=True, stackable=False,
            guarantee="yes (≤ 1e-3 over)", tolerance=1e-3,
        ),
        Constraint(
            "svd_cap", svd_cap, needs_w_max=True, stackable=True, guarantee="exact",
            tolerance=1e-5,
        ),
        Constraint(
            "stiefel", stiefel, needs_w_max=True, stackable=True, guarantee="yes",
            tolerance=2e-4,
        ),
        Constraint(
            "spectral_weight_decay", spectral_weight_decay, needs_w_max=False, stackable=False,
            guarantee="no", tolerance=None, stateful=True,
        ),
        Constraint(
            "row_rms_cap", row_rms_cap, needs_w_max=True, stackable=True, guarantee="exact",
            tolerance=1e-5, per_row=True,
        ),
    )
}  # fmt: skip
"""Every constraint method by name, with its facts (see :class:`Constraint`)."""

CONSTRAINTS: dict[str, Callable[..., Tensor]] = {
    name: c.fn for name, c in METHODS.items() if not c.per_row
}
"""The matrix constraints (measured by the RMS→RMS norm) by name: :data:`METHODS` but the
per-row ones."""
