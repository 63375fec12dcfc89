"""Lipschitz building blocks and the models built from them (see ``docs/certificates.md``)."""

from lipschitz.nn.build import MODELS, build_model
from lipschitz.nn.layers import (
    GELU_MAX_SLOPE,
    GELU_SCALE,
    MLP,
    Block,
    CausalSelfAttention,
    Embedding,
    Linear,
)
from lipschitz.nn.models import (
    BaselineGPT,
    BaselineMLP,
    LipschitzGPT,
    LipschitzMLP,
    activation_stats,
)

__all__ = [
    "GELU_MAX_SLOPE",
    "GELU_SCALE",
    "MLP",
    "MODELS",
    "BaselineGPT",
    "BaselineMLP",
    "Block",
    "CausalSelfAttention",
    "Embedding",
    "Linear",
    "LipschitzGPT",
    "LipschitzMLP",
    "activation_stats",
    "build_model",
]
