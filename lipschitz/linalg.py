"""Spectral norms and matrix functions: the one place that owns the units.

A weight ``W`` of shape ``(..., out, in)`` (PyTorch layout, leading dimensions are a stack of
independent matrices) is measured by its RMS→RMS operator norm

    ‖W‖_{RMS→RMS} = sqrt(in / out) · σ_max(W).

Everything here is batched over leading dimensions and never mixes matrices of a stack.

Odd matrix polynomials ``W·p(WᵀW)`` act on singular values: for ``W = U Σ Vᵀ`` they return
``U · Σ·p(Σ²) · Vᵀ``. They are evaluated on the smaller Gram matrix (``WᵀW`` when the matrix is
tall, ``WWᵀ`` when it is wide), so a polynomial costs two ``out×in×min`` products plus a few
``min×min`` products.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "NS_COEFFICIENTS",
    "NS_MAX_OUTPUT",
    "NS_OUTPUT_RANGE",
    "PowerIteration",
    "gram_polynomial",
    "head_spectral_norms",
    "msign",
    "odd_polynomial",
    "power_iteration",
    "rms_operator_norm",
    "rms_scale",
    "row_rms",
    "scalar_odd_polynomial",
    "spectral_norm_upper_bound",
]


def rms_scale(W: Tensor) -> float:
    """s = sqrt(out / in): a matrix with spectral norm s has RMS→RMS norm 1."""
    out_features, in_features = W.shape[-2], W.shape[-1]
    return math.sqrt(out_features / in_features)


def row_rms(x: Tensor, keepdim: bool = False) -> Tensor:
    """RMS over the last dimension: a token's RMS norm, or an embedding row's (ℓ1→RMS) norm."""
    return x.square().mean(dim=-1, keepdim=keepdim).sqrt()


def rms_operator_norm(W: Tensor) -> Tensor:
    """Exact RMS→RMS norm of every matrix in ``W`` (float64 SVD); shape ``W.shape[:-2]``."""
    # on the CPU: float64 SVD is not available on every accelerator (e.g. Apple MPS)
    sigma = torch.linalg.matrix_norm(W.detach().to("cpu", torch.float64), ord=2)
    return sigma / rms_scale(W)


def head_spectral_norms(W: Tensor, n_head: int) -> list[float]:
    """Exact spectral norms (float64, not RMS units) of the ``n_head`` row blocks of W (out, in):
    head h's rows of a query, key or value projection."""
    blocks = W.detach().to("cpu", torch.float64).reshape(n_head, -1, W.shape[-1])  # (H, out/H, in)
    return torch.linalg.matrix_norm(blocks, ord=2).tolist()


# --------------------------------------------------------------------------------------------
# Spectral norm estimates: a cheap lower bound (power iteration) and a certified upper bound.


class PowerIteration(NamedTuple):
    """Result of :func:`power_iteration`: ``W v ≈ sigma · u`` with unit ``u`` and ``v``.

    ``sigma = ‖W v‖`` is always a lower bound on σ_max. ``basis`` (..., in, min(out, k)) is the
    iterated subspace rotated so that column 0 is ``v`` (the Rayleigh–Ritz directions; when
    out < k the directions W maps to zero are dropped): pass it back as ``v0`` to warm-start,
    so a slowly changing weight needs one or two iterations, not sixteen.
    """

    sigma: Tensor  # (...,)
    u: Tensor  # (..., out)
    v: Tensor  # (..., in)
    basis: Tensor  # (..., in, min(out, k))


def power_iteration(
    W: Tensor, iters: int = 16, v0: Tensor | None = None, block: int = 4
) -> PowerIteration:
    """Top singular triple of every matrix in ``W`` (..., out, in) by block power iteration.

    Iterates a ``block``-column subspace V ← orth(WᵀW·V), then takes the best vector in it
    (Rayleigh–Ritz: the SVD of the small W·V). With several columns an unlucky start vector
    cannot hide the top direction, and convergence goes like (σ_{k+1}/σ₁)^(2·iters), not
    (σ₂/σ₁)^(2·iters): on a flat-topped spectrum that is the difference between a 5% and a
    0.1% error. ``v0`` is a vector (..., in) or a basis (..., in, k) from a previous call; by
    default the start is a fixed pseudo-random block (a seeded generator: the global RNG is
    untouched and results are reproducible).
    """
    if iters < 0:
        raise ValueError(f"power_iteration: iters must be >= 0, got {iters}")
    Wf = W.detach()
    Wf = Wf if Wf.dtype in (torch.float32, torch.float64) else Wf.float()
    batch, n = Wf.shape[:-2], Wf.shape[-1]
    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        V = torch.randn(*batch, n, min(block, n), generator=gen, dtype=torch.float64)
    else:
        V = v0.detach() if v0.ndim == Wf.ndim else v0.detach().unsqueeze(-1)
        V = V.expand(*batch, *V.shape[-2:])
    V = torch.linalg.qr(V.to(device=Wf.device, dtype=Wf.dtype)).Q  # (..., in, k) orthonormal
    for _ in range(iters):
        V = torch.linalg.qr(Wf.mT @ (Wf @ V)).Q
    Ub, Sb, Vhb = torch.linalg.svd(Wf @ V, full_matrices=False)  # Rayleigh–Ritz on (out, k)
    basis = V @ Vhb.mT  # rotate the subspace so column 0 is the best vector
    return PowerIteration(Sb[..., 0], Ub[..., 0], basis[..., 0], basis)


def spectral_norm_upper_bound(W: Tensor, iters: int = 6) -> Tensor:
    """Certified upper bound on σ_max of every matrix in ``W`` by Gram iteration, in float64.

    With G₁ = WᵀW (the smaller Gram matrix) and G_{k+1} = G_k², the singular values of G_k are
    σᵢ^(2^k), so σ_max ≤ ‖G_k‖_F^(1/2^k), and the bound tightens towards σ_max as k grows
    (over-estimate at most min(out, in)^(1/2^(k+1))). Each G is rescaled to unit Frobenius norm
    with the scale carried in log space, so nothing overflows. Float64 rounding of the products
    changes the k-th root by far less than the 1e-9 relative margin added at the end.
    Cost: one Gram product plus ``iters - 1`` products of the small side. A matrix with a NaN
    or ±inf entry gets +inf (there is no finite bound), never a number that looks certified.
    """
    if iters < 1:
        raise ValueError(f"spectral_norm_upper_bound: iters must be >= 1, got {iters}")
    X = W.detach().to(torch.float64)
    peak = X.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)  # (...,)
    X = X / peak[..., None, None]  # entries in [-1, 1]: the first Gram product cannot overflow
    G = X.mT @ X if X.shape[-2] >= X.shape[-1] else X @ X.mT  # (..., n, n), n = min(out, in)
    log_scale = 2 * peak.log()  # G₁ of W = peak² · G
    for k in range(1, iters + 1):
        # Invariant: true G_k = exp(log_scale) · G, with the singular values of G_k = σᵢ^(2^k).
        fro = torch.linalg.matrix_norm(G).clamp_min(torch.finfo(torch.float64).tiny)
        G = G / fro[..., None, None]
        log_scale = log_scale + fro.log()
        if k < iters:
            G = G @ G
            log_scale = 2 * log_scale
    fro = torch.linalg.matrix_norm(G)
    bound = torch.exp((log_scale + fro.log()) / 2**iters)
    bound = torch.where(fro == 0, torch.zeros_like(bound), bound)  # the zero matrix
    finite = torch.isfinite(W.detach()).flatten(-2).all(-1)  # (...,)
    bound = torch.where(finite, bound, torch.full_like(bound, math.inf))  # no finite bound
    return bound * (1 + 1e-9)


# --------------------------------------------------------------------------------------------
# Odd matrix polynomials W·p(WᵀW).


def gram_polynomial(A: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """Σ_k coeffs[k]·A^k for a batch of square matrices ``A`` (..., n, n).

    Paterson–Stockmeyer with blocks of two: with B = A², the polynomial is a Horner polynomial
    in B whose coefficients are (c₀ + c₁A), (c₂ + c₃A), ...; degree 2 costs one n×n product,
    degree 4 costs two.
    """
    if len(coeffs) == 0:
        raise ValueError("gram_polynomial: at least one coefficient is needed")

    def add_block(P: Tensor, pair: tuple[float, ...]) -> Tensor:  # P + c₀·I + c₁·A, in place
        if len(pair) == 2 and pair[1] != 0:
            P.add_(A, alpha=pair[1])
        P.diagonal(dim1=-2, dim2=-1).add_(pair[0])
        return P

    blocks = [tuple(coeffs[i : i + 2]) for i in range(0, len(coeffs), 2)]
    if len(blocks) == 1:
        return add_block(torch.zeros_like(A), blocks[0])
    B = A @ A
    top = blocks[-1]
    # A lone top coefficient needs no product.
    P = top[0] * B if len(top) == 1 else add_block(torch.zeros_like(A), top) @ B
    for j in range(len(blocks) - 2, -1, -1):
        P = add_block(P, blocks[j])
        if j > 0:
            P = P @ B
    return P


def odd_polynomial(W: Tensor, coeffs: tuple[float, ...], gram_scale: float = 1.0) -> Tensor:
    """W·p(c·WᵀW) with p(a) = Σ_k coeffs[k]·a^k and c = ``gram_scale``: on singular values,
    σ ↦ σ·p(c·σ²).

    Works on (..., out, in) in the input dtype (float32, bfloat16 or float64) and uses the
    smaller Gram matrix.
    """
    if W.shape[-2] >= W.shape[-1]:  # tall or square: A = WᵀW is (in, in)
        A = W.mT @ W
        return W @ gram_polynomial(A if gram_scale == 1.0 else A * gram_scale, coeffs)
    A = W @ W.mT  # wide: A = WWᵀ is (out, out)
    return gram_polynomial(A if gram_scale == 1.0 else A * gram_scale, coeffs) @ W


def scalar_odd_polynomial(x: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """The scalar map σ ↦ σ·Σ_k coeffs[k]·σ^(2k) that :func:`odd_polynomial` applies to σ."""
    a = x * x
    p = torch.zeros_like(x)
    for c in reversed(coeffs):
        p = p * a + c
    return x * p


# --------------------------------------------------------------------------------------------
# Newton–Schulz orthogonalization: msign(W) = U Vᵀ.

_YOU_6 = tuple(
    (a / 1024, b / 1024, c / 1024)
    for a, b, c in [
        (3955, -8306, 5008),
        (3735, -6681, 3463),
        (3799, -6499, 3211),
        (4019, -6385, 2906),
        (2677, -3029, 1162),
        (2172, -1833, 682),
    ]
)
_NANOGPT_5 = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
_JORDAN_5 = ((3.4445, -4.7750, 2.0315),) * 5
# Classical quintic Newton–Schulz: the degree-5 Padé-type iteration with a triple fixed point at
# 1 (p(1) = 1, p'(1) = p''(1) = 0), so it converges cubically once singular values are near 1.
_CLASSIC = (15 / 8, -10 / 8, 3 / 8)

# Named coefficient sets. Each step is x ↦ a·x + b·x³ + c·x⁵, applied after dividing W by its
# Frobenius norm (so every singular value starts in [0, 1]).
#   you6       the paper's JAX set (You Jiacheng): never exceeds 1
#   nanogpt5   the paper's NanoGPT set: its largest output is the paper's "inflation factor"
#              (quoted there as 1.14502; NS_OUTPUT_RANGE rounds it outwards)
#   jordan5    Keller Jordan's Muon set
#   accurate8  ours: jordan5, then three classical steps; 8 steps in all
NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "you6": _YOU_6,
    "nanogpt5": _NANOGPT_5,
    "jordan5": _JORDAN_5,
    "accurate8": _JORDAN_5 + (_CLASSIC,) * 3,
}

# Range of each set's composed scalar map on x ∈ [1e-3, 1], rounded outwards to the digits shown
# (float64, 2M-point grid; tests/test_linalg.py::test_ns_output_ranges checks it is tight to 1e-4).
NS_OUTPUT_RANGE: dict[str, tuple[float, float]] = {
    "you6": (0.8663, 0.99934),
    "nanogpt5": (0.4749, 1.14503),
    "jordan5": (0.4705, 1.20237),
    "accurate8": (0.99994, 1.0000001),
}

# Upper bound of each set's scalar map on [0, 1]: how far one orthogonalized update can inflate a
# singular value. Muon multiplies its step size by this to know its update norm.
NS_MAX_OUTPUT: dict[str, float] = {name: hi for name, (lo, hi) in NS_OUTPUT_RANGE.items()}


def msign(W: Tensor, coefficients: str = "accurate8", dtype: torch.dtype | None = None) -> Tensor:
    """Approximate polar factor U Vᵀ of every matrix in ``W`` by Newton–Schulz iteration.

    ``coefficients`` names a set in :data:`NS_COEFFICIENTS`; ``dtype`` is the compute dtype
    (default: the input's), the result is returned in the input dtype. Zero singular values stay
    zero, so a rank-deficient W maps to a partial isometry.
    """
    try:
        steps = NS_COEFFICIENTS[coefficients]
    except KeyError:
        raise ValueError(
            f"msign: unknown coefficient set {coefficients!r}; known: {sorted(NS_COEFFICIENTS)}"
        ) from None
    X = W.to(dtype or W.dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT  # wide orientation: X Xᵀ is the small Gram matrix
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12)  # a zero matrix stays zero
    for a, b, c in steps:  # σ ↦ a·σ + b·σ³ + c·σ⁵
        A = X @ X.mT  # (..., m, m)
        B = b * A + c * (A @ A)
        X = a * X + B @ X  # a·X kept out of the product: fewer roundings in bfloat16
    return (X.mT if tall else X).to(W.dtype)
