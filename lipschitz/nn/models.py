"""Models: the Lipschitz GPT and MLP of the paper, and the standard baselines they compete with.

Every model takes token ids or continuous inputs: ``model(idx)`` and ``model(inputs_embeds=x)``
(so sensitivity can be measured), and ``return_stats=True`` also returns, per layer, the largest
|activation|, the largest per-token RMS and (attention) the largest logit, as detached tensors;
:func:`activation_stats` turns them into floats with one device sync.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz.nn.layers import Block, CausalSelfAttention, Embedding, Linear, token_stats

__all__ = [
    "BaselineBlock",
    "BaselineGPT",
    "BaselineMLP",
    "LipschitzGPT",
    "LipschitzMLP",
    "activation_stats",
]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _embed_input(embed: nn.Embedding, idx: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
    """Token ids (B, T) → (B, T, d), or pass continuous inputs (B, T, d) through unchanged."""
    if (idx is None) == (inputs_embeds is None):
        raise TypeError("pass exactly one of idx (B, T) token ids or inputs_embeds=(B, T, d)")
    if idx is not None:
        if idx.ndim != 2 or idx.dtype != torch.long:
            raise TypeError(f"idx must be a (B, T) long tensor, got {idx.dtype} {tuple(idx.shape)}")
        return embed(idx)
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != embed.embedding_dim:
        raise ValueError(
            f"inputs_embeds must have shape (B, T, {embed.embedding_dim}), "
            f"got {tuple(inputs_embeds.shape)}"
        )
    return inputs_embeds


def _gpt_forward(
    model: nn.Module,
    idx: Tensor | None,
    inputs_embeds: Tensor | None,
    return_stats: bool,
    final_norm: nn.Module,
) -> Tensor | tuple[Tensor, dict]:
    """embed → blocks → final_norm → head × final_scale, shared by both GPTs."""
    x = _embed_input(model.embed, idx, inputs_embeds)  # (B, T, d)
    stats = {"embed": token_stats(x)} if return_stats else None
    for i, block in enumerate(model.blocks):
        x = block(x, stats, prefix=f"blocks.{i}.")
    logits = model.head(final_norm(x)) * model.final_scale  # (B, T, V)
    if stats is None:
        return logits
    stats["logits"] = token_stats(logits)
    return logits, stats


class LipschitzGPT(nn.Module):
    """GPT with no layer norm whose Lipschitz bound is read off its weights (paper §5.2).

    embed (rows RMS 1) → n_layer Blocks (convex residuals, α = 1/(2·n_layer) unless given) → head
    → ×final_scale.
    ``activation`` is the MLPs' 1-Lipschitz activation: ``"gelu"`` (GELU/1.1289, the paper) or
    ``"maxmin"`` (norm-preserving MaxMin; docs/certificates.md); ``mlp_ratio`` its hidden width
    in multiples of d_model.
    ``mixer``: a function returning each block's token mixer (e.g.
    ``functools.partial(LookupAttention, d_model, n_head, seq_len, ...)``) instead of the
    attention that ``attn_scale``, ``attn_out_mult`` and ``pos_bias`` describe.
    With ``tie_head=True`` the head reuses ``embed.weight`` (then ``zero_init_head`` is ignored);
    the certificate then measures that one matrix twice: as the embedding (max row RMS) and as
    the head (RMS→RMS norm).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        n_layer: int,
        n_head: int,
        seq_len: int,
        attn_scale: float = 1.0,
        final_scale: float = 1.0,
        zero_init_out: bool = True,
        zero_init_head: bool = True,
        tie_head: bool = False,
        residual: str = "convex",
        attn_out_mult: float | None = None,
        pos_bias: bool = False,
        alpha: float | None = None,
        activation: str = "gelu",
        mixer: Callable[[], nn.Module] | None = None,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        _check_sizes(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head)
        _check_sizes(seq_len=seq_len)
        if not final_scale >= 0:
            raise ValueError(f"final_scale must be >= 0, got {final_scale!r}")
        self.final_scale = float(final_scale)
        self.tie_head = tie_head
        alpha = 1.0 / (2 * n_layer) if alpha is None else alpha  # the paper: 2·n_layer residuals
        block_args = (
            d_model,
            n_head,
            seq_len,
            alpha,
            attn_scale,
            zero_init_out,
            residual,
            attn_out_mult,
            pos_bias,
            activation,
        )
        self.embed = Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            Block(*block_args, mixer=mixer() if mixer else None, mlp_ratio=mlp_ratio)
            for _ in range(n_layer)
        )
        self.head = Linear(d_model, vocab_size, zero_init=zero_init_head and not tie_head)
        if tie_head:
            self.head.weight = self.embed.weight  # (V, d): one parameter, two roles

    def forward(
        self,
        idx: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, dict]:
        return _gpt_forward(self, idx, inputs_embeds, return_stats, final_norm=nn.Identity())


class BaselineAttention(CausalSelfAttention):
    """Standard causal attention: the same RoPE and code, but logits q·kᵀ/√d_head × attn_scale
    and no ×1/3 (BaselineGPT re-initialises the weights nanoGPT's way)."""

    out_mult = 1.0

    def logit_scale(self) -> float:
        return self.attn_scale / math.sqrt(self.d_head)


class BaselineBlock(nn.Module):
    """nanoGPT block: x + attn(ln₁(x)), then x + mlp(ln₂(x)), with a plain GELU MLP."""

    def __init__(self, d_model: int, n_head: int, seq_len: int, attn_scale: float = 1.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=False)
        self.attn = BaselineAttention(d_model, n_head, seq_len, attn_scale, zero_init_out=False)
        self.ln_2 = nn.LayerNorm(d_model, bias=False)
        self.fc_in = nn.Linear(d_model, 4 * d_model, bias=False)
        self.fc_out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor, stats: dict | None = None, prefix: str = "") -> Tensor:
        attn_stats = {} if stats is not None else None
        x = x + self.attn(self.ln_1(x), attn_stats)  # (B, T, d)
        if stats is not None:
            stats[f"{prefix}attn"] = {**token_stats(x), **attn_stats}
        x = x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x))))
        if stats is not None:
            stats[f"{prefix}mlp"] = token_stats(x)
        return x


class BaselineGPT(nn.Module):
    """nanoGPT-style baseline of the same size: pre-LayerNorm, 1/√d_head attention, x + f(x).

    Same keywords and module names (``embed``, ``blocks``, ``head``) as :class:`LipschitzGPT`.
    Init as nanoGPT: N(0, 0.02), output projections N(0, 0.02/√(2·n_layer)) unless zero-init.
    RoPE (not learned positions) so the comparison isolates the Lipschitz changes.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        n_layer: int,
        n_head: int,
        seq_len: int,
        attn_scale: float = 1.0,
        final_scale: float = 1.0,
        zero_init_out: bool = True,
        zero_init_head: bool = True,
        tie_head: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head)
        _check_sizes(seq_len=seq_len)
        self.final_scale = float(final_scale)
        self.tie_head = tie_head
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            BaselineBlock(d_model, n_head, seq_len, attn_scale) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 2:
                    out_proj = name.endswith(("attn.o.weight", "fc_out.weight"))
                    std = 0.02 / math.sqrt(2 * n_layer) if out_proj else 0.02
                    p.zero_() if out_proj and zero_init_out else p.normal_(0.0, std)
            if tie_head:
                self.head.weight = self.embed.weight
            elif zero_init_head:
                self.head.weight.zero_()

    def forward(
        self,
        idx: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, dict]:
        return _gpt_forward(self, idx, inputs_embeds, return_stats, final_norm=self.ln_f)


def _mlp_forward(
    model: nn.Module, x: Tensor | None, inputs_embeds: Tensor | None, return_stats: bool
) -> Tensor | tuple[Tensor, dict]:
    """Flatten → Linear → ReLU → ... → Linear, shared by both MLPs."""
    if (x is None) == (inputs_embeds is None):
        raise TypeError("pass exactly one of x (B, ...) or inputs_embeds=(B, ...)")
    x = (x if x is not None else inputs_embeds).flatten(1)  # (B, in_features)
    if x.shape[1] != model.layers[0].in_features:
        raise ValueError(f"expected {model.layers[0].in_features} input features, got {x.shape[1]}")
    stats = {} if return_stats else None
    for i, layer in enumerate(model.layers):
        x = layer(x if i == 0 else F.relu(x))  # (B, width)
        if stats is not None:
            stats[f"layers.{i}"] = token_stats(x)
    return x if stats is None else (x, stats)


class LipschitzMLP(nn.Module):
    """The paper's CIFAR MLP: 3072 → 256 → 256 → 10, ReLU, no biases, RMS→RMS-1 init.

    Its RMS→RMS bound is the product of the layers' RMS→RMS norms (ReLU is 1-Lipschitz).
    """

    def __init__(
        self, in_features: int = 3072, hidden: int = 256, out_features: int = 10, n_layers: int = 3
    ) -> None:
        super().__init__()
        _check_sizes(in_features=in_features, hidden=hidden, out_features=out_features)
        _check_sizes(n_layers=n_layers)
        dims = [in_features] + [hidden] * (n_layers - 1) + [out_features]
        self.layers = nn.ModuleList(Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(
        self,
        x: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, dict]:
        return _mlp_forward(self, x, inputs_embeds, return_stats)


class BaselineMLP(nn.Module):
    """Same MLP with PyTorch's default ``nn.Linear`` init (Kaiming-uniform), no biases."""

    def __init__(
        self, in_features: int = 3072, hidden: int = 256, out_features: int = 10, n_layers: int = 3
    ) -> None:
        super().__init__()
        _check_sizes(in_features=in_features, hidden=hidden, out_features=out_features)
        _check_sizes(n_layers=n_layers)
        dims = [in_features] + [hidden] * (n_layers - 1) + [out_features]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(dims)
        )

    def forward(
        self,
        x: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, dict]:
        return _mlp_forward(self, x, inputs_embeds, return_stats)


@torch.no_grad()
def activation_stats(model: nn.Module, *args, **kwargs) -> dict[str, dict[str, float]]:
    """Run ``model(*args, **kwargs, return_stats=True)`` and return its stats as floats.

    Keys are layer names (``embed``, ``blocks.{i}.attn`` / ``.mlp`` = residual stream after that
    update, ``logits``, or ``layers.{i}`` for MLPs); values hold ``max_abs`` (largest |entry|),
    ``max_rms`` (largest per-token RMS) and, for attention, ``max_logit``. One device sync.
    """
    _, stats = model(*args, return_stats=True, **kwargs)
    keys = [(layer, name) for layer, d in stats.items() for name in d]
    values = torch.stack([stats[k][n].double() for k, n in keys]).tolist()
    out: dict[str, dict[str, float]] = {}
    for (layer, name), value in zip(keys, values, strict=True):
        out.setdefault(layer, {})[name] = value
    return out
