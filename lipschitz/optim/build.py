"""The optimizers of a training run: Muon for the matrices (AdamW for the rest) or AdamW for
everything, with the run's constraints attached, and the weights started inside their balls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lipschitz.constraints import METHODS, row_rms_cap, svd_cap
from lipschitz.nn.build import MODELS
from lipschitz.optim.muon import Muon
from lipschitz.optim.projection import constrain
from lipschitz.optim.routing import route_parameters

if TYPE_CHECKING:
    from lipschitz.config import Config

__all__ = [
    "NS_DTYPES",
    "OPTIMIZERS",
    "TARGET_NORM_SCALARS",
    "build_optimizers",
    "start_inside_constraints",
]

OPTIMIZERS = ("muon", "adamw")  # optimizer; embed_optimizer too (the embedding under Muon or not)
NS_DTYPES = ("float32", "bfloat16")  # ns_dtype: Muon's Newton–Schulz compute dtype
TARGET_NORM_SCALARS = ("model", "unit")  # routing's unit_scalars off or on


def build_optimizers(cfg: Config, model: nn.Module) -> list[torch.optim.Optimizer]:
    """Muon (matrices) plus AdamW (vectors, if any), or AdamW for everything, with the run's
    constraint attached to every hidden matrix and the head, and a row-RMS cap on embeddings.

    ``weight_decay`` decays the hidden matrices and the head, whichever optimizer trains them;
    never the embedding (its rows are capped instead) or the vectors. Target norms
    (``blocks_mass``, ``target_norm_scalars``) scale Muon's steps only."""
    lipschitz_model = MODELS[cfg.model].lipschitz
    # Target norms scale Muon's steps only; without them AdamW gets one group per role (and
    # its checkpoints keep that layout)
    blocks_mass = cfg.blocks_mass if cfg.optimizer == "muon" else None
    unit = cfg.target_norm_scalars == "unit"
    groups = route_parameters(model, blocks_mass=blocks_mass, unit_scalars=unit)
    head_w_max = cfg.w_max if cfg.head_w_max is None else cfg.head_w_max
    for group in groups:
        role = group["role"]
        if role in ("hidden", "head") and cfg.constraint != "none":
            group["constraint"] = cfg.constraint
            group["w_max"] = head_w_max if role == "head" else cfg.w_max
            if cfg.constraint == "spectral_weight_decay":
                group["constraint_kwargs"] = {"spectral_decay": cfg.spectral_decay}
        elif role == "embedding" and lipschitz_model:
            group["constraint"] = "row_rms_cap"
            group["w_max"] = cfg.embed_w_max
        # weight_decay: hidden matrices and head only, whichever optimizer trains them (set on
        # every group, so the optimizers' own defaults never apply)
        group["weight_decay"] = cfg.weight_decay if role in ("hidden", "head") else 0.0
        if role == "head" and cfg.head_lr is not None:
            group["lr"] = cfg.head_lr
        if role == "embedding" and cfg.embed_lr is not None:
            group["lr"] = cfg.embed_lr
    if cfg.optimizer == "muon":
        to_adamw = ("vector", "embedding") if cfg.embed_optimizer == "adamw" else ("vector",)
        matrices = [g for g in groups if g["role"] not in to_adamw]
        others = [{k: v for k, v in g.items() if k != "rule"} for g in groups
                  if g["role"] in to_adamw]  # fmt: skip
        muon = Muon(
            matrices,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            momentum_warmup_steps=cfg.momentum_warmup_steps,
            momentum_start=cfg.momentum_start,
            coefficients=cfg.coefficients,
            ns_dtype=getattr(torch, cfg.ns_dtype),
        )
        if not others:
            return [muon]
        for group in others:
            group.pop("target_norm")
            if group["role"] == "vector":  # e.g. LayerNorm gains, at an Adam-sized step
                group["lr"] = cfg.lr * 0.01 if cfg.vector_lr is None else cfg.vector_lr
        adamw = torch.optim.AdamW(others, lr=cfg.lr, betas=cfg.adam_betas)
        return [muon, constrain(adamw)]
    if cfg.optimizer == "adamw":
        for group in groups:
            group.pop("rule", None)
            group.pop("target_norm")  # 1: no target norms without blocks_mass
        adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas)
        return [constrain(adamw)]
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")


@torch.no_grad()
def start_inside_constraints(optimizers: list[torch.optim.Optimizer]) -> None:
    """Move every constrained initial weight into its ball, exactly: by SVD (svd_cap) for a
    matrix constraint, by row scaling (row_rms_cap) for a per-row one.

    Needed because the soft cap only absorbs each step: a weight that starts outside its ball
    (e.g. the norm-1 orthogonal init with w_max < 1) would never be pulled back in. Constraints
    that bound nothing (``needs_w_max`` False) are left alone.
    """
    for opt in optimizers:
        for group in opt.param_groups:
            c = METHODS[group.get("constraint", "none")]
            if not c.needs_w_max:
                continue
            cap = row_rms_cap if c.per_row else svd_cap  # the exact projection onto the ball
            for p in group["params"]:
                p.copy_(cap(p, w_max=group["w_max"]))
