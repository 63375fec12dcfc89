"""Optimizers with steps of known norm, and the decay → step → project pipeline.

One training step, for every constrained weight W (paper §2)::

    W ← W·(1 − λ·η·tn)          decoupled weight decay      (inside optimizer.step)
    W ← W − η·update             the optimizer's step        (inside optimizer.step)
    W ← project(W; w_max, ...)   a CONSTRAINTS function      (a step post-hook, see constrain)

η is the group's ``lr``, tn its ``target_norm`` and λ its ``weight_decay``. Four pieces:

- :class:`Muon` takes steps whose RMS→RMS norm is known: η·tn times the Newton–Schulz set's
  largest output. It is the optimizer that lets the spectral soft cap guarantee its bound.
- :func:`route_parameters` splits any ``nn.Module`` into hidden matrices, embeddings, a head and
  vectors, with the paper's target-norm (effective learning rate) multipliers.
- :func:`constrain` installs the projection on any ``torch.optim.Optimizer`` (Muon installs it on
  itself). Constraint options live in the param groups: ``constraint`` (a name from
  :data:`lipschitz.constraints.CONSTRAINTS`, or ``"row_rms_cap"`` for embeddings), ``w_max``
  and ``constraint_kwargs``. Power-iteration warm-start vectors are kept in
  ``optimizer.state[p]["constraint"]``, so they are saved and restored with ``state_dict``.
- :func:`distribute` splits the matrix work (Muon's msign, the projections) across the ranks of
  a process group under ``torchrun``: each matrix has one owner that computes it, and one
  all-gather gives every rank the new weights. Same-shaped matrices are always orthogonalized
  and projected as one stacked call; ``optimizer.lipschitz_work`` counts the matrices.

Decay belongs to the optimizer's step, as in ``torch.optim``: Muon decays by λ·η·tn (the
paper); ``torch.optim.AdamW`` decays by λ·η, so to reproduce the paper's λ·η·tn for AdamW give
each group ``weight_decay = λ·target_norm``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer, ParamsT

from lipschitz.constraints import CONSTRAINTS, row_rms_cap
from lipschitz.linalg import NS_COEFFICIENTS, NS_MAX_OUTPUT, msign, rms_scale, row_rms

__all__ = [
    "SOFT_CAP_MAX_K",
    "UPDATE_NORM_MARGIN",
    "Muon",
    "assign_ranks",
    "constrain",
    "distribute",
    "route_parameters",
    "row_rms_cap",
    "sync_constraint_state",
]

# Safety margin on Muon's update-norm bound handed to the soft cap (the paper's NanoGPT script:
# η·1.14502·1.05). It covers bfloat16 Newton–Schulz rounding: measured σ_max(msign) up to 1.3%
# above NS_MAX_OUTPUT in bfloat16 (you6; 64×64 to 512×512), none in float32.
UPDATE_NORM_MARGIN = 1.05

# The soft cap keeps its promise while k = w_max·(1 − decay) + update_norm ≤ (81/62)·w_max
# (see lipschitz.constraints.soft_cap_alpha), i.e. steps up to ~0.306·w_max without decay.
SOFT_CAP_MAX_K = 81 / 62

_NS_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_RULES = ("matrix", "embedding")


# --------------------------------------------------------------------------------------------
# Muon


class Muon(Optimizer):
    """Muon with modular dualization: steps of a known RMS→RMS norm.

    For a weight of shape ``(..., out, in)`` (each matrix on the last two dimensions, a stack is
    never flattened across matrices) with gradient g, per step::

        μ  = momentum, warmed linearly from momentum_start over momentum_warmup_steps
        m ← μ·m + (1 − μ)·g                               (EMA, the paper's JAX code)
        u = m,  or with nesterov: u = (1 − μ)·g + μ·m     (the paper's NanoGPT script)
        W ← W·(1 − λ·η·tn)
        W ← W − η·tn·sqrt(out/in)·msign(u)                rule "matrix"
        W ← W − η·tn·u_row / max(1/max_inflation, rms(u_row))   rule "embedding"

    The "matrix" step has RMS→RMS norm η·tn·σ_max(msign(u)) ≤ η·tn·NS_MAX_OUTPUT[coefficients].
    The "embedding" rule gives each token row of an ``nn.Embedding`` weight (vocab, d) unit RMS,
    inflating a small row at most ``max_inflation`` times (paper: 16), so every row moves by at
    most η·tn in RMS.

    Args (all are also per-group options):
        lr: η (default 0.02).
        momentum: β or final μ (default 0.9, the paper's JAX value; NanoGPT uses 0.95).
        nesterov: Nesterov momentum as in the NanoGPT script (default False: plain EMA).
        momentum_warmup_steps, momentum_start: μ goes linearly from momentum_start to momentum
            over this many steps (default 0 steps: no warm-up; NanoGPT: 300 steps from 0.85).
        coefficients: Newton–Schulz set from ``NS_COEFFICIENTS`` (default "you6", which never
            inflates a singular value above 1).
        ns_dtype: compute dtype of Newton–Schulz (default float32; bfloat16 is faster on GPUs).
        weight_decay: λ, decoupled, scaled by η·tn (default 0).
        target_norm: tn, the group's share of the step (default 1; see route_parameters).
        rule: "matrix" or "embedding" (default "matrix").
        max_inflation: largest row inflation of the embedding rule (default 16).
        constraint, w_max, constraint_kwargs: the projection applied after each step (default
            "none"); see :func:`constrain`.

    Parity with ``torch.optim.Muon`` (nesterov=True, coefficients="jordan5",
    ns_dtype=bfloat16, weight_decay 0): torch scales by ``lr_t·sqrt(max(1, out/in))``
    (``adjust_lr_fn="original"``), we by ``lr·tn·sqrt(out/in)``. They agree for out ≥ in with
    lr_t = lr·tn, and for out < in with lr_t = lr·tn·sqrt(out/in). ("match_rms_adamw",
    0.2·sqrt(max(out, in)), has no shape-independent mapping.)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        momentum: float = 0.9,
        nesterov: bool = False,
        momentum_warmup_steps: int = 0,
        momentum_start: float = 0.85,
        coefficients: str = "you6",
        ns_dtype: torch.dtype = torch.float32,
        weight_decay: float = 0.0,
        target_norm: float = 1.0,
        rule: str = "matrix",
        max_inflation: float = 16.0,
        constraint: str = "none",
        w_max: float = 1.0,
        constraint_kwargs: dict | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            momentum_warmup_steps=momentum_warmup_steps,
            momentum_start=momentum_start,
            coefficients=coefficients,
            ns_dtype=ns_dtype,
            weight_decay=weight_decay,
            target_norm=target_norm,
            rule=rule,
            max_inflation=max_inflation,
            constraint=constraint,
            w_max=w_max,
            constraint_kwargs=constraint_kwargs or {},
        )
        super().__init__(params, defaults)
        constrain(self)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch.optim API) and check its options, raising ValueError if bad."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_muon_group(group)
        _check_constraint_group(self, group)

    def momentum_at(self, group: dict, step: int) -> float:
        """μ at a parameter's ``step`` (0-based): linear warm-up, then ``momentum``."""
        warmup = group["momentum_warmup_steps"]
        if step >= warmup:
            return group["momentum"]
        frac = step / warmup
        return (1 - frac) * group["momentum_start"] + frac * group["momentum"]

    def step_bound(self, group: dict) -> tuple[float, float]:
        """(update_norm, decay) of the step this group just took, for the soft cap.

        update_norm bounds the RMS→RMS norm of the step: η·tn·NS_MAX_OUTPUT·UPDATE_NORM_MARGIN;
        decay is the fraction λ·η·tn the weight was shrunk by before it.
        """
        eta = group["lr"] * group["target_norm"]
        max_out = NS_MAX_OUTPUT[group["coefficients"]]
        return eta * max_out * UPDATE_NORM_MARGIN, eta * group["weight_decay"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one step for every parameter with a gradient (constraints run after it).

        Same-shaped matrices of a group are orthogonalized together, as one stacked msign.
        Under :func:`distribute`, every rank updates every momentum buffer but orthogonalizes
        and steps only its share of the "matrix"-rule weights; the others arrive by all-gather.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eta = group["lr"] * group["target_norm"]
            todo: list[tuple[Tensor, Tensor]] = []  # (weight, momentum direction u)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(p)
                mu = self.momentum_at(group, state["step"])
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # m ← μ·m + (1 − μ)·g
                u = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                state["step"] += 1
                if group["rule"] == "embedding":  # every row to unit RMS, ≤ max_inflation×
                    rms = row_rms(u, keepdim=True)
                    self._decay_and_step(p, group, u / rms.clamp_min(1 / group["max_inflation"]),
                                         eta)  # fmt: skip
                elif _computes(self, p):
                    todo.append((p, u))
            for batch in _same_shape(todo):
                U = batch[0][1] if len(batch) == 1 else torch.stack([u for _, u in batch])
                O = msign(U, group["coefficients"], dtype=group["ns_dtype"])
                self.lipschitz_work["msign"] += _n_matrices(U)
                for i, (p, _) in enumerate(batch):
                    self._decay_and_step(p, group, O if len(batch) == 1 else O[i],
                                         eta * rms_scale(p))  # fmt: skip
        return loss

    @staticmethod
    def _decay_and_step(p: Tensor, group: dict, update: Tensor, scale: float) -> None:
        """W ← W·(1 − λ·η·tn), then W ← W − scale·update."""
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["target_norm"] * group["weight_decay"])
        p.add_(update, alpha=-scale)


def _check_muon_group(group: dict) -> None:
    """Raise ValueError naming the problem if a Muon group's options are invalid."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"Muon: {msg}")

    if not group["lr"] >= 0:
        raise bad(f"lr must be >= 0, got {group['lr']!r}")
    if not 0 <= group["momentum"] < 1:
        raise bad(f"momentum must be in [0, 1), got {group['momentum']!r}")
    if not 0 <= group["momentum_start"] < 1:
        raise bad(f"momentum_start must be in [0, 1), got {group['momentum_start']!r}")
    warmup = group["momentum_warmup_steps"]
    if not isinstance(warmup, int) or warmup < 0:
        raise bad(f"momentum_warmup_steps must be an int >= 0, got {warmup!r}")
    if group["coefficients"] not in NS_COEFFICIENTS:
        raise bad(
            f"unknown coefficients {group['coefficients']!r}; known: {sorted(NS_COEFFICIENTS)}"
        )
    if group["ns_dtype"] not in _NS_DTYPES:
        raise bad(f"ns_dtype must be one of {_NS_DTYPES}, got {group['ns_dtype']!r}")
    if not group["weight_decay"] >= 0:
        raise bad(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
    if not group["target_norm"] > 0:
        raise bad(f"target_norm must be > 0, got {group['target_norm']!r}")
    if group["lr"] * group["target_norm"] * group["weight_decay"] >= 1:
        raise bad("lr·target_norm·weight_decay must be < 1 (the decay would flip the weights)")
    if group["rule"] not in _RULES:
        raise bad(f"rule must be one of {_RULES}, got {group['rule']!r}")
    if not group["max_inflation"] >= 1:
        raise bad(f"max_inflation must be >= 1, got {group['max_inflation']!r}")
    for name, p in _named(group):
        if p.ndim < 2:
            raise bad(
                f"parameter {name} of shape {tuple(p.shape)} has fewer than 2 dimensions; "
                "Muon updates matrices: give vectors and scalars to AdamW (see route_parameters)"
            )


# --------------------------------------------------------------------------------------------
# Constraints attached to training


_ROW_CONSTRAINTS = {"row_rms_cap": row_rms_cap}
_NO_BOUND = ("none", "spectral_weight_decay")  # constraints that need no w_max


def _constraint_fn(name: str) -> Callable[..., Tensor]:
    return CONSTRAINTS.get(name) or _ROW_CONSTRAINTS[name]


def _named(group: dict) -> list[tuple[str, Tensor]]:
    """(name, parameter) pairs of a group; unnamed parameters are called by their shape."""
    names = group.get("param_names") or [f"<{tuple(p.shape)}>" for p in group["params"]]
    return list(zip(names, group["params"], strict=True))


def _check_constraint_group(optimizer: Optimizer, group: dict) -> None:
    """Raise ValueError naming the problem if a group's constraint options are invalid."""
    name = group.get("constraint", "none")
    known = sorted(CONSTRAINTS) + sorted(_ROW_CONSTRAINTS)
    if name not in known:
        raise ValueError(f"constrain: unknown constraint {name!r}; known: {known}")
    if name == "none":
        return
    if name == "spectral_soft_cap" and not hasattr(optimizer, "step_bound"):
        raise ValueError(
            f"constrain: spectral_soft_cap needs a bound on the norm of every step, and "
            f"{type(optimizer).__name__} steps have none (an AdamW step can be arbitrarily large "
            "in the spectral norm). Use Muon, or a constraint that does not depend on the step: "
            "svd_cap, spectral_hard_cap, spectral_normalize."
        )
    w_max = group.get("w_max")
    if name not in _NO_BOUND and (not isinstance(w_max, (int, float)) or not 0 < w_max < math.inf):
        raise ValueError(f"constrain: constraint {name!r} needs a finite w_max > 0, got {w_max!r}")
    if not isinstance(group.get("constraint_kwargs", {}), dict):
        raise ValueError("constrain: constraint_kwargs must be a dict")
    if group.get("rule") == "embedding" and name not in _ROW_CONSTRAINTS:
        raise ValueError(
            f"constrain: an embedding-rule group is measured per row; use 'row_rms_cap', "
            f"not the spectral constraint {name!r}"
        )
    for pname, p in _named(group):
        if p.ndim < 2:
            raise ValueError(
                f"constrain: constraint {name!r} needs a weight matrix (..., out, in), but "
                f"parameter {pname} has shape {tuple(p.shape)}"
            )


def constrain(optimizer: Optimizer) -> Optimizer:
    """Project every constrained parameter after each ``optimizer.step()``; returns optimizer.

    Works on any ``torch.optim.Optimizer``. Each param group may set ``constraint`` (default
    "none"), ``w_max`` (RMS→RMS bound) and ``constraint_kwargs`` (extra keyword arguments, e.g.
    ``{"iters": 4}``). Only parameters that had a gradient (i.e. were stepped) are projected.
    Groups are checked now; bad options raise ValueError naming the problem.

    ``spectral_soft_cap`` is coupled to the step: it needs the true norm of the step just taken,
    which only an optimizer with a ``step_bound(group) -> (update_norm, decay)`` method provides
    (Muon). With any other optimizer (AdamW) it is refused: an AdamW step has no norm bound, and
    driving the cap by a measured norm would need a copy of every weight and a certified norm
    estimate per step; use svd_cap, spectral_hard_cap or spectral_normalize instead. Soft-cap steps
    beyond the cap's guarantee (k > (81/62)·w_max) trigger one warning per optimizer.

    Muon calls this itself; call it once on other optimizers (a second call is an error).
    """
    if getattr(optimizer, "_lipschitz_constrained", False):
        raise ValueError("constrain: this optimizer already has its constraints installed")
    for group in optimizer.param_groups:
        _check_constraint_group(optimizer, group)
    warned = []

    @torch.no_grad()
    def project(opt: Optimizer, args: tuple, kwargs: dict) -> None:
        for group in opt.param_groups:
            name = group.get("constraint", "none")
            if name == "none":
                continue
            fn = _constraint_fn(name)
            kw = dict(group.get("constraint_kwargs", {}))
            if name not in _NO_BOUND:
                kw["w_max"] = group["w_max"]
            if name == "spectral_soft_cap":
                update_norm, decay = opt.step_bound(group)
                kw.update(update_norm=update_norm, weight_decay=decay)
                k = group["w_max"] * (1 - decay) + update_norm
                if k > SOFT_CAP_MAX_K * group["w_max"] and not warned:
                    warned.append(True)
                    warnings.warn(
                        f"spectral_soft_cap: step norm {update_norm:.4g} is beyond what the cap "
                        f"can absorb at w_max={group['w_max']} (k = {k:.4g} > (81/62)·w_max); "
                        "the bound is not guaranteed — lower the learning rate",
                        stacklevel=2,
                    )
            params = [p for p in group["params"] if p.grad is not None and _computes(opt, p)]
            if name in CONSTRAINTS:
                opt.lipschitz_work["projections"] += sum(_n_matrices(p) for p in params)
            if "state" in inspect.signature(fn).parameters:
                for p in params:  # power-iteration warm start, saved with the optimizer's state
                    p.copy_(fn(p, **kw, state=opt.state[p].setdefault("constraint", {})))
            elif name in _STACKABLE:
                for batch in _same_shape([(p, None) for p in params]):
                    if len(batch) == 1:
                        batch[0][0].copy_(fn(batch[0][0], **kw))
                        continue
                    out = fn(torch.stack([p for p, _ in batch]), **kw)
                    for i, (p, _) in enumerate(batch):
                        p.copy_(out[i])
            else:
                for p in params:
                    p.copy_(fn(p, **kw))

    optimizer.register_step_post_hook(project)
    optimizer._lipschitz_constrained = True
    optimizer.lipschitz_work = {"msign": 0, "projections": 0}
    optimizer._lipschitz_shard = None
    return optimizer


# Constraints whose result on a stack (k, out, in) is exactly that of each matrix alone, so
# same-shaped weights are projected in one batched call. (spectral_hard_cap picks its number of
# stages from the largest σ of the whole stack; the power-iteration ones keep per-weight state.)
_STACKABLE = ("spectral_soft_cap", "stiefel", "svd_cap", "row_rms_cap")


def _n_matrices(p: Tensor) -> int:
    return math.prod(p.shape[:-2])


def _same_shape(items: list[tuple[Tensor, object]]) -> list[list[tuple[Tensor, object]]]:
    """(weight, x) pairs grouped by weight shape, in order of first appearance."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault((tuple(item[0].shape), item[0].dtype), []).append(item)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# Matrix work split across ranks (torchrun)


class _Shard(NamedTuple):
    rank: int
    world_size: int
    owner: dict[int, int]  # id(weight) -> the rank that computes it
    params: list[Tensor]  # the split weights, in the same order on every rank
    group: object  # the process group (None: the default group)


def _computes(opt: Optimizer, p: Tensor) -> bool:
    """Whether this rank computes p's matrix work (always, unless the optimizer is distributed)."""
    shard = opt._lipschitz_shard
    return shard is None or shard.owner.get(id(p), shard.rank) == shard.rank


def matrix_cost(shape: tuple[int, ...]) -> int:
    """Relative cost of msign or a projection of a (..., out, in) weight: its Gram products,
    ∝ n_matrices · out · in · min(out, in)."""
    *lead, out_features, in_features = shape
    return math.prod(lead) * out_features * in_features * min(out_features, in_features)


def assign_ranks(shapes: list[tuple[int, ...]], world_size: int) -> list[int]:
    """A rank for every weight, balancing the total :func:`matrix_cost` per rank.

    Greedy: weights in decreasing cost (ties: in order), each to the least loaded rank (ties:
    the lowest rank). Deterministic, so every rank computes the same assignment.
    """
    if world_size < 1:
        raise ValueError(f"assign_ranks: world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    ranks = [0] * len(shapes)
    order = sorted(range(len(shapes)), key=lambda i: -matrix_cost(shapes[i]))
    for i in order:
        r = min(range(world_size), key=lambda r: (load[r], r))
        ranks[i] = r
        load[r] += matrix_cost(shapes[i])
    return ranks


def distribute(optimizer: Optimizer, process_group=None) -> Optimizer:
    """Split an optimizer's matrix work across the ranks of ``process_group``; returns it.

    Every rank must hold identical weights and (averaged) gradients before ``step()``. The
    expensive work is then done once, not once per rank: each split weight belongs to one rank
    (:func:`assign_ranks`), which alone orthogonalizes its update (Muon, "matrix" rule) and
    projects it (constraints from ``CONSTRAINTS``); after the step every rank receives the other
    ranks' new weights by one all-gather, so all ranks end the step with identical weights.
    Cheap elementwise work (momentum buffers, the embedding rule and its row cap, an AdamW
    step) is done by every rank, so optimizer states stay identical except the power-iteration
    warm starts of a rank's own weights (see :func:`sync_constraint_state`).

    ``optimizer.lipschitz_work`` counts the matrices this rank orthogonalized (``msign``) and
    projected (``projections``). The optimizer must already be constrained (Muon always is; call
    :func:`constrain` on others first).
    """
    import torch.distributed as dist

    if not getattr(optimizer, "_lipschitz_constrained", False):
        raise ValueError("distribute: call constrain(optimizer) first (Muon is constrained)")
    if optimizer._lipschitz_shard is not None:
        raise ValueError("distribute: this optimizer is already distributed")
    rank, world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
    params = []
    for group in optimizer.param_groups:
        if isinstance(optimizer, Muon):
            split = group["rule"] == "matrix"
        else:
            split = group.get("constraint", "none") in set(CONSTRAINTS) - {"none"}
        if split:
            params += group["params"]
    owners = assign_ranks([tuple(p.shape) for p in params], world_size)
    owner = {id(p): r for p, r in zip(params, owners, strict=True)}
    optimizer._lipschitz_shard = _Shard(rank, world_size, owner, params, process_group)

    @torch.no_grad()
    def gather(opt: Optimizer, args: tuple, kwargs: dict) -> None:
        shard = opt._lipschitz_shard
        stepped = [p for p in shard.params if p.grad is not None]  # the same on every rank
        for dtype in dict.fromkeys(p.dtype for p in stepped):
            by_rank = [[] for _ in range(shard.world_size)]
            for p in stepped:
                if p.dtype == dtype:
                    by_rank[shard.owner[id(p)]].append(p)
            size = max(sum(p.numel() for p in ps) for ps in by_rank)
            device = stepped[0].device
            mine = torch.zeros(size, dtype=dtype, device=device)
            if by_rank[shard.rank]:
                flat = torch.cat([p.reshape(-1) for p in by_rank[shard.rank]])
                mine[: flat.numel()] = flat
            out = [torch.empty_like(mine) for _ in range(shard.world_size)]
            dist.all_gather(out, mine, group=shard.group)
            for r, ps in enumerate(by_rank):
                if r == shard.rank:
                    continue
                offset = 0
                for p in ps:
                    p.copy_(out[r][offset : offset + p.numel()].view_as(p))
                    offset += p.numel()

    optimizer.register_step_post_hook(gather)  # after the projection hook
    return optimizer


def sync_constraint_state(optimizer: Optimizer) -> None:
    """Give every rank the power-iteration warm starts that each weight's owner keeps.

    Under :func:`distribute` only a weight's owner updates ``state[p]["constraint"]``; call this
    on every rank before saving the optimizer's state, so a checkpoint from any rank resumes
    exactly. A no-op for an optimizer that is not distributed.
    """
    import torch.distributed as dist

    shard = getattr(optimizer, "_lipschitz_shard", None)
    if shard is None:
        return
    mine = {}
    for i, p in enumerate(shard.params):
        state = optimizer.state.get(p, {}).get("constraint")
        if shard.owner[id(p)] == shard.rank and state:
            mine[i] = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in state.items()}
    everyone: list = [None] * shard.world_size
    dist.all_gather_object(everyone, mine, group=shard.group)
    for states in everyone:
        for i, state in states.items():
            p = shard.params[i]
            optimizer.state[p]["constraint"] = {
                k: v.to(p.device) if isinstance(v, Tensor) else v for k, v in state.items()
            }


# --------------------------------------------------------------------------------------------
# Parameter routing


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
    if head_rule not in _RULES:
        raise ValueError(f"route_parameters: head_rule must be one of {_RULES}, got {head_rule!r}")
    if head is None and isinstance(getattr(model, "head", None), nn.Linear):
        head = model.head
    factors, embed_factor = residual_target_factors(model, unit_scalars)
    routed: list[tuple[str, str, nn.Parameter]] = []  # (role, name, parameter)
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


def residual_target_factors(
    model: nn.Module, unit_scalars: bool = False
) -> tuple[dict[int, float], float]:
    """Modula's sensitivity factors for the residual Blocks of ``model`` (see route_parameters).

    Returns ({id(weight): factor} for every matrix inside a Block, factor of the embedding). The
    factor multiplies the equal share M of a hidden matrix; a Block of 6 matrices (q, k, v, o,
    fc_in, fc_out) splits its 6·M as attention 4/6 and MLP 2/6, then inside attention W_O gets
    1/4 and Q/K/V 1/(4c) (Modula gives the pair (V, scores) 3/4 and divides by c), inside the
    MLP each matrix 1/2. With convex residuals (γ = α, c = 1/3) every residual has sensitivity
    β + γ·s_f = 1, so the factors are 1/α for W_O and the MLP and 1/(α·c) for Q/K/V in every
    layer: the released code's multipliers. With ``residual="sum"`` (β = γ = 1, c = 1) the
    attention residual has sensitivity 4 and the MLP's 2, so each layer divides everything
    before it by 8: the per-layer learning-rate decay of the paper's App. D.
    ``unit_scalars=True`` computes the factors as if every scalar multiplier (β, γ, c) were 1,
    whatever the forward pass uses: the paper's App. D trick (Modula's ``Mul`` with
    sensitivity 1) on a convex model.
    """
    from lipschitz.nn.layers import Block  # routing reads the blocks' own constants

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    factors: dict[int, float] = {}
    after = 1.0  # product of the sensitivities of the residuals after the current one
    for block in reversed(blocks):  # from the output back to the input
        beta, gamma = (1.0, 1.0) if unit_scalars else block.weights
        c = 1.0 if unit_scalars else block.attn.out_mult
        paths = 3 if block.attn.q is not None else 1  # value path (+ query and key paths)
        s_attn, s_mlp = beta + gamma * paths * c, beta + gamma * 1.0
        for lin in (block.mlp.fc_in, block.mlp.fc_out):  # 6·(2/6)·(1/2)/γ
            factors[id(lin.weight)] = 1.0 / (gamma * after)
        after *= s_mlp
        factors[id(block.attn.o.weight)] = 1.0 / (gamma * after)  # 6·(4/6)·(1/4)/γ
        for lin in (block.attn.q, block.attn.k, block.attn.v):
            if lin is not None:  # no q, k in content-free attention
                factors[id(lin.weight)] = 1.0 / (gamma * c * after)
        after *= s_attn
    return factors, 1.0 / after
