"""A convolutional SLL layer and an image → image stem made of them (Araujo et al., ICLR 2023,
the convolutional form of lipschitz.nn.sll's layer):

    h(x) = x − 2·Kᵀ·T⁻¹·ReLU(K x + b)      K: a k×k convolution C → hidden (stride 1, zero padding)

Kᵀ is the adjoint (conv_transpose2d with the same kernel), T = diag(t) per hidden channel,
t_i = Σ_j Σ_δ |G[i, j, δ]|·q_j/q_i with G the kernel of K Kᵀ (the cross-correlation of the
kernels, offsets δ in (2k−1)²). Why T ⪰ K Kᵀ: on the infinite grid K Kᵀ is the convolution G,
and the weighted Gershgorin bound of lipschitz.nn.sll (vᵀMv ≤ Σ_ab |M_ab|·|v_a||v_b| ≤
Σ_a v_a²·Σ_b |M_ab|·q_b/q_a) with a = (i, p), b = (j, p + δ) and q_(i,p) = q_i gives exactly t_i.
Zero padding makes K = R·K_∞·E (E extends by zeros, R restricts to the image), so K Kᵀ =
R K_∞ E Eᵀ K_∞ᵀ Rᵀ ⪯ R K_∞ K_∞ᵀ Rᵀ ⪯ T. The 1-Lipschitz proof of lipschitz.nn.sll then holds
word for word with W = K.

Certificate, for the weights as they are: κ = ‖T^-½ K‖² ≤ max_i t⁶⁴_i / t_i, where t⁶⁴ is the
same sum in float64 (T⁶⁴ ⪰ K Kᵀ up to float64 rounding, charged as a relative 1e-9) and t the
float32 scaling of the forward pass; the layer certifies max(1, 2κ − 1) + ‖Δ‖·‖K‖, where
Δ = V − 2T⁻¹K is the float32 rounding of the kernel V = fl(2T⁻¹K) the forward multiplies by
(the Jacobian is I − VᵀDK = I − 2KᵀT⁻¹DK − ΔᵀDK, D ≤ I), each operator norm bounded by the
sum over the k² taps of the tap matrices' norms (a zero-padded shift has norm ≤ 1).

:class:`SLLStem` folds the image s×s into channels (space-to-depth, a permutation of the
pixels, so an isometry in ℓ2), optionally lifts every cell to more channels with one Linear
(its σ_max, since it acts on each cell alike), and applies ConvSLL layers on that grid (it
does not unfold: the patches are cut from the coarser grid): a map
from the image to a coarser image whose ℓ2 constant is σ(lift) times the product of its
layers', placed before the patch embedding (which then reads patches of the coarser grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz.linalg import rms_scale
from lipschitz.nn.layers import Linear
from lipschitz.nn.sll import T_FLOOR

__all__ = ["ConvSLL", "GridConvSLL", "SLLStem", "fold"]

ROUNDING = 1e-9  # relative slack for float64 rounding in the certificate's sum of |G|


class ConvSLL(nn.Module):
    """x ↦ x − 2·Kᵀ·T⁻¹·ReLU(K x + b) on (B, C, H, W) images (module docs): 1-Lipschitz in
    ℓ2 over the whole image for any kernel K, with learned q > 0 (log_q, starts at 0)."""

    certifies_all_tokens = True  # its rule is for ℓ2 over the whole image

    def __init__(self, channels: int, hidden: int, kernel: int = 3) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel={kernel} must be a positive odd size (same padding)")
        self.channels, self.kernel, self.padding = channels, kernel, kernel // 2
        # the kernel as a (hidden, C·k·k) matrix: Muon orthogonalizes it and the constraints
        # cap it as any hidden matrix (caps are not needed for the bound, only for the step size)
        self.fc = Linear(channels * kernel * kernel, hidden)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.log_q = nn.Parameter(torch.zeros(hidden))

    def kernel_weight(self) -> Tensor:
        """K (hidden, C, k, k), a view of the matrix fc.weight."""
        return self.fc.weight.view(-1, self.channels, self.kernel, self.kernel)

    def gram_abs(self, K: Tensor) -> Tensor:
        """|G| summed over the offsets (hidden, hidden): Σ_δ |G[i, j, δ]|, G[i, j, δ] =
        Σ_c Σ_u K[i, c, u]·K[j, c, u + δ], the kernel of K Kᵀ."""
        k = K.shape[-1]
        G = F.conv2d(K, K, padding=k - 1)  # (hidden, hidden, 2k−1, 2k−1)
        return G.abs().sum(dim=(-2, -1))

    def scaling(self) -> Tensor:
        """t (hidden,): t_i = Σ_j Σ_δ |G[i, j, δ]|·q_j/q_i, so that T ⪰ K Kᵀ (module docs)."""
        q = self.log_q.exp()
        return (self.gram_abs(self.kernel_weight()) @ q / q).clamp_min(T_FLOOR)

    def scaled_kernel(self) -> Tensor:
        """V = 2·T⁻¹K (hidden, C, k, k): the factors on the kernel, not on the activations."""
        return self.kernel_weight() * (2 / self.scaling())[:, None, None, None]

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        K, p = self.kernel_weight(), self.padding
        h = F.relu(F.conv2d(x, K, self.bias, padding=p))  # (B, hidden, H, W)
        return x - F.conv_transpose2d(h, self.scaled_kernel(), padding=p)  # x − Vᵀh

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """max(1, 2κ − 1) + ‖Δ‖·‖K‖ with κ ≤ (1 + 1e-9)·max_i t⁶⁴_i/t_i (module docs); the
        output bound is not derived (the stem sits before the embedding, where none is
        needed)."""
        walk.norm(f"{name}.fc.weight", self.fc.weight)  # recorded for the layer table
        with torch.no_grad():
            t = self.scaling().double()
            K, q = self.kernel_weight().double(), self.log_q.double().exp()
            if not all(bool(torch.isfinite(v).all()) for v in (t, K, q)):
                raise ValueError(f"{name}: the scaling t or the kernel is not finite")
            t64 = self.gram_abs(K) @ q / q
            kappa = float((t64 / t).max()) * (1 + ROUNDING)
            delta = self.scaled_kernel().double() - 2 * K / t[:, None, None, None]
            rounding = _taps_norm(delta) * _taps_norm(K)
        return max(1.0, 2 * kappa - 1) + rounding, float("inf")


class GridConvSLL(nn.Module):
    """A token mixer for the image transformer: the tokens (B, T, d) laid out on their patch
    grid (gh, gw) as a d-channel image, one ConvSLL layer over it (3×3: each token reads its 8
    neighbours, with a full-strength residual), and back to tokens. The layout is a reshape, so
    ℓ2 over all tokens is ℓ2 over that image and ConvSLL's certificate holds unchanged; it
    mixes tokens, so it has no per-token rule (refused by the language models' walk)."""

    certifies_all_tokens = True  # its rule is for ℓ2 over all tokens (and only that)

    def __init__(self, d_model: int, grid: tuple[int, int], hidden: int, kernel: int = 3) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.conv = ConvSLL(d_model, hidden, kernel)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        (gh, gw), (B, T, d) = self.grid, x.shape
        if T != gh * gw:
            raise ValueError(f"expected {gh}×{gw} = {gh * gw} tokens, got {tuple(x.shape)}")
        y = self.conv(x.view(B, gh, gw, d).permute(0, 3, 1, 2))  # (B, d, gh, gw)
        return y.permute(0, 2, 3, 1).reshape(B, T, d)

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """ConvSLL's L over all tokens; output RMS ≤ L·a + RMS(h(0)), where h(0) = −Vᵀ·ReLU(b)
        (ReLU(b) at every cell) has RMS ≤ ‖V‖·|ReLU(b)|/√d, ‖V‖ ≤ its taps' norms summed."""
        if walk.tokens != "all":
            raise TypeError(f"{name}: GridConvSLL is certified in ℓ2 over all tokens only")
        L, _ = walk.certify(self.conv, a, f"{name}.conv")
        with torch.no_grad():
            relu_b = float(F.relu(self.conv.bias.double()).norm())
            h0 = _taps_norm(self.conv.scaled_kernel().double()) * relu_b / self.conv.channels**0.5
        return L, L * a + h0


def _taps_norm(K: Tensor) -> float:
    """Σ_u ‖K[:, :, u]‖₂ over the k² taps: an upper bound on the conv's operator norm (the
    conv is Σ_u (tap matrix u) ∘ (a zero-padded shift), each shift of norm ≤ 1)."""
    taps = K.permute(2, 3, 0, 1).flatten(0, 1)  # (k², hidden, C)
    return float(torch.linalg.matrix_norm(taps, ord=2).sum())


def fold(x: Tensor, image_shape: tuple[int, int, int], s: int) -> Tensor:
    """Space-to-depth: (B, H·W·C) values in H, W, C order → (B, H/s, W/s, s·s·C), each s×s
    block of cells side by side (a permutation of the values, so an isometry in ℓ2). The
    stem's fold and the ViT's patches (s = p) alike."""
    H, W, C = image_shape
    if x.dim() != 2 or x.shape[1] != H * W * C:
        raise ValueError(f"expected images of shape (B, {H * W * C}), got {tuple(x.shape)}")
    x = x.view(-1, H // s, s, W // s, s, C).transpose(2, 3)  # (B, H/s, W/s, s, s, C)
    return x.reshape(-1, H // s, W // s, s * s * C)


class SLLStem(nn.Module):
    """Image (B, H·W·C) in H, W, C order → fold s×s into channels (B, C·s², H/s, W/s) →
    (``channels``: a per-cell Linear lift to more channels) → ConvSLL layers → the grid
    (B, H/s·W/s·channels) in H, W, C order, an image of shape ``out_shape`` (module docs).
    Certified: σ(lift)·Π L_layers (the fold is a permutation; the lift acts on each cell)."""

    certifies_all_tokens = True  # its rule is for ℓ2 over the whole image

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        n_layer: int,
        hidden: int,
        channels: int | None = None,
        fold: int = 2,
    ) -> None:
        super().__init__()
        H, W, C = image_shape
        if fold < 1 or H % fold or W % fold:
            raise ValueError(f"the stem's fold={fold} must divide the image's {H}×{W} pixels")
        folded = C * fold * fold
        channels = folded if channels is None else channels
        if channels < folded:
            raise ValueError(f"the stem's channels={channels} must be ≥ C·fold² = {folded}")
        if n_layer < 1 or hidden < 1:
            raise ValueError(f"the stem needs n_layer ≥ 1 and hidden ≥ 1, got {n_layer}, {hidden}")
        self.image_shape, self.fold = (H, W, C), fold
        self.out_shape = (H // fold, W // fold, channels)
        self.lift = Linear(folded, channels) if channels > folded else None  # (channels, C·s²)
        self.layers = nn.ModuleList(ConvSLL(channels, hidden) for _ in range(n_layer))

    def forward(self, x: Tensor) -> Tensor:  # (B, H·W·C) -> (B, H/s·W/s·channels)
        g = fold(x, self.image_shape, self.fold)  # (B, H/s, W/s, C·s²)
        if self.lift is not None:
            g = self.lift(g)  # (B, H/s, W/s, channels)
        g = g.permute(0, 3, 1, 2)  # (B, channels, H/s, W/s)
        for layer in self.layers:
            g = layer(g)
        return g.permute(0, 2, 3, 1).reshape(len(x), -1)  # (B, H/s·W/s·channels), H, W, C order

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """σ(lift) (raw ℓ2, the same on every cell) times the layers' constants."""
        L = 1.0
        if self.lift is not None:
            n = walk.norm(f"{name}.lift.weight", self.lift.weight)
            L = n * rms_scale(self.lift.weight)
        for i, layer in enumerate(self.layers):
            L_i, _ = walk.certify(layer, a, f"{name}.layers.{i}")
            L *= L_i
        return L, float("inf")
