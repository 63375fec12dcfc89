"""The model a training run's config names: :data:`MODELS` and :func:`build_model`."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from torch import nn

from lipschitz.nn.lookup import LookupAttention
from lipschitz.nn.models import BaselineGPT, BaselineMLP, LipschitzGPT, LipschitzMLP
from lipschitz.nn.vit import LipschitzViT, image_shape_of

if TYPE_CHECKING:
    from lipschitz.config import Config

__all__ = ["MIXERS", "MODELS", "build_model"]

MODELS = {
    "lipschitz_gpt": LipschitzGPT,
    "baseline_gpt": BaselineGPT,
    "lipschitz_mlp": LipschitzMLP,
    "baseline_mlp": BaselineMLP,
    "lipschitz_vit": LipschitzViT,
}


def _lookup(cfg: Config):
    """Each block's LookupAttention, from the lookup keys of the config."""
    return functools.partial(
        LookupAttention,
        cfg.d_model,
        cfg.n_head,
        cfg.seq_len,
        content_heads=cfg.content_heads,
        content_scale=cfg.content_scale,
        qk_tied=cfg.qk_tied,
        key_shift=cfg.key_shift,
        lag_window=cfg.lag_window,
        lag_gate=cfg.lag_gate,
        sink=cfg.attn_sink,
        budget_w_max=cfg.w_max if cfg.mixer_budget else None,
        budget_input=cfg.embed_w_max,
        out_mult=cfg.attn_out_mult,
    )


# token mixers of the Lipschitz GPT: name → (config → a function making one block's mixer), or
# None for the attention that the model builds from attn_scale, attn_out_mult and pos_bias
MIXERS = {"attention": None, "lookup": _lookup}


def build_model(cfg: Config, n_outputs: int, n_inputs: int | None = None) -> nn.Module:
    """The config's model: a GPT over ``n_outputs`` tokens, or an MLP n_inputs → n_outputs.

    Architectural constants the config leaves unset (``residual_alpha`` None: α = 1/(2·n_layer))
    are the models' own defaults.
    """
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {cfg.model!r}")
    if cfg.model == "lipschitz_vit":
        return LipschitzViT(
            image_shape=image_shape_of(n_inputs), n_classes=n_outputs, patch=cfg.patch_size,
            d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, alpha=cfg.residual_alpha,
            mlp_ratio=cfg.mlp_ratio, activation=cfg.activation, pool=cfg.pool,
        )  # fmt: skip
    if cfg.model.endswith("_mlp"):
        return MODELS[cfg.model](
            in_features=n_inputs, hidden=cfg.d_model, out_features=n_outputs, n_layers=cfg.n_layer
        )
    kwargs = dict(
        vocab_size=n_outputs,
        d_model=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        seq_len=cfg.seq_len,
        attn_scale=cfg.attn_scale,
    )
    if cfg.model == "lipschitz_gpt":
        kwargs["final_scale"] = cfg.final_scale
        kwargs["residual"] = cfg.residual
        kwargs["attn_out_mult"] = cfg.attn_out_mult
        kwargs["pos_bias"] = cfg.pos_bias
        kwargs["alpha"] = cfg.residual_alpha
        kwargs["activation"] = cfg.activation
        kwargs["mlp_ratio"] = cfg.mlp_ratio
        make_mixer = MIXERS[cfg.mixer]
        kwargs["mixer"] = make_mixer(cfg) if make_mixer else None
    return MODELS[cfg.model](**kwargs)
