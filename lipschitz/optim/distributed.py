"""The matrix work of a step split across the ranks of a process group (``torchrun``).

Each split weight has one owner rank (:func:`assign_ranks`, balancing :func:`matrix_cost`) that
alone orthogonalizes its update and projects it; after the step one all-gather gives every rank
the new weights. :func:`distribute` sets this up on a constrained optimizer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from lipschitz.constraints import METHODS
from lipschitz.optim.projection import post_step_of

__all__ = ["assign_ranks", "distribute", "matrix_cost", "sync_constraint_state"]


class RankShard:
    """Which rank computes which weight, and the all-gather that shares the results."""

    def __init__(self, rank: int, world_size: int, params: list[Tensor], group=None) -> None:
        self.rank, self.world_size = rank, world_size
        self.params = params  # the split weights, in the same order on every rank
        owners = assign_ranks([tuple(p.shape) for p in params], world_size)
        self.owner = {id(p): r for p, r in zip(params, owners, strict=True)}  # id -> rank
        self.group = group  # the process group (None: the default group)

    def owns(self, p: Tensor) -> bool:
        """Whether this rank computes p (weights that are not split: every rank does)."""
        return self.owner.get(id(p), self.rank) == self.rank

    @torch.no_grad()
    def gather(self) -> None:
        """Give every rank the split weights stepped this step by the other ranks."""
        import torch.distributed as dist

        stepped = [p for p in self.params if p.grad is not None]  # the same on every rank
        for dtype in dict.fromkeys(p.dtype for p in stepped):
            by_rank = [[] for _ in range(self.world_size)]
            for p in stepped:
                if p.dtype == dtype:
                    by_rank[self.owner[id(p)]].append(p)
            size = max(sum(p.numel() for p in ps) for ps in by_rank)
            device = stepped[0].device
            mine = torch.zeros(size, dtype=dtype, device=device)
            if by_rank[self.rank]:
                flat = torch.cat([p.reshape(-1) for p in by_rank[self.rank]])
                mine[: flat.numel()] = flat
            out = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(out, mine, group=self.group)
            for r, ps in enumerate(by_rank):
                if r == self.rank:
                    continue
                offset = 0
                for p in ps:
                    p.copy_(out[r][offset : offset + p.numel()].view_as(p))
                    offset += p.numel()


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


def _has_matrix_work(optimizer: Optimizer, group: dict) -> bool:
    """Whether a group's weights carry work to split: the optimizer says so if it can (Muon:
    its "matrix"-rule groups, which it orthogonalizes), else a matrix constraint does."""
    own = getattr(optimizer, "has_matrix_work", None)
    if own is not None:
        return own(group)
    c = METHODS[group.get("constraint", "none")]
    return c.name != "none" and not c.per_row


def distribute(optimizer: Optimizer, process_group=None) -> Optimizer:
    """Split an optimizer's matrix work across the ranks of ``process_group``; returns it.

    Every rank must hold identical weights and (averaged) gradients before ``step()``. The
    expensive work is then done once, not once per rank: each split weight belongs to one rank
    (:func:`assign_ranks`), which alone orthogonalizes its update (Muon, "matrix" rule) and
    projects it (matrix constraints); after the step every rank receives the other ranks' new
    weights by one all-gather (the last of the optimizer's post-step stages, after the
    projection), so all ranks end the step with identical weights. Cheap elementwise work
    (momentum buffers, the embedding rule and its row cap, an AdamW step) is done by every rank,
    so optimizer states stay identical except the power-iteration warm starts of a rank's own
    weights (see :func:`sync_constraint_state`).

    :func:`~lipschitz.optim.work_counts` counts the matrices this rank orthogonalized and
    projected. The optimizer must already be constrained (Muon always is; call
    :func:`~lipschitz.optim.constrain` on others first).
    """
    import torch.distributed as dist

    stages = post_step_of(optimizer)
    if stages is None:
        raise ValueError("distribute: call constrain(optimizer) first (Muon is constrained)")
    if stages.shard is not None:
        raise ValueError("distribute: this optimizer is already distributed")
    rank, world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
    params = []
    for group in optimizer.param_groups:
        if _has_matrix_work(optimizer, group):
            params += group["params"]
    stages.shard = RankShard(rank, world_size, params, process_group)
    return optimizer


def sync_constraint_state(optimizer: Optimizer) -> None:
    """Give every rank the power-iteration warm starts that each weight's owner keeps.

    Under :func:`distribute` only a weight's owner updates ``state[p]["constraint"]``; call this
    on every rank before saving the optimizer's state, so a checkpoint from any rank resumes
    exactly. A no-op for an optimizer that is not distributed.
    """
    import torch.distributed as dist

    stages = post_step_of(optimizer)
    shard = None if stages is None else stages.shard
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
