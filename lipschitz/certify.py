"""Certified Lipschitz upper bounds, empirical lower bounds, and the paper's σ table.

A certificate is compositional: every block has a *rule* that maps a bound ``a`` on the ∞RMS
norm of its input (largest per-token RMS) to ``(L, a_out)``, its Lipschitz constant on that ball
and a bound on its output; a model multiplies the L's of its blocks in forward order while
threading ``a`` through them (the paper's two stages, App. B, done in one walk). Bounds are
computed in float64 from the exact spectral norms of the weights as they are now.

The rules live with the blocks: each module of lipschitz.nn defines ``certificate(a, walk,
name)`` (lipschitz.nn.layers explains the protocol, docs/certificates.md derives every rule). A
module type we do not own gets one with :func:`register_rule`; a module with neither is an
error, and so is a subclass that does not define its own (it may compute something else).

Why the activation bound matters: attention is not globally Lipschitz; its Lipschitz constant on
the ball {‖x‖_∞RMS ≤ a} grows like a². Every ball is convex, so a bound on the Jacobian over the
ball is a Lipschitz bound there, and each block maps its ball into the next one.

``rule="paper"`` evaluates the paper's formulas (App. B) instead, to compare with published
numbers: its attention term ‖W_O‖/3·(‖W_V‖ + 2‖W_V‖‖W_Q‖‖W_K‖a²·s) is not an upper bound for
H > 1 heads and its MLP term ‖W_out‖‖W_in‖/1.1289 is 1.1289× too small (docs/certificates.md
derives both; the tests show counterexamples). Those formulas are the only rules kept here.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from lipschitz.linalg import rms_operator_norm, rms_scale, row_rms
from lipschitz.nn.layers import MLP, RESIDUALS, Block, CausalSelfAttention, Linear
from lipschitz.nn.models import BaselineMLP, LipschitzGPT, LipschitzMLP
from lipschitz.nn.vit import LipschitzViT

__all__ = [
    "RULES",
    "Certificate",
    "certificate_table",
    "certified_radii",
    "certify",
    "empirical_lipschitz",
    "jacobian_power_iteration",
    "margins",
    "register_rule",
]

RULE_SETS = ("certified", "paper")


@dataclass
class Certificate:
    """A Lipschitz upper bound and how it was obtained.

    ``lipschitz`` bounds ‖f(x) − f(y)‖_out ≤ L·‖x − y‖_in for all x, y in the input domain.
    For LipschitzGPT both norms are ∞RMS (largest per-token RMS) on logits; token inputs are
    measured per token in ℓ1 of the one-hot vector (two different tokens are at distance 2).
    For MLPs and the image transformer ``lipschitz`` is RMS→RMS (the paper's unit) and
    ``lipschitz_l2`` is ℓ2→ℓ2 over the whole input; ``pairwise_l2[i][j]`` then bounds the ℓ2→ℓ2
    constant of the logit difference z_i − z_j by ‖w_i − w_j‖·(bound of the head's input), with
    w_i the head's rows: tighter than √2·``lipschitz_l2`` (lipschitz.robustness uses it).
    ``layers`` has one entry per weight matrix (parameter names); ``steps`` one entry per
    composed step in forward order with its Lipschitz factor and activation bounds in and out.
    """

    lipschitz: float
    input_norm: str
    output_norm: str
    input_bound: float | None
    layers: list[dict]
    steps: list[dict] = field(default_factory=list)
    lipschitz_l2: float | None = None
    rule: str | None = None
    pairwise_l2: list[list[float]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class _Walk:
    """What a rule writes to: the per-matrix norms and the per-step bounds, in forward order.

    ``tokens``: the norm over the token axis the rules bound, ``"max"`` (the largest token's
    RMS: the language models) or ``"all"`` (the RMS over all entries, i.e. ℓ2 over the whole
    input: the image transformer). A per-token map has the same constant in both; a module is
    certified in the walk over all tokens only if its class says ``certifies_all_tokens``."""

    def __init__(self, rule: str, tokens: str = "max") -> None:
        self.rule, self.tokens = rule, tokens
        self.layers: list[dict] = []
        self.steps: list[dict] = []

    def norm(self, name: str, W: Tensor, **extra) -> float:
        """Exact float64 RMS→RMS norm of W, recorded under ``name``."""
        value = float(rms_operator_norm(W))
        self.layers.append({"name": name, "shape": list(W.shape), "rms_operator_norm": value})
        self.layers[-1].update(extra)
        return value

    def step(self, name: str, lipschitz: float, bound_in: float | None, bound_out: float) -> None:
        self.steps.append(
            {"name": name, "lipschitz": lipschitz, "bound_in": bound_in, "bound_out": bound_out}
        )

    def certify(self, module: nn.Module, a: float, name: str) -> tuple[float, float]:
        """(L, a_out) of ``module`` on inputs of token RMS ≤ a, by its rule in this rule set."""
        if self.tokens == "all" and not vars(type(module)).get("certifies_all_tokens", False):
            raise TypeError(
                f"{name}: {type(module).__name__} has no rule for ℓ2 over all tokens (set "
                "certifies_all_tokens = True on a class whose rule holds there)"
            )
        return _rule_for(module, self.rule)(module, a, self, name)


# A rule maps (module, input bound a, walk, name) to (Lipschitz bound on the a-ball, output bound).
Rule = Callable[[nn.Module, float, _Walk, str], tuple[float, float]]
RULES: dict[type, Rule] = {}


def register_rule(*types: type) -> Callable[[Rule], Rule]:
    """Decorator: use this rule for modules of exactly these types (subclasses need their own)."""

    def deco(rule: Rule) -> Rule:
        for t in types:
            RULES[t] = rule
        return rule

    return deco


def _own_rule(module: nn.Module, a: float, walk: _Walk, name: str) -> tuple[float, float]:
    return module.certificate(a, walk, name)


def _rule_for(module: nn.Module, rule: str = "certified") -> Rule:
    """The paper's formula (``rule="paper"``), a registered rule, or the module's own
    ``certificate(a, walk, name)``, defined by its own class (a subclass may compute something
    else, e.g. BaselineAttention's 1/√d logits)."""
    own = RULES.get(type(module))
    if rule == "paper":
        own = PAPER_RULES.get(type(module), own)
    if own is None and "certificate" in vars(type(module)):
        return _own_rule
    if own is None:
        raise TypeError(
            f"no certificate rule for {type(module).__name__}; give it a method "
            "certificate(a, walk, name) or register one with "
            f"lipschitz.certify.register_rule({type(module).__name__}), mapping an input "
            "activation bound to (Lipschitz bound, output activation bound)"
        )
    return own


register_rule(nn.Linear)(Linear.certificate)  # torch's own layer: the same rule as ours


# The paper's formulas (App. B), ``rule="paper"``: not upper bounds, kept to compare with its
# published numbers. Each records the same matrix norms as the module's own rule.
def _paper_mlp_rule(m: MLP, a: float, walk: _Walk, name: str) -> tuple[float, float]:
    """‖W_out‖‖W_in‖/1.1289 counts GELU itself as 1-Lipschitz; its slope is 1.1289."""
    return m.certificate(a, walk, name, gelu_slope=1.0)


def _paper_attention_rule(
    m: CausalSelfAttention, a: float, walk: _Walk, name: str
) -> tuple[float, float]:
    """(1/3)‖W_O‖(‖W_V‖ + 2‖W_V‖‖W_Q‖‖W_K‖a²·s) with its ×1/3 whatever the model's: valid for
    one head."""
    n, s, c = m.weight_norms(walk, name), m.attn_scale, 1 / 3
    return c * n["o"] * (n["v"] + 2 * s * n["v"] * n["q"] * n["k"] * a * a), c * n["o"] * n["v"] * a


def _paper_block_rule(m: Block, a: float, walk: _Walk, name: str) -> tuple[float, float]:
    """The paper's convex weights β = 1−α, γ = α, even for a ``residual="sum"`` block: what its
    May-2025 code reported for such a model."""
    return m.certificate(a, walk, name, weights=(1 - m.alpha, m.alpha))


PAPER_RULES: dict[type, Rule] = {
    MLP: _paper_mlp_rule,
    CausalSelfAttention: _paper_attention_rule,
    Block: _paper_block_rule,
}


def _certify_gpt(
    model: LipschitzGPT, inputs: str, input_bound: float | None, walk: _Walk
) -> tuple[float, str, str]:
    E = model.embed.weight.detach().double()  # (V, d): one row per token
    embed_norm = float(row_rms(E).max())  # ℓ1→RMS norm for one-hot inputs
    walk.norm("embed.weight", model.embed.weight, l1_to_rms=embed_norm)
    if inputs == "tokens":
        lipschitz, a, norm_in = embed_norm, embed_norm, "inf-l1 (token)"
        walk.step("embed", embed_norm, None, embed_norm)  # input: one-hot tokens, no RMS bound
    else:
        lipschitz, a, norm_in = 1.0, input_bound, "inf-RMS"
    for i, block in enumerate(model.blocks):  # true forward order
        L, a = walk.certify(block, a, f"blocks.{i}")
        lipschitz *= L
    name = "head.weight (tied to embed.weight)" if model.tie_head else "head.weight"
    head = walk.norm(name, model.head.weight) * model.final_scale
    walk.step("head", head, a, head * a)
    return lipschitz * head, norm_in, "inf-RMS"


def certify(
    model: nn.Module,
    *,
    inputs: str | None = None,
    input_bound: float | None = None,
    rule: str = "certified",
) -> Certificate:
    """Certified upper bound on the Lipschitz constant of ``model`` with its current weights.

    LipschitzGPT: ``inputs="tokens"`` (default) certifies token ids → logits, ∞ℓ1 (one-hot) →
    ∞RMS, starting from the embedding's largest row RMS; ``inputs="embeds"`` certifies
    ``model(inputs_embeds=x)`` on the domain {x : every token's RMS ≤ input_bound} (default 1),
    ∞RMS → ∞RMS. ``rule="paper"`` evaluates the paper's formulas instead (not a valid bound).
    LipschitzMLP / BaselineMLP: global RMS→RMS bound (``.lipschitz``) and ℓ2→ℓ2 (``.lipschitz_l2``).
    """
    if rule not in RULE_SETS:
        raise ValueError(f"rule must be one of {RULE_SETS}, got {rule!r}")
    _check_certifiable(model)
    walk = _Walk(rule)
    if type(model) is LipschitzGPT:
        inputs = inputs or "tokens"
        if inputs not in ("tokens", "embeds"):
            raise ValueError(f"inputs must be 'tokens' or 'embeds', got {inputs!r}")
        if inputs == "tokens" and input_bound is not None:
            raise ValueError("input_bound applies to inputs='embeds' only (tokens are one-hot)")
        if inputs == "embeds":
            input_bound = 1.0 if input_bound is None else float(input_bound)
            if not input_bound >= 0:
                raise ValueError(f"input_bound must be >= 0, got {input_bound!r}")
        L, norm_in, norm_out = _certify_gpt(model, inputs, input_bound, walk)
        return Certificate(L, norm_in, norm_out, input_bound, walk.layers, walk.steps, None, rule)
    if type(model) in (LipschitzMLP, BaselineMLP):
        if inputs not in (None, "features") or input_bound is not None:
            raise ValueError("an MLP certificate is global: pass neither inputs nor input_bound")
        L, a = 1.0, 1.0  # a: output RMS for an input of RMS 1 (ReLU keeps |x| entrywise)
        L_features = 1.0  # ℓ2→ℓ2 bound of the layers before the last (σ = RMS norm·√(out/in))
        for i, layer in enumerate(model.layers):
            n, a_next = walk.certify(layer, a, f"layers.{i}")
            walk.step(f"layers.{i}", n, a, a_next)
            L, a = L * n, a_next
            if i < len(model.layers) - 1:
                L_features *= n * rms_scale(layer.weight)
        d_in, d_out = model.layers[0].in_features, model.layers[-1].out_features
        l2 = L * math.sqrt(d_out / d_in)  # ‖y‖₂ = √d_out·RMS(y), ‖x‖₂ = √d_in·RMS(x)
        pairwise = _pairwise_l2(model.layers[-1].weight, L_features)
        return Certificate(L, "RMS", "RMS", None, walk.layers, walk.steps, l2, None, pairwise)
    if type(model) is LipschitzViT:
        if inputs not in (None, "features") or input_bound is not None:
            raise ValueError("an image certificate is global: pass neither inputs nor input_bound")
        walk.tokens = "all"
        L_features, l2 = model.certificate(walk)
        d_in, d_out = math.prod(model.image_shape), model.head.out_features
        pairwise = _pairwise_l2(model.head.weight, L_features)
        L = l2 * math.sqrt(d_in / d_out)
        return Certificate(L, "RMS", "RMS", None, walk.layers, walk.steps, l2, rule, pairwise)
    raise TypeError(
        f"no certificate for {type(model).__name__}: supported models are LipschitzGPT, "
        "LipschitzMLP, BaselineMLP and LipschitzViT (a LayerNorm model has no useful global bound)"
    )


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """True-class logit minus the largest other logit, per example (B,); < 0 if misclassified."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -math.inf)
    return true - others.amax(dim=1)


def certified_radii(
    logits: Tensor, labels: Tensor, lipschitz_l2: float, pairwise_l2: Tensor | None = None
) -> Tensor:
    """ℓ2 radius around each input within which its prediction provably stays correct (0 if
    it is misclassified): min over j ≠ y of (z_y − z_j) / M[y, j], where M[y, j] bounds the ℓ2
    Lipschitz constant of z_y − z_j: ``pairwise_l2`` (K, K) when given (certify's, from the
    head's rows), else √2·``lipschitz_l2`` for every pair."""
    if not lipschitz_l2 > 0:
        raise ValueError(f"lipschitz_l2 must be > 0, got {lipschitz_l2!r}")
    if pairwise_l2 is None:
        return (margins(logits, labels) / (math.sqrt(2) * lipschitz_l2)).clamp_min(0.0)
    diffs = logits.gather(1, labels[:, None]) - logits  # (B, K): z_y − z_j
    M = pairwise_l2.to(logits)[labels]  # (B, K)
    # M = 0: z_y − z_j is constant, so the pair never limits a correct prediction
    ratio = torch.where(M > 0, diffs / M.clamp_min(1e-300), torch.where(diffs > 0, math.inf, 0.0))
    ratio = ratio.scatter(1, labels[:, None], math.inf)  # j = y is no constraint
    return ratio.amin(dim=1).clamp_min(0.0)


def _pairwise_l2(head: Tensor, L_features: float) -> list[list[float]]:
    """‖w_i − w_j‖₂·L_features for every pair of the head's rows (K, d): the ℓ2 constant of
    z_i − z_j when the head's input is L_features-Lipschitz in ℓ2."""
    W = head.detach().double()
    return (torch.cdist(W, W) * L_features).tolist()


def _check_certifiable(model: nn.Module) -> None:
    """Refuse what would make the rules bound another function than the one that runs: a
    forward hook or pre-hook on any module (it may change what the module computes), a
    non-finite parameter or buffer, and constants set after construction to values the
    constructors refuse (a residual weight α = 1.5 makes β negative)."""
    for name, m in model.named_modules():
        where = f"module {name or '(the model)'!r} ({type(m).__name__})"
        if m._forward_hooks or m._forward_pre_hooks:
            raise ValueError(
                f"certify: {where} has a forward hook; a hook can change what the module "
                "computes, so its rule would not bound the model: remove the hook first"
            )
        for key in ("alpha", "out_mult", "attn_scale", "final_scale", "content_scale", "lag_gate"):
            value = getattr(m, key, None)
            if isinstance(value, int | float) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"certify: {where} has {key} = {value!r}; it must be finite, >= 0")
        if isinstance(m, Block) and not (0 < m.alpha <= 1 and m.residual in RESIDUALS):
            raise ValueError(
                f"certify: {where} has alpha = {m.alpha!r}, residual = {m.residual!r}; the rule "
                f"needs alpha in (0, 1] and residual in {RESIDUALS}"
            )
    if torch.nn.modules.module._global_forward_hooks or (
        torch.nn.modules.module._global_forward_pre_hooks
    ):
        raise ValueError("certify: a global forward hook is registered; remove it first")
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"certify: {kind} {name!r} holds a non-finite value (inf or NaN)")


# --------------------------------------------------------------------------------------------
# Empirical lower bounds: they must never exceed a certificate.


def _is_sequence_model(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and isinstance(getattr(model, "embed", None), nn.Embedding)


def _token_rms(x: Tensor) -> Tensor:
    return row_rms(x)  # (B, T) per-token RMS


def empirical_lipschitz(
    model: nn.Module,
    *,
    input_bound: float = 1.0,
    seq_len: int | None = None,
    n_pairs: int = 8,
    steps: int = 100,
    n_starts: int = 256,
    lr: float = 0.05,
    seed: int = 0,
) -> float:
    """Largest ‖f(x) − f(y)‖ / ‖x − y‖ found by gradient ascent: a lower bound.

    Sequence models (GPT): x, y are ``inputs_embeds`` (n_pairs, seq_len, d) kept inside the
    certificate's domain (every token's RMS ≤ ``input_bound``, projected back after each step),
    both norms ∞RMS; compare with ``certify(model, inputs="embeds", input_bound=...)``.
    MLPs and the image transformer: x, y ∈ R^in unconstrained, RMS norms; compare with
    ``certify(model).lipschitz``.
    Two searches, ``steps`` Adam steps each: ``n_pairs`` free pairs (x, y), then the local slope
    (``_slope_ascent``) from the pairs' first points and ``n_starts`` random points on the
    domain's boundary. Runs on a float64 copy of the model; every ratio is measured between
    two feasible points.
    """
    if n_pairs < 1 or steps < 0 or n_starts < 0:
        raise ValueError(
            "n_pairs must be >= 1, steps >= 0 and n_starts >= 0, "
            f"got {n_pairs}, {steps}, {n_starts}"
        )
    f = copy.deepcopy(model).double().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    if _is_sequence_model(f):
        if not input_bound > 0:
            raise ValueError(f"input_bound must be > 0, got {input_bound!r}")
        T = seq_len or f.blocks[0].attn.seq_len
        shape, scale = (n_pairs, T, f.embed.embedding_dim), input_bound

        def run(z: Tensor) -> Tensor:
            return f(inputs_embeds=z)

        def norm(z: Tensor) -> Tensor:  # ∞RMS per sample
            return _token_rms(z).amax(-1)

        def unit(z: Tensor) -> Tensor:  # every token at RMS 1: the ∞RMS ball's extreme points
            return z / _token_rms(z).clamp_min(1e-300).unsqueeze(-1)

        def project(z: Tensor, radius: float = input_bound) -> Tensor:  # every token RMS ≤ radius
            return z * (radius / _token_rms(z).clamp_min(radius)).unsqueeze(-1)
    else:
        n_in = math.prod(f.image_shape) if hasattr(f, "image_shape") else f.layers[0].in_features
        shape, scale = (n_pairs, n_in), 1.0
        run = f

        def norm(z: Tensor) -> Tensor:  # RMS per sample
            return z.flatten(1).pow(2).mean(-1).sqrt()

        def unit(z: Tensor) -> Tensor:
            return z / norm(z).clamp_min(1e-300).view(-1, *[1] * (z.ndim - 1))

        def project(z: Tensor, radius: float = 1.0) -> Tensor:  # the whole space
            return z

    x = project(torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
    y = project(x + 0.1 * scale * torch.randn(shape, generator=gen, dtype=torch.float64))
    best, x = _pair_ascent(run, x, y, norm, project, scale, steps, lr)
    # random starts of 3× the ball's radius, projected: on the boundary, where slopes are largest
    noise = torch.randn((n_starts, *shape[1:]), generator=gen, dtype=torch.float64)
    boundary = project(3 * scale * noise)
    starts = torch.cat([x, boundary])
    slope = _slope_ascent(run, starts, norm, unit, partial(project, radius=0.999 * scale), scale,
                          gen, steps, lr)  # fmt: skip
    return max(best, slope)


def _pair_ascent(
    run: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    norm: Callable[[Tensor], Tensor],
    project: Callable[[Tensor], Tensor],
    scale: float,
    steps: int,
    lr: float,
) -> tuple[float, Tensor]:
    """Adam on pairs (x, y) to maximise ‖f(x) − f(y)‖ / ‖x − y‖; returns (best ratio, final x)."""
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    opt = torch.optim.Adam([x, y], lr=lr * scale)
    best = 0.0
    for i in range(steps + 1):
        fx, fy = run(torch.cat([x, y])).chunk(2)  # one forward for both points of each pair
        ratio = norm(fx - fy) / norm(x - y).clamp_min(1e-12 * scale)  # (n_pairs,)
        best = max(best, float(ratio.detach().max()))
        if i == steps:
            break
        opt.zero_grad()
        (-ratio.clamp_min(1e-300).log().sum()).backward()
        opt.step()
        with torch.no_grad():
            x.copy_(project(x))
            y.copy_(project(y))
    return best, x.detach()


def _slope_ascent(
    run: Callable[[Tensor], Tensor],
    x: Tensor,
    norm: Callable[[Tensor], Tensor],
    unit: Callable[[Tensor], Tensor],
    project: Callable[[Tensor], Tensor],
    scale: float,
    gen: torch.Generator,
    steps: int,
    lr: float,
) -> float:
    """Largest ‖f(x + h·u) − f(x − h·u)‖ / ‖2h·u‖ found by Adam on the point x and the
    direction u together, from the points x (B, ...).

    ``unit`` puts u on the input ball's extreme points (for ∞RMS: every token at RMS 1), so
    ‖2h·u‖ = 2h; ``project`` keeps x a margin inside the domain, so x ± h·u (h = 10⁻³·scale)
    are feasible and each value is a true ratio of two feasible points, also where f is not
    differentiable. Climbing x and u jointly beats alternating a power method on u with steps
    on x: on the docs' 8-head example it finds 1.018 (docs/certificates.md).
    """
    h = 1e-3 * scale
    x = project(x).requires_grad_()
    u = torch.randn(x.shape, generator=gen, dtype=torch.float64).requires_grad_()
    opt = torch.optim.Adam([{"params": [x], "lr": lr * scale}, {"params": [u], "lr": lr}])
    best = 0.0
    for i in range(steps + 1):
        z, d = project(x), unit(u)
        ratio = norm(run(z + h * d) - run(z - h * d)) / norm(2 * h * d)  # (B,)
        best = max(best, float(ratio.detach().max()))
        if i == steps:
            break
        opt.zero_grad()
        (-ratio.clamp_min(1e-300).log().sum()).backward()
        opt.step()
    return best


def jacobian_power_iteration(model: nn.Module, x: Tensor, iters: int = 30, seed: int = 0) -> float:
    """Largest RMS→RMS norm of the Jacobian of an MLP at the samples x (B, ...): a lower bound.

    Power iteration on JᵀJ per sample in float64 (Jᵀu by backprop, Jv by differentiating Jᵀu
    in u), scaled by √(in/out) to RMS units. For a ReLU MLP the Jacobian at almost every x is
    the map on a region with interior, so its norm never exceeds the Lipschitz constant.
    """
    if _is_sequence_model(model):
        raise TypeError("jacobian_power_iteration is for MLPs (samples processed independently)")
    f = copy.deepcopy(model).double().eval().requires_grad_(False)
    x = x.detach().double().requires_grad_()
    y = f(x)  # (B, out)
    u0 = torch.zeros_like(y, requires_grad=True)
    (jt_u0,) = torch.autograd.grad(y, x, u0, create_graph=True)  # Jᵀu0, linear in u0

    def unit(z: Tensor) -> Tensor:
        return z / z.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, *[1] * (z.ndim - 1))

    def jvp(v: Tensor) -> Tensor:  # J v = d(Jᵀu0·v)/du0
        return torch.autograd.grad(jt_u0, u0, v, retain_graph=True)[0]

    gen = torch.Generator().manual_seed(seed)
    v = unit(torch.randn(x.shape, generator=gen, dtype=torch.float64))
    for _ in range(iters):
        v = unit(torch.autograd.grad(y, x, jvp(v), retain_graph=True)[0])  # JᵀJ v
    sigma = jvp(v).flatten(1).norm(dim=1)  # (B,) ℓ2 operator norm estimates
    d_in, d_out = x[0].numel(), y[0].numel()
    return float(sigma.max()) * math.sqrt(d_in / d_out)


# --------------------------------------------------------------------------------------------
# The paper's Shakespeare table: its App. B formula with every matrix at σ.


def _shakespeare_model(vocab_size: int, d_model: int, n_layer: int, n_head: int) -> LipschitzGPT:
    return LipschitzGPT(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layer=n_layer,
        n_head=n_head,
        seq_len=8,
        zero_init_out=False,
        zero_init_head=False,
    )


def certificate_table(
    sigmas: tuple[float, ...] = (1.0, 1.2, 1.6, 2.0),
    *,
    vocab_size: int = 65,
    d_model: int = 256,
    n_layer: int = 3,
    n_head: int = 4,
) -> list[dict]:
    """Certificates of the Shakespeare-shaped LipschitzGPT with every matrix at RMS→RMS norm σ.

    Each Linear (q, k, v, o, fc_in, fc_out, head) is its orthogonal init (norm 1) times σ, so
    every head block has spectral norm σ too; embedding rows have RMS 1. Token-input certificate.
    """
    rows = []
    for sigma in sigmas:
        with torch.random.fork_rng():  # the orthogonal init draws random numbers
            torch.manual_seed(0)
            model = _shakespeare_model(vocab_size, d_model, n_layer, n_head)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, Linear):
                    mod.weight.mul_(sigma)
        rows.append(
            {
                "sigma": sigma,
                "paper": certify(model, rule="paper").lipschitz,
                "certified": certify(model).lipschitz,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lipschitz.certify",
        description="Certificates of the Shakespeare-shaped GPT with every matrix at norm σ.",
    )
    parser.add_argument("--table", action="store_true", help="print the Shakespeare σ table")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 1.2, 1.6, 2.0])
    args = parser.parse_args(argv)
    if not args.table:
        parser.error("nothing to do: pass --table")
    if not all(math.isfinite(x) and x > 0 for x in args.sigmas):
        parser.error(f"--sigmas must be finite and > 0, got {args.sigmas}")
    print("| σ | paper's rule (App. B) | certified (`certify(model)`) |")
    print("|---|---|---|")
    for row in certificate_table(tuple(args.sigmas)):
        print(f"| {row['sigma']:.1f} | {row['paper']:.4g} | {row['certified']:.4g} |")


if __name__ == "__main__":
    main()
