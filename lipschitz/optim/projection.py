"""The projection step: after every ``optimizer.step()``, each constrained weight goes back into
its norm ball (paper §2: decay → step → project).

:func:`constrain` installs it on any ``torch.optim.Optimizer``. Constraint options live in the
param groups: ``constraint`` (a name from :data:`lipschitz.constraints.METHODS`), ``w_max`` and
``constraint_kwargs``; every fact about a method (does it need w_max, may it project a stack,
does it keep state, is it coupled to the step) is read from its
:class:`~lipschitz.constraints.Constraint`. :func:`constraint_violations` checks afterwards that
every constrained weight is finite and inside its ball.

The seams the rest of ``lipschitz.optim`` uses: :class:`PostStep` (what runs after every step,
found with :func:`post_step_of`; Muon asks it which matrices this rank computes and counts its
work through it; :func:`~lipschitz.optim.distribute` hands it a :class:`Shard`), and the group
helpers :func:`check_constraint_group`, :func:`named_params`, :func:`batches_by_shape`,
:func:`n_matrices`.
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.profiler import record_function
from torch.optim.optimizer import Optimizer

from lipschitz.constraints import METHODS, SOFT_CAP_MAX_K
from lipschitz.linalg import rms_operator_norm, row_rms

__all__ = [
    "PostStep",
    "Shard",
    "batches_by_shape",
    "check_constraint_group",
    "constrain",
    "constraint_violations",
    "is_constrained",
    "n_matrices",
    "named_params",
    "post_step_of",
    "work_counts",
]


class Shard(Protocol):
    """Which weights this rank computes, and the exchange afterwards
    (lipschitz.optim.distributed.RankShard)."""

    def owns(self, p: Tensor) -> bool: ...

    def gather(self) -> None: ...


class PostStep:
    """What a constrained optimizer runs after every ``step()``, in this fixed order:

    1. project: every constrained parameter that had a gradient and that this rank computes
       (all of them, unless distributed) by its group's constraint;
    2. gather: under :func:`~lipschitz.optim.distribute`, one all-gather per dtype gives every
       rank the weights that the other ranks stepped and projected.

    One step post-hook (installed by :func:`constrain`) calls it. It also holds the matrix work
    counters (``msign``: orthogonalized by Muon; ``projections``: projected by a matrix
    constraint).
    """

    def __init__(self) -> None:
        self.shard: Shard | None = None  # set by distribute
        self.work = {"msign": 0, "projections": 0}
        self.warned = False  # a soft-cap step went beyond the cap's guarantee (warned once)

    def computes(self, p: Tensor) -> bool:
        """Whether this rank computes p's matrix work (always, unless distributed)."""
        return self.shard is None or self.shard.owns(p)

    def count(self, kind: str, n: int) -> None:
        """Add n matrices of work: ``"msign"`` (orthogonalized) or ``"projections"``."""
        self.work[kind] += n

    @torch.no_grad()
    def __call__(self, opt: Optimizer, args: tuple, kwargs: dict) -> None:
        with record_function("projection"):  # a label for `lipschitz bench profile`
            for group in opt.param_groups:
                self.project(opt, group)
        if self.shard is not None:
            self.shard.gather()

    def project(self, opt: Optimizer, group: dict) -> None:
        """Project the group's stepped parameters that this rank computes."""
        name = group.get("constraint", "none")
        if name == "none":
            return
        c = METHODS[name]
        kw = dict(group.get("constraint_kwargs", {}))
        if c.needs_w_max:
            kw["w_max"] = group["w_max"]
        if c.coupled_to_step:
            update_norm, decay = opt.step_bound(group)
            kw.update(update_norm=update_norm, weight_decay=decay)
            self._check_step(name, group, update_norm, decay)
        params = [p for p in group["params"] if p.grad is not None and self.computes(p)]
        if not c.per_row:
            self.count("projections", sum(n_matrices(p) for p in params))
        if c.stateful:
            for p in params:  # power-iteration warm start, saved with the optimizer's state
                p.copy_(c.fn(p, **kw, state=opt.state[p].setdefault("constraint", {})))
        elif c.stackable:
            for batch in batches_by_shape([(p, None) for p in params]):
                if len(batch) == 1:
                    batch[0][0].copy_(c.fn(batch[0][0], **kw))
                    continue
                out = c.fn(torch.stack([p for p, _ in batch]), **kw)
                for i, (p, _) in enumerate(batch):
                    p.copy_(out[i])
        else:
            for p in params:
                p.copy_(c.fn(p, **kw))

    def _check_step(self, name: str, group: dict, update_norm: float, decay: float) -> None:
        """Warn (once per optimizer) when a step is larger than the soft cap can absorb."""
        k = group["w_max"] * (1 - decay) + update_norm
        if k > SOFT_CAP_MAX_K * group["w_max"] and not self.warned:
            self.warned = True
            warnings.warn(
                f"{name}: step norm {update_norm:.4g} is beyond what the cap "
                f"can absorb at w_max={group['w_max']} (k = {k:.4g} > (81/62)·w_max); "
                "the bound is not guaranteed — lower the learning rate",
                stacklevel=6,  # the caller's optimizer.step() (through torch's hook wrapper)
            )


def post_step_of(optimizer: Optimizer) -> PostStep | None:
    """The stages :func:`constrain` installed on the optimizer, or None."""
    return getattr(optimizer, "_lipschitz_stages", None)


def is_constrained(optimizer: Optimizer) -> bool:
    """Whether :func:`constrain` has been called on the optimizer (Muon: always)."""
    return post_step_of(optimizer) is not None


def work_counts(optimizer: Optimizer) -> dict[str, int]:
    """Matrices this rank orthogonalized (``msign``) and projected by a matrix constraint
    (``projections``) since the optimizer was made; zeros for an unconstrained optimizer."""
    stages = post_step_of(optimizer)
    return dict(stages.work) if stages is not None else {"msign": 0, "projections": 0}


def n_matrices(p: Tensor) -> int:
    """How many matrices a (..., out, in) weight holds."""
    return math.prod(p.shape[:-2])


def batches_by_shape(items: list[tuple[Tensor, object]]) -> list[list[tuple[Tensor, object]]]:
    """(weight, x) pairs grouped by weight shape, in order of first appearance."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault((tuple(item[0].shape), item[0].dtype), []).append(item)
    return list(groups.values())


def named_params(group: dict) -> list[tuple[str, Tensor]]:
    """(name, parameter) pairs of a group; unnamed parameters are called by their shape."""
    names = group.get("param_names") or [f"<{tuple(p.shape)}>" for p in group["params"]]
    return list(zip(names, group["params"], strict=True))


def check_constraint_group(optimizer: Optimizer, group: dict) -> None:
    """Raise ValueError naming the problem if a group's constraint options are invalid."""
    name = group.get("constraint", "none")
    if name not in METHODS:
        raise ValueError(f"constrain: unknown constraint {name!r}; known: {sorted(METHODS)}")
    names = group.get("param_names")  # torch accepts any list here; the reports rely on it
    if names is not None and len(names) != len(group["params"]):
        raise ValueError(
            f"constrain: a param group has {len(names)} param_names for "
            f"{len(group['params'])} parameters"
        )
    if name == "none":
        return
    c = METHODS[name]
    if c.coupled_to_step and not hasattr(optimizer, "step_bound"):
        raise ValueError(
            f"constrain: {name} needs a bound on the norm of every step, and "
            f"{type(optimizer).__name__} steps have none (an AdamW step can be arbitrarily large "
            "in the spectral norm). Use Muon, or a constraint that does not depend on the step: "
            "svd_cap, spectral_hard_cap, spectral_normalize."
        )
    w_max = group.get("w_max")
    if c.needs_w_max and (not isinstance(w_max, (int, float)) or not 0 < w_max < math.inf):
        raise ValueError(f"constrain: constraint {name!r} needs a finite w_max > 0, got {w_max!r}")
    if not isinstance(group.get("constraint_kwargs", {}), dict):
        raise ValueError("constrain: constraint_kwargs must be a dict")
    if group.get("rule") == "embedding" and not c.per_row:
        per_row = [n for n, m in METHODS.items() if m.per_row]
        raise ValueError(
            f"constrain: an embedding-rule group is measured per row; use "
            f"{' or '.join(map(repr, per_row))}, not the spectral constraint {name!r}"
        )
    for pname, p in named_params(group):
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
    Groups are checked now; bad options raise ValueError naming the problem. Power-iteration
    warm starts are kept in ``optimizer.state[p]["constraint"]``, so they are saved and restored
    with ``state_dict``; same-shaped weights are projected as one stack where the method allows.

    ``spectral_soft_cap`` is coupled to the step: it needs the true norm of the step just taken,
    which only an optimizer with a ``step_bound(group) -> (update_norm, decay)`` method provides
    (Muon). With any other optimizer (AdamW) it is refused: an AdamW step has no norm bound, and
    driving the cap by a measured norm would need a copy of every weight and a certified norm
    estimate per step; use svd_cap, spectral_hard_cap or spectral_normalize instead. Soft-cap steps
    beyond the cap's guarantee (k > (81/62)·w_max) trigger one warning per optimizer.

    Installs one step post-hook running the stages of :class:`PostStep` in their fixed order.
    :func:`work_counts` reads the matrices it orthogonalized and projected.
    Muon calls this itself; call it once on other optimizers (a second call is an error).
    """
    if is_constrained(optimizer):
        raise ValueError("constrain: this optimizer already has its constraints installed")
    for group in optimizer.param_groups:
        check_constraint_group(optimizer, group)
    stages = PostStep()
    optimizer.register_step_post_hook(stages)
    optimizer._lipschitz_stages = stages
    return optimizer


# --------------------------------------------------------------------------------------------
# Health check


@torch.no_grad()
def constraint_violations(
    optimizer: Optimizer, known_norms: dict[str, float] | None = None
) -> list[dict]:
    """Constrained parameters that are not finite or lie outside their ball; [] when healthy.

    For every group with a constraint other than "none", each parameter's norm is measured
    exactly: the RMS→RMS norm (float64 SVD, the largest over a stack's matrices) for matrix
    constraints, the largest row RMS for per-row ones. A parameter is reported when it is not
    finite (norm nan) or its norm exceeds w_max·(1 + tolerance), with the method's
    :attr:`~lipschitz.constraints.Constraint.tolerance` (plus the dtype's rounding for bfloat16
    and float16 weights). Each entry is ``{"param", "constraint", "norm", "w_max",
    "guaranteed"}``; ``guaranteed`` says whether the method promises the bound (it has a
    tolerance), i.e. whether the entry is a failure rather than an expected excursion. The soft
    cap's promise holds only for steps within its range: a step beyond it was warned about when
    taken. Names come from the group's ``param_names`` (route_parameters gives them), else
    ``param_groups[i][j]``.

    Cost: one host sync for finiteness, then one float64 SVD per same-shaped stack on the CPU
    (what :func:`lipschitz.certify.certify` spends on the same matrices). ``known_norms``
    ({parameter name: RMS→RMS norm}, e.g. a certificate's per-layer norms of the same weights)
    skips the SVD of the matrices it names. Methods that take no ``w_max``
    (``spectral_weight_decay``) have no cap to measure against and are skipped.
    """
    found = []
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("constraint", "none")
        if name == "none":
            continue
        c = METHODS[name]
        if not c.needs_w_max:
            continue
        w_max = group.get("w_max")
        names = group.get("param_names") or [
            f"param_groups[{i}][{j}]" for j in range(len(group["params"]))
        ]
        known = {} if c.per_row else (known_norms or {})
        norms = _norms(group["params"], c.per_row, [known.get(n) for n in names])
        for pname, p, norm in zip(names, group["params"], norms, strict=True):
            rounding = torch.finfo(p.dtype).eps if p.element_size() < 4 else 0.0  # bf16, fp16
            limit = math.inf if w_max is None else w_max * (1 + (c.tolerance or 0.0) + rounding)
            if norm <= limit:  # False for nan
                continue
            found.append(
                {"param": pname, "constraint": name, "norm": norm, "w_max": w_max,
                 "guaranteed": c.tolerance is not None}
            )  # fmt: skip
    return found


def _norms(params: list[Tensor], per_row: bool, known: list[float | None]) -> list[float]:
    """Each parameter's largest norm (RMS→RMS per matrix, or row RMS); nan if not finite.
    A ``known`` value (not None) is used as it is instead of measuring that parameter."""
    if not params:
        return []
    finite = torch.stack([torch.isfinite(p).all() for p in params]).tolist()  # one host sync
    norms = [k if f and k is not None else math.nan for f, k in zip(finite, known, strict=True)]
    todo = [j for j, p in enumerate(params) if finite[j] and known[j] is None]
    order, values = [], []
    for batch in batches_by_shape([(params[j], j) for j in todo]):
        ps = [p.detach() for p, _ in batch]
        W = ps[0].unsqueeze(0) if len(ps) == 1 else torch.stack(ps)  # (k, ..., out, in)
        value = row_rms(W.float()) if per_row else rms_operator_norm(W)  # (k, ...)
        values.append(value.reshape(len(ps), -1).amax(1).to("cpu", torch.float64))
        order += [j for _, j in batch]
    if values:
        for j, value in zip(order, torch.cat(values).tolist(), strict=True):
            norms[j] = value
    return norms
