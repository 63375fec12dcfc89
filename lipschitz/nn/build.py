"""The models a run's config can name, each with what it means: :data:`MODELS`, :data:`MIXERS`
and :func:`build_model`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from lipschitz.nn.lookup import LookupAttention
from lipschitz.nn.models import BaselineGPT, BaselineMLP, LipschitzGPT, LipschitzMLP
from lipschitz.nn.vit import LipschitzViT, image_shape_of

if TYPE_CHECKING:
    from lipschitz.config import Config

__all__ = ["MIXERS", "MODELS", "MixerKind", "ModelKind", "build_model"]


@dataclass(frozen=True)
class ModelKind:
    """What a ``model`` name means: how to build it from a config and the sizes of its task,
    what it reads (``inputs``: "tokens" for a language model, "images" for a classifier; the
    task must give the same), whether it is a norm-bounded, certified model (its embedding rows
    are capped too), and the config keys that only some models read (any other model refuses
    them away from their defaults)."""

    build: Callable[[Config, int, int | None], nn.Module]
    inputs: str
    lipschitz: bool
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class MixerKind:
    """A token mixer of the Lipschitz GPT: a function of the config making one block's mixer
    (None: the paper's attention, built by the model from attn_scale, attn_out_mult and
    pos_bias), and the config keys only this mixer reads."""

    make: Callable[[Config], Callable[[], nn.Module]] | None
    keys: tuple[str, ...] = ()


def _lookup(cfg: Config) -> Callable[[], nn.Module]:
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


MIXERS = {
    "attention": MixerKind(None),
    "lookup": MixerKind(_lookup, ("content_heads", "content_scale", "qk_tied", "key_shift",
                                  "lag_window", "lag_gate", "attn_sink")),
}  # fmt: skip


def _gpt_sizes(cfg: Config, vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer,
                n_head=cfg.n_head, seq_len=cfg.seq_len, attn_scale=cfg.attn_scale)  # fmt: skip


def _lipschitz_gpt(cfg: Config, n_outputs: int, n_inputs: int | None) -> nn.Module:
    make_mixer = MIXERS[cfg.mixer].make
    return LipschitzGPT(
        **_gpt_sizes(cfg, n_outputs), final_scale=cfg.final_scale, residual=cfg.residual,
        attn_out_mult=cfg.attn_out_mult, pos_bias=cfg.pos_bias, alpha=cfg.residual_alpha,
        activation=cfg.activation, mlp_ratio=cfg.mlp_ratio,
        mixer=make_mixer(cfg) if make_mixer else None,
    )  # fmt: skip


def _baseline_gpt(cfg: Config, n_outputs: int, n_inputs: int | None) -> nn.Module:
    return BaselineGPT(**_gpt_sizes(cfg, n_outputs))


def _mlp(cls: type[nn.Module]) -> Callable[[Config, int, int | None], nn.Module]:
    def build(cfg: Config, n_outputs: int, n_inputs: int | None) -> nn.Module:
        return cls(in_features=n_inputs, hidden=cfg.d_model, out_features=n_outputs,
                   n_layers=cfg.n_layer)  # fmt: skip

    return build


def _lipschitz_vit(cfg: Config, n_outputs: int, n_inputs: int | None) -> nn.Module:
    return LipschitzViT(
        image_shape=image_shape_of(n_inputs), n_classes=n_outputs, patch=cfg.patch_size,
        d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, alpha=cfg.residual_alpha,
        mlp_ratio=cfg.mlp_ratio, activation=cfg.activation, pool=cfg.pool, bias=cfg.bias,
        block=cfg.block, stem_layers=cfg.stem_layers, stem_hidden=cfg.stem_hidden,
        stem_channels=cfg.stem_channels, flip_average=cfg.flip_average,
    )  # fmt: skip


MODELS = {
    "lipschitz_gpt": ModelKind(_lipschitz_gpt, "tokens", True, ("mlp_ratio", "mixer")),
    "baseline_gpt": ModelKind(_baseline_gpt, "tokens", False),
    "lipschitz_mlp": ModelKind(_mlp(LipschitzMLP), "images", True),
    "baseline_mlp": ModelKind(_mlp(BaselineMLP), "images", False),
    "lipschitz_vit": ModelKind(_lipschitz_vit, "images", True,
                               ("mlp_ratio", "patch_size", "pool", "bias", "block", "stem_layers",
                                "stem_hidden", "stem_channels", "flip_average")),
}  # fmt: skip


def build_model(cfg: Config, n_outputs: int, n_inputs: int | None = None) -> nn.Module:
    """The config's model: a GPT over ``n_outputs`` tokens, or an image classifier of
    ``n_inputs`` pixel values into ``n_outputs`` classes.

    Architectural constants the config leaves unset (``residual_alpha`` None: α = 1/(2·n_layer))
    are the models' own defaults.
    """
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {cfg.model!r}")
    return MODELS[cfg.model].build(cfg, n_outputs, n_inputs)
