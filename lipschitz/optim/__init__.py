"""Optimizers with steps of known norm, and the decay → step → project pipeline.

One training step, for every constrained weight W (paper §2)::

    W ← W·(1 − λ·η·tn)          decoupled weight decay      (inside optimizer.step)
    W ← W − η·update             the optimizer's step        (inside optimizer.step)
    W ← project(W; w_max, ...)   a constraint (METHODS)      (after the step, see constrain)

η is the group's ``lr``, tn its ``target_norm`` and λ its ``weight_decay``. One idea per module:

- :mod:`~lipschitz.optim.muon`: :class:`Muon` takes steps whose RMS→RMS norm is known: η·tn
  times the Newton–Schulz set's largest output. It is the optimizer that lets the spectral soft
  cap guarantee its bound.
- :mod:`~lipschitz.optim.routing`: :func:`route_parameters` splits any ``nn.Module`` into hidden
  matrices, embeddings, a head and vectors, with the paper's target-norm multipliers.
- :mod:`~lipschitz.optim.projection`: :func:`constrain` installs the projection on any
  ``torch.optim.Optimizer`` (Muon installs it on itself). Constraint options live in the param
  groups: ``constraint`` (a name from :data:`lipschitz.constraints.METHODS`), ``w_max`` and
  ``constraint_kwargs``. :func:`constraint_violations` checks that every constrained weight is
  finite and inside its ball.
- :mod:`~lipschitz.optim.distributed`: :func:`distribute` splits the matrix work (Muon's msign,
  the projections) across the ranks of a process group under ``torchrun``: each matrix has one
  owner that computes it, and one all-gather gives every rank the new weights.
- :mod:`~lipschitz.optim.build`: the optimizers of a training run's config.

After ``step()`` a constrained optimizer runs its stages in a fixed order: project the weights
this rank owns, then (distributed) all-gather. Same-shaped matrices are orthogonalized and
projected as one stacked call; :func:`work_counts` counts the matrices.

Decay belongs to the optimizer's step, as in ``torch.optim``: Muon decays by λ·η·tn (the
paper); ``torch.optim.AdamW`` decays by λ·η, so to reproduce the paper's λ·η·tn for AdamW give
each group ``weight_decay = λ·target_norm``.
"""

from lipschitz.constraints import SOFT_CAP_MAX_K, row_rms_cap
from lipschitz.optim.build import build_optimizers, start_inside_constraints
from lipschitz.optim.distributed import (
    assign_ranks,
    distribute,
    matrix_cost,
    sync_constraint_state,
)
from lipschitz.optim.muon import UPDATE_NORM_MARGIN, Muon
from lipschitz.optim.projection import (
    constrain,
    constraint_violations,
    is_constrained,
    work_counts,
)
from lipschitz.optim.routing import residual_target_factors, route_parameters

__all__ = [
    "SOFT_CAP_MAX_K",
    "UPDATE_NORM_MARGIN",
    "Muon",
    "assign_ranks",
    "build_optimizers",
    "constrain",
    "constraint_violations",
    "distribute",
    "is_constrained",
    "matrix_cost",
    "residual_target_factors",
    "route_parameters",
    "row_rms_cap",
    "start_inside_constraints",
    "sync_constraint_state",
    "work_counts",
]
