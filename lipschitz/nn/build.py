"""The model a training run's config names: :data:`MODELS` and :func:`build_model`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from lipschitz.nn.models import BaselineGPT, BaselineMLP, LipschitzGPT, LipschitzMLP

if TYPE_CHECKING:
    from lipschitz.config import Config

__all__ = ["MODELS", "build_model"]

MODELS = {
    "lipschitz_gpt": LipschitzGPT,
    "baseline_gpt": BaselineGPT,
    "lipschitz_mlp": LipschitzMLP,
    "baseline_mlp": BaselineMLP,
}


def build_model(cfg: Config, n_outputs: int, n_inputs: int | None = None) -> nn.Module:
    """The config's model: a GPT over ``n_outputs`` tokens, or an MLP n_inputs → n_outputs.

    Architectural constants the config leaves unset (``residual_alpha`` None: α = 1/(2·n_layer))
    are the models' own defaults.
    """
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {cfg.model!r}")
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
    return MODELS[cfg.model](**kwargs)
