"""Muon with modular dualization: an optimizer whose steps have a known RMS→RMS norm.

Per step, for a weight W of shape (..., out, in) with gradient g (paper §2)::

    m ← μ·m + (1 − μ)·g                      momentum (EMA; Nesterov optional)
    W ← W·(1 − λ·η·tn)                       decoupled weight decay
    W ← W − η·tn·sqrt(out/in)·msign(m)       the step: RMS→RMS norm ≤ η·tn·NS_MAX_OUTPUT

Knowing that norm is what lets the spectral soft cap (applied after the step by
:func:`lipschitz.optim.constrain`) guarantee its bound: :meth:`Muon.step_bound` hands it over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.profiler import record_function
from torch.optim.optimizer import Optimizer, ParamsT

from lipschitz.linalg import NS_COEFFICIENTS, NS_MAX_OUTPUT, msign, rms_scale, row_rms
from lipschitz.optim.projection import (
    batches_by_shape,
    check_constraint_group,
    constrain,
    n_matrices,
    named_params,
    post_step_of,
)

__all__ = ["RULES", "UPDATE_NORM_MARGIN", "Muon"]

# Safety margin on Muon's update-norm bound handed to the soft cap (the paper's NanoGPT script
# multiplies its inflation factor, NS_MAX_OUTPUT["nanogpt5"], by 1.05). It covers bfloat16
# Newton–Schulz rounding: measured σ_max(msign) up to 1.3% above NS_MAX_OUTPUT in bfloat16
# (you6; 64×64 to 512×512), none in float32.
UPDATE_NORM_MARGIN = 1.05

RULES = ("matrix", "embedding")  # Muon's update rules (see Muon)
_NS_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


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
        check_constraint_group(self, group)

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

    def has_matrix_work(self, group: dict) -> bool:
        """Whether the group's weights are orthogonalized (rule "matrix"): the work that
        :func:`~lipschitz.optim.distribute` splits across ranks."""
        return group["rule"] == "matrix"

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
        stages = post_step_of(self)  # installed by constrain in __init__
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
                elif stages.computes(p):
                    todo.append((p, u))
            for batch in batches_by_shape(todo):
                U = batch[0][1] if len(batch) == 1 else torch.stack([u for _, u in batch])
                with record_function("msign"):  # a label for `lipschitz bench profile`
                    O = msign(U, group["coefficients"], dtype=group["ns_dtype"])
                stages.count("msign", n_matrices(U))
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
    if group["rule"] not in RULES:
        raise bad(f"rule must be one of {RULES}, got {group['rule']!r}")
    if not group["max_inflation"] >= 1:
        raise bad(f"max_inflation must be >= 1, got {group['max_inflation']!r}")
    for name, p in named_params(group):
        if p.ndim < 2:
            raise bad(
                f"parameter {name} of shape {tuple(p.shape)} has fewer than 2 dimensions; "
                "Muon updates matrices: give vectors and scalars to AdamW (see route_parameters)"
            )
