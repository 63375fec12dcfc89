"""An SDP-based Lipschitz layer (SLL; Araujo, Havens, Delattre, Allauzen & Hu, "A Unified
Algebraic Perspective on Lipschitz Neural Networks", ICLR 2023) as the MLP of a block:

    h(x) = x − 2·Wᵀ·T⁻¹·ReLU(W x + b),    T = diag(t),  t_i = Σ_j |(W Wᵀ)_ij|·q_j/q_i

is 1-Lipschitz for *any* W and any q > 0 (learned, start 1), because T ⪰ W Wᵀ: with
A = W Wᵀ, vᵀAv ≤ Σ_ij |A_ij|·|v_i||v_j| ≤ Σ_ij |A_ij|·(v_i²·q_j/q_i + v_j²·q_i/q_j)/2 = vᵀTv
(at q = 1, Gershgorin: T − A is diagonally dominant).
So the residual keeps its full strength (no ×α) and the certificate stays exact per layer,
where a convex residual (1 − α)·x + α·MLP(x) with norm caps above 1 certifies a product that
loosens fast (docs/results.md, the ViT's bound sweep).

Why h is 1-Lipschitz, for the weights as they are. Its Jacobian is J = I − 2 Wᵀ M W with
M = T⁻¹ D, D = diag(ReLU'(·)) ∈ [0, 1]. Then JᵀJ = I − 4 WᵀMW + 4 WᵀMWWᵀMW, and with
u = M^½ W v: vᵀJᵀJv = |v|² − 4|u|² + 4 uᵀ(M^½ W Wᵀ M^½)u ≤ |v|² − 4|u|²(1 − κ) where
κ = ‖T^-½ W‖² ≥ ‖M^½ W Wᵀ M^½‖ (D ≤ I). So κ ≤ 1 gives ‖J‖ ≤ 1, and t as above makes κ ≤ 1.
The certificate computes κ from the weights in float64 (with the t the forward pass uses) and
certifies max(1, 2κ − 1): beyond 1 (rounding), h = h' − (2 − 2/κ)·WᵀT⁻¹ReLU(·) with h' the
layer of T' = κT, which is 1-Lipschitz, and the rest has slope ≤ (2 − 2/κ)·κ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz.linalg import row_rms
from lipschitz.nn.layers import Linear, mixer_target_factors, token_stats

__all__ = ["SLLMLP", "SLLBlock", "SLLMixerBlock", "TokenSLL", "TokenSLLHeads"]

T_FLOOR = 1e-12  # t_i of an all-zero row of W (its term is 0·0 either way)


def _scaling(W: Tensor, q: Tensor) -> Tensor:
    """t (..., hidden) of W (..., hidden, d) and q > 0 (..., hidden): t_i = Σ_j |(W Wᵀ)_ij|·q_j/q_i
    (module docs), for one layer or a stack of heads."""
    return (((W @ W.mT).abs() @ q.unsqueeze(-1)).squeeze(-1) / q).clamp_min(T_FLOOR)


class SLLMLP(nn.Module):
    """x ↦ x − 2·Wᵀ·T⁻¹·ReLU(W x + b) on every token (module docs): a full-strength residual
    MLP that is 1-Lipschitz whatever W is, so it needs no norm cap and no α."""

    certifies_all_tokens = True  # per token: the same rule in ℓ2 over all tokens

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = Linear(d_model, hidden)  # W (hidden, d)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.log_q = nn.Parameter(torch.zeros(hidden))  # q = exp(log_q) > 0, starts at 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # runs saved before q was learned had q = 1 (log_q = 0): they load unchanged for
        # evaluation (resuming their training is refused: the optimizer's groups changed)
        state_dict.setdefault(prefix + "log_q", torch.zeros_like(self.log_q))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scaling(self) -> Tensor:
        """t (hidden,): t_i = Σ_j |(W Wᵀ)_ij|·q_j/q_i, so that diag(t) ⪰ W Wᵀ (module docs)."""
        return _scaling(self.fc.weight, self.log_q.exp())

    def scaled_weight(self) -> Tensor:
        """2·T⁻¹W (hidden, d): the factors 2 and 1/t go on the small matrix, not on the
        activations (the same map, about 1.3× faster per block on a CPU)."""
        return self.fc.weight * (2 / self.scaling())[:, None]

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        h = F.relu(F.linear(x, self.fc.weight, self.bias))  # (B, T, hidden)
        # x − h·(2T⁻¹W), fused into one addmm over the flattened tokens
        return torch.addmm(
            x.flatten(0, -2), h.flatten(0, -2), self.scaled_weight(), alpha=-1
        ).view_as(x)

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """L = max(1, 2κ − 1) with κ = ‖T^-½ W‖² (module docs, :func:`_sll_bound`); |h(x)| ≤
        L·|x| + |h(0)| per token."""
        walk.norm(f"{name}.fc.weight", self.fc.weight)  # recorded for the layer table
        with torch.no_grad():
            W = self.fc.weight
            L, h0 = _sll_bound(W, self.scaling(), self.scaled_weight(), self.bias, name)
        return L, L * a + float(row_rms(h0[None]).max())


def _sll_bound(W: Tensor, t: Tensor, V: Tensor, bias: Tensor, name: str) -> tuple[float, Tensor]:
    """(L, h(0)) of one SLL layer: W (hidden, d), t (hidden,) the scaling and V = fl(2T⁻¹W)
    (hidden, d) the matrix the forward multiplies by. L = max(1, 2κ − 1) with κ = ‖T^-½ W‖²
    (module docs), plus ‖Δ‖·‖W‖ for Δ = V − 2T⁻¹W (float32 rounding: the Jacobian is
    I − VᵀDW = I − 2WᵀT⁻¹DW − ΔᵀDW, D ≤ I); h(0) = −2·Wᵀ T⁻¹ ReLU(b) (d,), in float64."""
    t, W = t.double(), W.double()
    if not (torch.isfinite(t).all() and torch.isfinite(W).all()):  # max(1, nan) is 1
        raise ValueError(f"{name}: the scaling t or W is not finite (log_q too large?)")
    kappa = float(torch.linalg.matrix_norm(W / t.sqrt()[:, None], ord=2)) ** 2
    delta = V.double() - 2 * W / t[:, None]  # (hidden, d)
    rounding = float(torch.linalg.matrix_norm(delta, ord=2) * torch.linalg.matrix_norm(W, ord=2))
    h0 = 2 * (F.relu(bias.double()) / t) @ W  # (d,)
    return max(1.0, 2 * kappa - 1) + rounding, h0


def _then_sll(mlp: SLLMLP, mixed: Tensor, stats: dict | None, prefix: str) -> Tensor:
    """The second half of both SLL blocks: record the mixed tokens (B, T, d), apply the SLL
    layer, record its output."""
    if stats is not None:
        stats[f"{prefix}attn"] = token_stats(mixed)
    x = mlp(mixed)
    if stats is not None:
        stats[f"{prefix}mlp"] = token_stats(x)
    return x


def _certify_then_sll(
    mlp: SLLMLP, L1: float, a: float, a1: float, walk, name: str
) -> tuple[float, float]:
    """Record the mixing step (L1: a → a1), then certify the SLL layer after it: the block's
    (L1·L2, output bound)."""
    walk.step(f"{name}.attn", L1, a, a1)
    L2, a2 = walk.certify(mlp, a1, f"{name}.mlp")
    walk.step(f"{name}.mlp", L2, a1, a2)
    return L1 * L2, a2


class SLLBlock(nn.Module):
    """x ← (1 − α)·x + α·mix(x); x ← SLLMLP(x): a token mixer under a convex residual, then
    the SLL layer, whose skip connection is its own (no ×α)."""

    certifies_all_tokens = True  # both steps' rules hold in ℓ2 over all tokens

    def __init__(self, d_model: int, mixer: nn.Module, alpha: float, hidden: int) -> None:
        super().__init__()
        if not 0 < alpha <= 1:
            raise ValueError(f"residual weight alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.attn = mixer
        self.mlp = SLLMLP(d_model, hidden)

    def forward(self, x: Tensor, stats: dict | None = None, prefix: str = "") -> Tensor:
        mixed = (1 - self.alpha) * x + self.alpha * self.attn(x)  # (B, T, d)
        return _then_sll(self.mlp, mixed, stats, prefix)

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """(1 − α) + α·L_mix for the mixing residual, then the SLL layer's own bound."""
        L_mix, a_mix = walk.certify(self.attn, a, f"{name}.attn")
        L1, a1 = 1 - self.alpha + self.alpha * L_mix, (1 - self.alpha) * a + self.alpha * a_mix
        return _certify_then_sll(self.mlp, L1, a, a1, walk, name)

    def target_factors(self, after: float, unit_scalars: bool = False) -> tuple[dict, float]:
        """Modula's split as in Block (lipschitz.nn.layers.Block.target_factors): the SLL layer
        has sensitivity 1 and its matrix the share 1/after; the mixer's W_O 1/(α·after') and its
        c-scaled paths 1/(α·c·after'), after' = after × the SLL layer's sensitivity (1)."""
        gamma = 1.0 if unit_scalars else self.alpha
        beta = 1.0 if unit_scalars else 1 - self.alpha
        c = 1.0 if unit_scalars else self.attn.out_mult
        factors = {id(self.mlp.fc.weight): 1.0 / after}
        factors.update(mixer_target_factors(self.attn, gamma, c, after))
        return factors, after * (beta + gamma * len(self.attn.scaled_linears()) * c)


class TokenSLL(SLLMLP):
    """The SLL layer along the token axis, the same for every channel (an MLP-Mixer token MLP
    that is 1-Lipschitz for any W): for X (T, d), every column X[:, c] ↦ X[:, c] −
    2·Wᵀ·T⁻¹·ReLU(W X[:, c] + b) with W (hidden, T). Content-free like PatchMixing, but with a
    full-strength residual and signed weights: a column's map is an SLL layer, so ℓ2 over all
    entries (the Frobenius norm) gets the same certificate max(1, 2κ − 1), and the output bound
    holds in RMS over all entries (h(0) is the same column for every channel)."""

    certifies_all_tokens = True  # its rule is for ℓ2 over all tokens (and only that)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        return _token_sll(x, self.fc.weight[None], self.scaled_weight()[None], self.bias[None])

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """SLLMLP's rule, over all tokens only (it mixes tokens: no per-token rule)."""
        if walk.tokens != "all":
            raise TypeError(f"{name}: TokenSLL is certified in ℓ2 over all tokens only")
        return super().certificate(a, walk, name)


def _token_sll(x: Tensor, W: Tensor, V: Tensor, b: Tensor) -> Tensor:
    """TokenSLL layers, head h (W[h], V[h] = 2·T⁻¹W[h]: (hidden, T); b[h]: (hidden,)) on
    channels [h·c, (h+1)·c) of x (B, T, H·c), as two batched matmuls: each head's columns, over
    the whole batch, form one (T, B·c) matrix."""
    H, _, T = W.shape
    if x.dim() != 3 or x.shape[1] != T or x.shape[2] % H:
        raise ValueError(f"expected tokens (B, {T}, a multiple of {H}), got {tuple(x.shape)}")
    B, _, d = x.shape
    X = x.reshape(B, T, H, d // H).permute(2, 1, 0, 3).reshape(H, T, B * d // H)  # (H, T, B·c)
    h = F.relu(torch.baddbmm(b[:, :, None], W, X))  # (H, hidden, B·c)
    Y = torch.baddbmm(X, V.transpose(1, 2), h, alpha=-1)  # X − Vᵀh: (H, T, B·c)
    return Y.view(H, T, B, d // H).permute(2, 1, 0, 3).reshape(B, T, d)


class TokenSLLHeads(nn.Module):
    """``n_head`` TokenSLL layers, each on its own d/n_head channels (each head learns its own
    token mixing, as attention heads do). The heads act on disjoint column sets, so in ℓ2 over
    all entries ‖h(X) − h(Y)‖_F² = Σ_h ‖h_h(X_h) − h_h(Y_h)‖_F² ≤ max_h L_h²·‖X − Y‖_F², and
    by Minkowski RMS(h(X)) ≤ max_h L_h·RMS(X) + (mean_h RMS(h_h(0))²)^½ (equal widths).
    The heads' scalings are computed together (:meth:`factors`: a few batched ops instead of a
    dozen per head), and the certificate uses those same factors."""

    certifies_all_tokens = True  # its rule is for ℓ2 over all tokens (and only that)

    def __init__(self, d_model: int, n_tokens: int, hidden: int, n_head: int) -> None:
        super().__init__()
        if n_head < 1 or d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_head={n_head}")
        self.heads = nn.ModuleList(TokenSLL(n_tokens, hidden) for _ in range(n_head))

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """W (H, hidden, T), t (H, hidden) and V = 2·T⁻¹W (H, hidden, T) of every head, the
        scalings of all heads at once."""
        W = torch.stack([head.fc.weight for head in self.heads])
        t = _scaling(W, torch.stack([head.log_q for head in self.heads]).exp())  # (H, hidden)
        return W, t, W * (2 / t).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        W, _, V = self.factors()
        return _token_sll(x, W, V, torch.stack([head.bias for head in self.heads]))

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """max_h L_h, and the output bound above, from the factors the forward uses."""
        if walk.tokens != "all":
            raise TypeError(f"{name}: TokenSLLHeads is certified in ℓ2 over all tokens only")
        with torch.no_grad():
            W, t, V = self.factors()
        L, r2 = 1.0, 0.0
        for i, head in enumerate(self.heads):
            walk.norm(f"{name}.heads.{i}.fc.weight", head.fc.weight)  # for the layer table
            L_h, h0 = _sll_bound(W[i], t[i], V[i], head.bias.detach(), f"{name}.heads.{i}")
            L, r2 = max(L, L_h), r2 + float(row_rms(h0[None]).max()) ** 2
        return L, L * a + (r2 / len(self.heads)) ** 0.5


class SLLMixerBlock(nn.Module):
    """x ← mixer(x); x ← SLLMLP(x): token mixing (TokenSLLHeads: one TokenSLL per head; or
    lipschitz.nn.conv_sll.GridConvSLL: a 3×3 SLL convolution over the patch grid) and channel
    mixing, each a full-strength SLL residual (no ×α, no norm cap needed), so the block
    certifies the product of two max(1, 2κ − 1), 1 up to rounding. Both layers have sensitivity
    1, so the target-norm split leaves their weights at the default share (no
    ``target_factors``)."""

    certifies_all_tokens = True  # both layers' rules hold in ℓ2 over all tokens

    def __init__(self, mixer: nn.Module, d_model: int, hidden: int) -> None:
        super().__init__()
        self.attn = mixer  # TokenSLLHeads, or a 1-Lipschitz mixer of the same kind (GridConvSLL)
        self.mlp = SLLMLP(d_model, hidden)

    def forward(self, x: Tensor, stats: dict | None = None, prefix: str = "") -> Tensor:
        return _then_sll(self.mlp, self.attn(x), stats, prefix)  # (B, T, d)

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """The two SLL layers' bounds, one after the other."""
        L1, a1 = walk.certify(self.attn, a, f"{name}.attn")
        return _certify_then_sll(self.mlp, L1, a, a1, walk, name)
