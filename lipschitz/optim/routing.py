"""Parameter routing: any ``nn.Module``'s parameters split into param groups by role, with the
paper's target-norm (effective learning rate) multipliers (App. D, Modula's mass rule)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from lipschitz.optim.muon import RULES

__all__ = ["residual_target_factors", "route_parameters"]


def route_parameters(
    model: nn.Module,
    head: nn.Module | None = None,
    blocks_mass: float | None = None,
    unit_scalars: bool = False,
    head_rule: str = "matrix",
    matrix_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[dict]:
    """Split a model's parameters into param groups by module type (not by ndim).

    Roles: ``"embedding"`` (weights of ``nn.Embedding``), ``"head"`` (the weight of ``head``, or
    of ``model.head`` if that is an ``nn.Linear``), ``"hidden"`` (weights of the other
    ``matrix_types`` modules) and ``"vector"`` (every parameter with fewer than 2 dimensions:
    biases, norm gains, scalars). Another module owning a parameter with ≥ 2 dimensions is an
    error: add its type to ``matrix_types`` if its weight is (..., out, in). Tied parameters are
    listed once.

    Each group is a dict ``{"params": [(name, p), ...], "role", "target_norm", "rule"}`` (torch
    optimizers keep the names in ``param_names``; vector groups have no ``rule``). Give the
    non-vector groups to :class:`Muon` and the vectors to AdamW, adding ``constraint`` and
    ``w_max`` to the groups to be constrained.

    Target norms (multipliers of the Muon step; 1 for every group when ``blocks_mass`` is None)
    follow Modula's rule (paper App. D): the embedding and the head get mass 1 each and all
    hidden matrices together ``blocks_mass``, so each of n_hidden hidden matrices starts from
    M = blocks_mass / ((blocks_mass + n_io)·n_hidden) and the embedding and head from
    1 / (blocks_mass + n_io). A weight's share is then divided by the sensitivity of what
    follows it: in a residual :class:`~lipschitz.nn.layers.Block` x ← β·x + γ·f(x), the branch f
    by γ, Q/K/V by the attention's output multiplier c (×1/3), and every weight by the product of
    the sensitivities β + γ·s_f of the residuals after it (s_attn = 3c, s_mlp = 1). See
    :func:`residual_target_factors` (``unit_scalars``: the paper's App. D per-layer learning-rate
    trick). Paper's Shakespeare transformer (3 layers, convex residuals
    α = 1/6, so every residual has sensitivity 1): blocks_mass 32 → embed/head 1/34 = 0.0294,
    W_O and MLP 0.3137, Q/K/V 0.9412; blocks_mass 16 → 1/18 = 0.0556, 0.2963, 0.8889. CIFAR MLP
    (2 hidden + head, no residual): blocks_mass 2 → every layer 1/3.
    """
    if blocks_mass is not None and not blocks_mass > 0:
        raise ValueError(f"route_parameters: blocks_mass must be > 0, got {blocks_mass!r}")
    if head_rule not in RULES:
        raise ValueError(f"route_parameters: head_rule must be one of {RULES}, got {head_rule!r}")
    if head is None and isinstance(getattr(model, "head", None), nn.Linear):
        head = model.head
    factors, embed_factor = residual_target_factors(model, unit_scalars)
    routed = _roles(model, head, matrix_types)

    def n_matrices(p: Tensor) -> int:
        return math.prod(p.shape[:-2])

    n_io = sum(n_matrices(p) for role, _, p in routed if role in ("embedding", "head"))
    n_hidden = sum(n_matrices(p) for role, _, p in routed if role == "hidden")

    def target_norm(role: str, p: Tensor) -> float:
        if blocks_mass is None or role == "vector":
            return 1.0
        if role == "head":
            return 1 / (blocks_mass + n_io)
        if role == "embedding":
            return embed_factor / (blocks_mass + n_io)
        return blocks_mass / ((blocks_mass + n_io) * n_hidden) * factors.get(id(p), 1.0)

    rules = {"hidden": "matrix", "embedding": "embedding", "head": head_rule}
    groups: dict[tuple[str, float], dict] = {}
    for role, name, p in routed:
        tn = target_norm(role, p)
        if (role, tn) not in groups:
            groups[role, tn] = {"params": [], "role": role, "target_norm": tn}
            if role in rules:
                groups[role, tn]["rule"] = rules[role]
        groups[role, tn]["params"].append((name, p))
    return list(groups.values())


def _roles(
    model: nn.Module, head: nn.Module | None, matrix_types: tuple[type[nn.Module], ...]
) -> list[tuple[str, str, nn.Parameter]]:
    """(role, name, parameter) of every parameter, tied ones once (see route_parameters)."""
    routed = []
    seen = set()
    for mod_name, m in model.named_modules():
        for p_name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.ndim < 2 or getattr(m, "param_role", None) == "vector":
                role = "vector"
            elif m is head:
                role = "head"
            elif isinstance(m, nn.Embedding):
                role = "embedding"
            elif isinstance(m, matrix_types):
                role = "hidden"
            else:
                raise ValueError(
                    f"route_parameters: don't know how to treat {name} of shape "
                    f"{tuple(p.shape)} in a {type(m).__name__}; pass its type in matrix_types "
                    "if it is a (..., out, in) weight matrix"
                )
            routed.append((role, name, p))
    return routed


def residual_target_factors(
    model: nn.Module, unit_scalars: bool = False
) -> tuple[dict[int, float], float]:
    """Modula's sensitivity factors for the residual blocks of ``model`` (see route_parameters).

    Returns ({id(weight): factor} for every matrix inside a residual block, factor of the
    embedding). Every module that declares ``target_factors(after, unit_scalars)`` (e.g.
    lipschitz.nn.layers.Block, which explains the split) is a residual block; walked from the
    output back to the input, each one's factors divide by the sensitivities after it, and the
    embedding's by all of them. ``unit_scalars=True``: as if every scalar multiplier were 1
    (the paper's App. D trick).
    """
    blocks = [m for m in model.modules() if callable(getattr(m, "target_factors", None))]
    factors: dict[int, float] = {}
    after = 1.0  # product of the sensitivities of the residuals after the current one
    for block in reversed(blocks):  # from the output back to the input
        own, after = block.target_factors(after, unit_scalars)
        factors.update(own)
    return factors, 1.0 / after
