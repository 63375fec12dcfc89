"""Shared test helpers: matrices with a prescribed spectrum, checked against float64 SVD, and
the exact local slope of a map (σ_max of its Jacobian)."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st


def random_orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """An n×k matrix with orthonormal columns (float64)."""
    q, r = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def matrix_with_spectrum(
    out_features: int, in_features: int, sigma_rms: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """(..., out, in) float64 matrix whose RMS→RMS singular values are ``sigma_rms`` (..., r)."""
    r = min(out_features, in_features)
    s = math.sqrt(out_features / in_features)
    mats = []
    for sig in sigma_rms.reshape(-1, r):
        U = random_orthonormal(out_features, r, gen)
        V = random_orthonormal(in_features, r, gen)
        mats.append(U @ torch.diag(sig * s) @ V.T)
    return torch.stack(mats).reshape(*sigma_rms.shape[:-1], out_features, in_features)


SPECTRA = ("uniform", "well_conditioned", "ill_conditioned", "rank_deficient", "flat_top")


def spectrum(kind: str, r: int, top: float, gen: torch.Generator) -> torch.Tensor:
    """r singular values (float64, descending order not guaranteed) whose largest is ``top``."""
    u = torch.rand(r, dtype=torch.float64, generator=gen)
    if kind == "uniform":
        sig = u
    elif kind == "well_conditioned":
        sig = 0.5 + 0.5 * u
    elif kind == "ill_conditioned":
        sig = 10.0 ** (-8 * u)
    elif kind == "rank_deficient":
        sig = u * (torch.arange(r) < max(1, r // 2))
    elif kind == "flat_top":
        sig = 1 - 0.05 * u
    else:
        raise ValueError(kind)
    sig = sig.clone()
    sig[torch.randint(r, (1,), generator=gen)] = 1.0  # make the maximum exactly `top`
    return top * sig / sig.max()


@st.composite
def matrix_cases(draw, max_dim: int = 40, max_top: float = 20.0):
    """A drawn test matrix: dict with W (float64), its RMS spectrum, w_max and the case."""
    orientation = draw(st.sampled_from(["square", "tall", "wide"]))
    a = draw(st.integers(2, max_dim))
    b = draw(st.integers(2, max_dim))
    out_features, in_features = {
        "square": (a, a),
        "tall": (max(a, b) + 1, min(a, b)),
        "wide": (min(a, b), max(a, b) + 1),
    }[orientation]
    stack = draw(st.sampled_from([(), (2,), (3,)]))
    kind = draw(st.sampled_from(SPECTRA))
    w_max = draw(st.sampled_from([0.25, 1.0, 3.0]))
    top_ratio = draw(st.sampled_from([0.3, 0.9, 1.0, 1.5, 2.0, 5.0, max_top]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    r = min(out_features, in_features)
    sig = torch.stack([spectrum(kind, r, top_ratio * w_max, gen) for _ in range(math.prod(stack))])
    sig = sig.reshape(*stack, r)
    W = matrix_with_spectrum(out_features, in_features, sig, gen)
    return {"W": W, "sigma": sig, "w_max": w_max, "kind": kind}


def rms_singular_values(W: torch.Tensor) -> torch.Tensor:
    """All RMS→RMS singular values (float64, descending) of every matrix in W."""
    s = math.sqrt(W.shape[-2] / W.shape[-1])
    return torch.linalg.svdvals(W.detach().to(torch.float64)) / s


def jacobian_norm(f, x: torch.Tensor) -> float:
    """σ_max of the exact Jacobian of z ↦ f(z[None])[0] at x (flattened in and out): the
    local ℓ2 slope of a batched map f at one input."""
    J = torch.autograd.functional.jacobian(lambda z: f(z[None])[0].flatten(), x)
    return float(torch.linalg.matrix_norm(J.flatten(1), ord=2))
