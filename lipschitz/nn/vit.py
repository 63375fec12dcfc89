"""A Lipschitz vision transformer certified in ℓ2 over the whole image (for certified
robustness: a margin m and an ℓ2→ℓ2 bound L certify every input within m/(√2·L)).

    image (B, H·W·C) in [0, 1] → −½ → (``stem_layers``: the image folded 2×2 into channels,
    optionally lifted to more, then convolutional SLL layers, lipschitz.nn.conv_sll; the patches
    are then (p/2)×(p/2) cells of that grid) → disjoint p×p patches (B, T, p·p·C) → Linear → d
    (+ a learned position embedding with ``bias=True``)
    → n_layer blocks: x ← β·x + γ·mix(x), then x ← β·x + γ·MLP(x)  (``block="convex"``, MaxMin)
                                       or x ← x − 2·Wᵀ·T⁻¹·ReLU(Wx + b)  (``block="sll"``)
                 or x ← the same SLL layer along the tokens, then along the channels
                    (``block="sll_mixer"``: no PatchMixing, no ×α)
                 or x ← a 3×3 SLL convolution over the patch grid, then the channel SLL layer
                    (``block="sll_conv"``, lipschitz.nn.conv_sll.GridConvSLL)
    → all T tokens side by side (``pool="flatten"``) or their mean (``pool="mean"``) → Linear

The certificate is taken in the RMS over *all* entries of the token matrix, i.e. the
Frobenius norm up to a constant (the walk's ``tokens="all"``), not in the largest token RMS of
the language models, because the threat model is ℓ2 over the image:

- the stem maps the image to a coarser grid, certified in ℓ2 over each (lipschitz.nn.conv_sll);
- disjoint patches split the image into orthogonal pieces, so patchify is an isometry in ℓ2;
- a per-token map (Linear, MLP, the SLL layer) applied to every token has the same constant in
  ℓ2 over all tokens as on one token (‖f(X) − f(Y)‖_F² = Σ_t ‖f(x_t) − f(y_t)‖²), so Linear,
  MLP, Block and lipschitz.nn.sll's channel layer keep their rules; its token layer (TokenSLL)
  is the SLL layer on each channel's column, so its rule holds in ℓ2 over all tokens;
- :class:`PatchMixing` mixes tokens with an input-independent matrix A_h per head; its
  Frobenius constant is max_h σ_max(A_h)·‖W_V‖·‖W_O‖, with σ_max(A_h) computed exactly;
- flattening the tokens side by side keeps ℓ2; their mean has ℓ2 norm 1/√T (a perturbation
  spread equally over all tokens attains it); the constant shift −½ costs nothing.

``certify`` turns this into ``lipschitz_l2`` (image ℓ2 → logits ℓ2) and the tighter pairwise
bounds ‖w_i − w_j‖·L_features of each logit difference (docs/certificates.md, "Image
transformer").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipschitz.linalg import rms_scale
from lipschitz.nn.conv_sll import GridConvSLL, SLLStem, fold
from lipschitz.nn.layers import Block, Linear, token_stats
from lipschitz.nn.sll import SLLBlock, SLLMixerBlock, TokenSLLHeads

__all__ = ["BLOCKS", "POOLS", "LipschitzViT", "PatchMixing", "image_shape_of"]

POOLS = ("flatten", "mean")  # what the head reads: every token side by side, or their mean
# the blocks: Block (convex residuals around the mixing and a MaxMin/GELU MLP), or SLLBlock
# (convex residual around the mixing, then an SLL layer: a full-strength 1-Lipschitz MLP), or
# SLLMixerBlock (an SLL layer along the tokens, then one along the channels: no ×α anywhere),
# or SLLMixerBlock with a 3×3 SLL convolution over the patch grid as its token mixer
BLOCKS = ("convex", "sll", "sll_mixer", "sll_conv")


def image_shape_of(n_inputs: int) -> tuple[int, int, int]:
    """(H, W, C) of a square image with 3 channels (else 1) flattened to ``n_inputs`` values."""
    for channels in (3, 1):
        side = math.isqrt(n_inputs // channels)
        if n_inputs % channels == 0 and side * side * channels == n_inputs:
            return side, side, channels
    raise ValueError(f"{n_inputs} input values are not a square image with 1 or 3 channels")


def _grid_offsets(grid_h: int, grid_w: int) -> list[tuple[int, int]]:
    """Every offset (dy, dx) between two tokens of the grid: (2·grid_h−1)(2·grid_w−1) of them."""
    return [(dy, dx) for dy in range(1 - grid_h, grid_h) for dx in range(1 - grid_w, grid_w)]


def _shift_matrices(grid_h: int, grid_w: int) -> Tensor:
    """S[k] (K, T, T) for every offset k = (dy, dx) of :func:`_grid_offsets`: S[k][t, u] = 1 if
    token u sits at offset (dy, dx) from token t, else 0. Each row and column holds at most one
    1, so ‖S[k]‖ ≤ 1."""
    T = grid_h * grid_w
    ys, xs = torch.arange(T) // grid_w, torch.arange(T) % grid_w  # (T,) each
    offsets = _grid_offsets(grid_h, grid_w)
    S = torch.zeros(len(offsets), T, T)
    for k, (dy, dx) in enumerate(offsets):
        same = (ys[None, :] == ys[:, None] + dy) & (xs[None, :] == xs[:, None] + dx)  # (T, T)
        S[k][same] = 1.0
    return S


class PatchMixing(nn.Module):
    """Token mixing over a grid of patches by learned relative position, the same for every
    image: head h reads A_h = Σ_k p_h[k]·S_k, a softmax p_h over all offsets of the grid, so
    token t gets the average of the tokens around it with weights that depend only on where
    they are (a depthwise convolution over the grid with a softmax kernel as wide as the grid;
    zero padding at the border).

        mix(X) = W_O · [A_1 X W_V,1ᵀ | … | A_H X W_V,Hᵀ]        X: (T, d)

    Each A_h is a convex combination of partial permutations, so σ_max(A_h) ≤ 1; the
    certificate uses the exact value. ℓ2 over all tokens: ‖mix(X) − mix(Y)‖_F ≤
    ‖W_O‖·max_h σ_max(A_h)·‖W_V‖·‖X − Y‖_F (the heads' outputs are orthogonal blocks).
    The kernel logits start at −‖offset‖²·(h + 1)/H: head 0 reads a wide neighbourhood, the
    last one mostly the token itself.
    """

    out_mult = 1.0  # no multiplier before W_O (Block's target-norm split reads it)
    certifies_all_tokens = True  # its rule is for the walk over all tokens (Frobenius)

    def __init__(self, d_model: int, n_head: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if n_head < 1 or d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_head={n_head}")
        self.n_head, self.grid = n_head, tuple(grid)
        S = _shift_matrices(*self.grid)  # (K, T, T)
        self.register_buffer("shifts", S, persistent=False)
        dist2 = torch.tensor([float(dy * dy + dx * dx) for dy, dx in _grid_offsets(*self.grid)])
        scale = torch.arange(1, n_head + 1, dtype=torch.float32)[:, None] / n_head  # (H, 1)
        # one flat vector (an AdamW-trained parameter like any bias), viewed as (H, K)
        self.kernel_logits = nn.Parameter((-dist2[None, :] * scale).flatten())
        self.v = Linear(d_model, d_model)
        self.o = Linear(d_model, d_model, zero_init=True)

    def scaled_linears(self) -> list[Linear]:
        """The layers behind ×out_mult (the value path), for Block's target-norm split."""
        return [self.v]

    def mixing(self) -> Tensor:
        """A (H, T, T): A_h = Σ_k softmax(logits_h)[k]·S_k."""
        p = torch.softmax(self.kernel_logits.view(self.n_head, -1), dim=-1)  # (H, K)
        return torch.einsum("hk,ktu->htu", p, self.shifts.to(p.dtype))

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """‖W_O‖·max_h σ_max(A_h)·‖W_V‖ over all tokens (module docs); refused by the walk over
        the largest token (the language models'), where it is not derived."""
        if walk.tokens != "all":
            raise TypeError(f"{name}: PatchMixing is certified in ℓ2 over all tokens only")
        n_v = walk.norm(f"{name}.v.weight", self.v.weight)
        n_o = walk.norm(f"{name}.o.weight", self.o.weight)
        with torch.no_grad():
            sigma = torch.linalg.matrix_norm(self.mixing().double(), ord=2)  # (H,)
        s = float(sigma.max())
        walk.step(f"{name}.mixing", s, a, s * a)
        return n_o * s * n_v, n_o * s * n_v * a

    def forward(self, x: Tensor, stats: dict | None = None) -> Tensor:
        B, T, C = x.shape  # (batch, tokens, d_model)
        H = self.n_head
        v = self.v(x).view(B, T, H, C // H).permute(2, 1, 0, 3).reshape(H, T, -1)  # (H, T, B·dh)
        y = self.mixing().to(v.dtype) @ v  # (H, T, B·dh): one T×T product per head
        y = y.view(H, T, B, C // H).permute(2, 1, 0, 3).reshape(B, T, C)
        return self.o(y)


class LipschitzViT(nn.Module):
    """Image → patches → Linear → Blocks → pool → Linear (module docs). ``alpha`` None:
    1/(2·n_layer), as the GPT. ``block``: Block (convex residuals around the mixing and the
    MaxMin/GELU MLP) or SLLBlock (the mixing under a convex residual, then an SLL layer;
    docs/results.md measured +3.6 points verified) or SLLMixerBlock (SLL layers along the
    tokens, one per head, and along the channels: no PatchMixing, no ×α; +2.6 points more at
    600 steps; ``alpha`` unused) or, with ``block="sll_conv"``, the same block whose token
    mixing is a 3×3 SLL convolution over the patch grid (GridConvSLL; equal at 600 steps).
    ``bias``: a position embedding and the convex blocks' MLP biases (constants: free in the
    certificate; SLL layers always have their biases).
    ``pool="flatten"``: the head reads all T tokens (T·d features; measured 33% against 18–21%
    verified accuracy for the mean after 400 steps, docs/results.md), ``"mean"``: their mean.
    ``stem_layers``: convolutional SLL layers (3×3, ``stem_hidden`` channels) on the image
    folded 2×2 into channels and lifted to ``stem_channels`` (None: no lift), before the
    patches (lipschitz.nn.conv_sll; each layer 1-Lipschitz, the lift σ_max).
    ``flip_average``: in eval mode the logits are the mean of those of the image and of its
    mirror image, ½·(g(x) + g(Fx)). F permutes pixels, so ‖Fx − Fy‖ = ‖x − y‖ and the mean
    has every bound g has (its Lipschitz constant and each logit difference's): the
    certificate is unchanged. Training sees g alone (random flips are the augmentation; the
    eval mode takes their expectation, as it does for dropout)."""

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        n_classes: int,
        patch: int = 4,
        d_model: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        alpha: float | None = None,
        mlp_ratio: int = 2,
        activation: str = "maxmin",
        pool: str = "flatten",
        bias: bool = False,
        block: str = "convex",
        stem_layers: int = 0,
        stem_hidden: int = 48,
        stem_channels: int | None = None,
        flip_average: bool = False,
    ) -> None:
        super().__init__()
        H, W, C = image_shape
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        if patch < 1 or H % patch or W % patch:
            raise ValueError(f"patch={patch} must divide the image's {H}×{W} pixels")
        self.image_shape, self.patch = (H, W, C), patch
        self.flip_average = flip_average
        self.stem = None
        if stem_layers < 0:
            raise ValueError(f"stem_layers={stem_layers} must be ≥ 0")
        if stem_layers:
            if patch % 2:
                raise ValueError(f"patch={patch} must be even with a stem (it folds 2×2)")
            self.stem = SLLStem((H, W, C), stem_layers, stem_hidden, stem_channels)
        # what the patches are cut from: the image, or the stem's coarser grid (H/2, W/2, C')
        self.grid_shape = (H, W, C) if self.stem is None else self.stem.out_shape
        self.grid_patch = patch if self.stem is None else patch // 2
        grid = (H // patch, W // patch)
        self.n_tokens = grid[0] * grid[1]
        alpha = 1.0 / (2 * n_layer) if alpha is None else alpha
        self.embed = Linear(self.grid_patch**2 * self.grid_shape[2], d_model)  # (d, p·p·C)
        # bias: a learned position embedding (T·d, viewed as (T, d); a vector for the optimizer)
        # and biases in the MLPs; constants, so the certificate is unchanged
        self.pos = nn.Parameter(torch.zeros(self.n_tokens * d_model)) if bias else None
        hidden = mlp_ratio * d_model
        if block == "sll_mixer":
            token_hidden = mlp_ratio * self.n_tokens
            blocks = [SLLMixerBlock(TokenSLLHeads(d_model, self.n_tokens, token_hidden, n_head),
                                    d_model, hidden) for _ in range(n_layer)]  # fmt: skip
        elif block == "sll_conv":
            blocks = [SLLMixerBlock(GridConvSLL(d_model, grid, hidden), d_model, hidden)
                      for _ in range(n_layer)]  # fmt: skip
        elif block == "sll":
            blocks = [SLLBlock(d_model, PatchMixing(d_model, n_head, grid), alpha, hidden)
                      for _ in range(n_layer)]  # fmt: skip
        else:
            blocks = [
                Block(d_model, n_head, self.n_tokens, alpha, activation=activation,
                      mixer=PatchMixing(d_model, n_head, grid), mlp_ratio=mlp_ratio, mlp_bias=bias)
                for _ in range(n_layer)
            ]  # fmt: skip
        self.blocks = nn.ModuleList(blocks)
        self.pool = pool
        d_features = d_model * self.n_tokens if pool == "flatten" else d_model
        self.head = Linear(d_features, n_classes, zero_init=True)

    def patches(self, x: Tensor) -> Tensor:
        """(B, H·W·C) values of the grid (the image, or the stem's output) in H, W, C order →
        (B, T, p·p·C) disjoint patches, row by row."""
        cells = fold(x, self.grid_shape, self.grid_patch)  # (B, H/p, W/p, p·p·C)
        return cells.flatten(1, 2)  # (B, T, p·p·C)

    def mirror(self, x: Tensor) -> Tensor:
        """(B, H·W·C) images → the same images flipped left to right (a permutation of pixels)."""
        H, W, C = self.image_shape
        return x.reshape(-1, H, W, C).flip(2).reshape(x.shape)

    def forward(self, x: Tensor, *, return_stats: bool = False) -> Tensor | tuple[Tensor, dict]:
        """(B, H·W·C) pixels → (B, n_classes) logits (and activation stats: ``embed``,
        ``blocks.{i}.attn`` / ``.mlp``, ``logits``; with ``flip_average`` in eval mode, the
        logits are averaged over the mirror images and the stats are over both)."""
        if self.flip_average and not self.training:
            both = self.logits(torch.cat([x, self.mirror(x)]), return_stats)  # (2B, n_classes)
            logits, stats = both if return_stats else (both, None)
            logits = 0.5 * (logits[: len(x)] + logits[len(x) :])  # (B, n_classes)
            return logits if stats is None else (logits, stats)
        return self.logits(x, return_stats)

    def logits(self, x: Tensor, return_stats: bool = False) -> Tensor | tuple[Tensor, dict]:
        """g: (B, H·W·C) pixels → (B, n_classes) logits, without the flip average."""
        stats = {} if return_stats else None
        x = x - 0.5
        if self.stem is not None:
            x = self.stem(x)  # (B, H·W·C) → (B, H/2·W/2·C')
        h = self.embed(self.patches(x))  # (B, T, d)
        if self.pos is not None:
            h = h + self.pos.view(self.n_tokens, -1)
        if stats is not None:
            stats["embed"] = token_stats(h)
        for i, block in enumerate(self.blocks):
            h = block(h, stats, f"blocks.{i}.")
        features = h.flatten(1) if self.pool == "flatten" else h.mean(dim=1)  # (B, T·d) or (B, d)
        logits = self.head(features)  # (B, n_classes)
        if stats is not None:
            stats["logits"] = token_stats(logits)
        return logits if stats is None else (logits, stats)

    def certificate(self, walk) -> tuple[float, float]:
        """(ℓ2→ℓ2 bound of the image → features map, of the image → logits map) from the weights
        as they are; the walk runs over all tokens, in RMS units (a d_in→d_out Linear of RMS
        norm n has ℓ2 norm n·√(d_out/d_in))."""
        L = 1.0
        if self.stem is not None:  # image → coarser image, ℓ2 over each
            L, _ = walk.certify(self.stem, 1.0, "stem")
            walk.step("stem", L, None, None)
        n_embed = walk.norm("embed.weight", self.embed.weight)
        # ℓ2 over the image = ℓ2 over the patches (disjoint) → ℓ2 over all tokens of the embeds
        L_embed = n_embed * rms_scale(self.embed.weight)
        walk.step("embed", L_embed, None, None)
        L *= L_embed
        a = 1.0  # activation bounds are not needed for these rules (all are global)
        for i, block in enumerate(self.blocks):
            L_block, a = walk.certify(block, a, f"blocks.{i}")
            L *= L_block
        pool = 1.0 if self.pool == "flatten" else 1 / math.sqrt(self.n_tokens)  # mean: 1/√T
        walk.step(self.pool, pool, None, None)
        L_features = L * pool
        n_head = walk.norm("head.weight", self.head.weight)
        sigma_head = n_head * rms_scale(self.head.weight)
        walk.step("head", sigma_head, None, None)
        return L_features, L_features * sigma_head
