"""Lipschitz building blocks: every part has a norm the certificate can read off its weights.

Units (see :mod:`lipschitz.linalg`): a weight ``W`` of shape ``(out, in)`` is measured by its
RMS→RMS norm ``sqrt(in/out)·σ_max(W)``; activations ``(B, T, d)`` by their largest per-token RMS
(∞RMS). The blocks are plain ``torch.nn`` subclasses (``Linear(nn.Linear)``,
``Embedding(nn.Embedding)``), so an optimizer can route parameters by module type.

No layer norm anywhere: activations stay bounded because every weight is norm-bounded, the
GELU is rescaled to slope ≤ 1, attention averages values, and residuals are convex.

Every block owns its Lipschitz facts (docs/architecture.md, "Adding a block"):
``certificate(a, walk, name)`` maps a bound ``a`` on the ∞RMS norm of its input to (Lipschitz
bound on that ball, bound on its output), from the weights as they are, recording each matrix's
norm with ``walk.norm(name, W)`` and certifying its children with ``walk.certify(child, a,
name)`` (lipschitz.certify walks the model; docs/certificates.md derives every rule). A residual
block also declares ``target_factors``, the sensitivity split that sets its matrices' target
norms (lipschitz.optim.routing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz.linalg import head_spectral_norms, row_rms

__all__ = [
    "ACTIVATIONS",
    "GELU_MAX_SLOPE",
    "GELU_SCALE",
    "MLP",
    "RESIDUALS",
    "Block",
    "CausalSelfAttention",
    "Embedding",
    "Linear",
    "RelativePositionBias",
    "apply_rope",
    "bias_rms",
    "maxmin",
    "mixer_target_factors",
    "rope_tables",
    "token_stats",
]

# Exact GELU x·Φ(x) has its largest slope at x = √2: Φ(√2) + √2·φ(√2) = 1.1289041...
GELU_MAX_SLOPE = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi)
# The paper divides by the rounded value; GELU(x)/1.1289 has slope ≤ 1.0000037 (the certificate
# uses the exact ratio GELU_MAX_SLOPE / GELU_SCALE, not 1).
GELU_SCALE = 1.1289


def bias_rms(layer: nn.Linear) -> float:
    """RMS of a linear layer's bias (0.0 without one): how far it moves any output (RMS units)."""
    return 0.0 if layer.bias is None else float(layer.bias.detach().double().pow(2).mean().sqrt())


class Linear(nn.Linear):
    """Linear map initialised at RMS→RMS norm 1 (orthogonal × sqrt(out/in)) or zero; no bias
    unless asked (a bias starts at zero and costs the Lipschitz bound nothing).

    Every singular value starts equal, so the weight starts on the sphere of its norm ball.
    """

    certifies_all_tokens = True  # per token: the same rule in ℓ2 over all tokens

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        zero_init: bool = False,
        bias: bool = False,
        **factory,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, **factory)
        self.zero_init = zero_init
        if zero_init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if getattr(self, "zero_init", False):
                self.weight.zero_()
            else:
                nn.init.orthogonal_(self.weight)  # all singular values 1
                self.weight.mul_(math.sqrt(self.out_features / self.in_features))
            if self.bias is not None:
                self.bias.zero_()

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """x ↦ Wx (+ b): L = ‖W‖, output RMS ≤ ‖W‖·a (+ RMS of b)."""
        n = walk.norm(f"{name}.weight", self.weight)
        return n, n * a + bias_rms(self)


class Embedding(nn.Embedding):
    """Token embedding whose rows (one per token) start Gaussian, rescaled to RMS exactly 1.

    For a one-hot input the embedding's ℓ1→RMS norm is its largest row RMS.
    """

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.weight)
            rms = row_rms(self.weight, keepdim=True)
            self.weight.div_(rms.clamp_min(torch.finfo(self.weight.dtype).tiny))


def rope_tables(seq_len: int, d_head: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin tables of shape (seq_len, d_head/2) for rotary position embeddings."""
    inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)  # (d_head/2,)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq  # (T, d_head/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x₁, x₂) = (first half, second half) of the last dim; an isometry per token.

    x: (B, H, T, d_head); cos, sin: (T, d_head/2).
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RelativePositionBias(nn.Module):
    """A learned bias b[h, Δ] on the attention logit of head h from a query to the key Δ tokens
    back, initialised as a ladder of lags: b[h, Δ] = −|Δ − (h + 1)|, so head h starts out
    reading mostly the token h + 1 back (the previous character for head 0).

    The bias does not depend on the input, so the attention's Jacobian and its certificate rule
    are unchanged (docs/certificates.md, "Position bias"): attention can focus on the previous
    few tokens without the a² logit term that limits content-based focus.
    """

    param_role = "vector"  # trained by AdamW with the model's other non-matrix parameters

    def __init__(self, n_head: int, seq_len: int) -> None:
        super().__init__()
        lag = torch.arange(seq_len, dtype=torch.float32)  # (seq_len,)
        target = torch.arange(1, n_head + 1, dtype=torch.float32)[:, None]  # (H, 1)
        self.bias = nn.Parameter(-(lag - target).abs())  # (H, seq_len)

    def forward(self, T: int) -> Tensor:
        """(H, T, T) additive logits: b[h, t − s] for s ≤ t, −inf above the diagonal."""
        t = torch.arange(T, device=self.bias.device)
        lag = t[:, None] - t[None, :]  # (T, T), query t, key s
        out = self.bias[:, lag.clamp_min(0)]  # (H, T, T)
        return out.masked_fill(lag < 0, -math.inf)


def token_stats(x: Tensor) -> dict[str, Tensor]:
    """Largest |entry| and largest per-token (last-dim) RMS of x, detached."""
    x = x.detach()
    return {"max_abs": x.abs().amax(), "max_rms": row_rms(x).amax()}


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention: RoPE, logits q·kᵀ/d_head × attn_scale (+ an optional
    position bias), ×1/3, then ``o``.

    1/d_head (not 1/√d_head) keeps logits O(1) when q and k have RMS O(1); ×1/3 makes the value
    path of the certificate small. ``q``, ``k``, ``v``, ``o`` are d→d Linear layers; with
    ``attn_scale=0`` there are no ``q``, ``k``: the attention weights are softmax(position bias),
    the same for every input (or the causal average without a bias).
    """

    out_mult = 1.0 / 3.0  # the paper's ×1/3 before the output projection

    def __init__(
        self,
        d_model: int,
        n_head: int,
        seq_len: int,
        attn_scale: float = 1.0,
        zero_init_out: bool = True,
        out_mult: float | None = None,
        pos_bias: bool = False,
    ) -> None:
        super().__init__()
        if out_mult is not None:
            if not out_mult > 0:
                raise ValueError(f"out_mult must be > 0, got {out_mult!r}")
            self.out_mult = float(out_mult)
        if n_head < 1 or d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_head={n_head}")
        if (d_model // n_head) % 2 != 0:
            raise ValueError(f"RoPE needs an even head size, got {d_model // n_head}")
        if not attn_scale >= 0:
            raise ValueError(f"attn_scale must be >= 0, got {attn_scale!r}")
        self.n_head, self.d_head, self.seq_len = n_head, d_model // n_head, seq_len
        self.attn_scale = float(attn_scale)
        # attn_scale 0: content-free attention, the logits are the position bias alone (or 0)
        self.q = Linear(d_model, d_model) if attn_scale > 0 else None
        self.k = Linear(d_model, d_model) if attn_scale > 0 else None
        self.v = Linear(d_model, d_model)
        self.o = Linear(d_model, d_model, zero_init=zero_init_out)
        self.pos_bias = RelativePositionBias(n_head, seq_len) if pos_bias else None
        cos, sin = rope_tables(seq_len, self.d_head)
        self.register_buffer("cos", cos, persistent=False)  # (seq_len, d_head/2)
        self.register_buffer("sin", sin, persistent=False)

    def logit_scale(self) -> float:
        return self.attn_scale / self.d_head

    def scaled_linears(self) -> list[Linear]:
        """The layers whose output passes through ×out_mult: the value (and query and key)
        paths of the attention's sensitivity, for the target-norm rule (paper App. D)."""
        return [lin for lin in (self.q, self.k, self.v) if lin is not None]

    def weight_norms(self, walk, name: str) -> dict:
        """Every matrix's RMS→RMS norm (recorded by ``walk``) and per-head spectral norms:
        keys q, k, v, o and heads_q, heads_k, heads_v (lists of H; 0 for absent q, k)."""
        H = self.n_head
        norms = {"q": 0.0, "k": 0.0, "heads_q": [0.0] * H, "heads_k": [0.0] * H}
        for key, lin in (("q", self.q), ("k", self.k), ("v", self.v)):
            if lin is not None:
                heads = head_spectral_norms(lin.weight, H)
                norms[f"heads_{key}"] = heads
                norms[key] = walk.norm(
                    f"{name}.{key}.weight", lin.weight, head_spectral_norms=heads
                )
        norms["o"] = walk.norm(f"{name}.o.weight", self.o.weight)
        return norms

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """For a head h let σ_Q^h, σ_K^h, σ_V^h be the spectral norms of its d_head×d row block
        of W_Q, W_K, W_V, σ_Q = ‖W_Q‖, H heads, s = attn_scale, c = out_mult:

            a_out = c·‖W_O‖·√(Σ_h (σ_V^h)²)·a
            L     = c·‖W_O‖·[√(Σ_h (σ_V^h)²) + 2·s·H·a²·σ_Q·max_h(σ_K^h·σ_V^h)]

        (docs/certificates.md, "Attention"). Heads may average different tokens, hence the root
        sum of squares; content-free attention (no q, k) has no softmax term."""
        n = self.weight_norms(walk, name)
        H, s, c = self.n_head, self.attn_scale, self.out_mult
        v_path = math.sqrt(sum(x * x for x in n["heads_v"]))
        kv = max(x * y for x, y in zip(n["heads_k"], n["heads_v"], strict=True))
        return c * n["o"] * (v_path + 2 * s * H * a * a * n["q"] * kv), c * n["o"] * v_path * a

    def _mix_by_position(self, v: Tensor, bias: Tensor | None) -> Tensor:
        """Content-free heads: y = softmax(bias) @ v per head, the same weights for every
        sequence, so one (T × T)·(T × B·d_head) product per head with the batch in the columns
        (2–3× faster on a CPU than B·H small products). v: (B, T, d) → (B, T, d)."""
        B, T, C = v.shape
        H, dh = self.n_head, self.d_head
        if bias is None:  # the causal average
            causal = torch.ones(T, T, dtype=torch.bool, device=v.device).tril()
            bias = torch.zeros(H, T, T, dtype=v.dtype, device=v.device)
            bias = bias.masked_fill(~causal, -math.inf)
        v = v.view(B, T, H, dh).permute(2, 1, 0, 3).reshape(H, T, B * dh)  # (H, T, B·dh)
        y = torch.softmax(bias, dim=-1) @ v  # (H, T, B·dh)
        return y.view(H, T, B, dh).permute(2, 1, 0, 3).reshape(B, T, C)

    def forward(self, x: Tensor, stats: dict | None = None) -> Tensor:
        B, T, C = x.shape  # (batch, tokens, d_model)
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds seq_len={self.seq_len}")
        H, dh = self.n_head, self.d_head
        v = self.v(x)  # (B, T, d)
        bias = None if self.pos_bias is None else self.pos_bias(T).to(v.dtype)  # (H, T, T)
        if self.q is None:  # content-free: A = softmax(bias), or the causal average
            return self.o(self._mix_by_position(v, bias) * self.out_mult)
        v = v.view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        q = self.q(x).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        k = self.k(x).view(B, T, H, dh).transpose(1, 2)
        q = apply_rope(q, self.cos[:T], self.sin[:T])
        k = apply_rope(k, self.cos[:T], self.sin[:T])
        if stats is not None:  # largest logit before the causal mask (one T×T matmul)
            with torch.no_grad():
                logits = (q @ k.transpose(-2, -1)) * self.logit_scale()  # (B, H, T, T)
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                stats["max_logit"] = logits.masked_fill(~causal, -math.inf).amax()
        scale = self.logit_scale()
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        y = y.transpose(1, 2).reshape(B, T, C) * self.out_mult  # (B, T, d)
        return self.o(y)


def maxmin(x: Tensor) -> Tensor:
    """MaxMin (GroupSort with groups of 2; Anil, Lucas & Grosse 2019) over the last dim: pairs
    (first half, second half) become (max, min). It permutes each pair, so it is 1-Lipschitz and
    keeps every token's norm exactly; its Jacobian is a permutation, orthogonal wherever it
    exists, so a bounded network keeps its gradient norm (GELU/1.1289's slope is below 1
    almost everywhere: 0.44 at 0)."""
    a, b = x.chunk(2, dim=-1)  # (..., n/2) each
    # max = b + relu(a − b), min = a − relu(a − b): the same numbers up to rounding, and on a
    # CPU about 4× faster forward + backward than torch.maximum/minimum or torch.where
    r = F.relu(a - b)
    return torch.cat([b + r, a - r], dim=-1)


ACTIVATIONS = ("gelu", "maxmin")


class MLP(nn.Module):
    """d → ratio·d → d (the paper: 4) with a 1-Lipschitz activation: exact GELU divided by
    1.1289 (its max slope; the paper), or MaxMin (norm-preserving, the certificate's slope is
    exactly 1). With both matrices at RMS→RMS norm 1, ratio 1 can keep every token's norm
    (square, orthogonal W_in and W_out); a wider MLP returns only the part of its hidden vector
    in W_out's d-dimensional row space. ``bias``: a learned bias before the activation (the
    image transformer's; it shifts where MaxMin switches and leaves L unchanged)."""

    certifies_all_tokens = True  # per token: the same rule in ℓ2 over all tokens

    def __init__(
        self,
        d_model: int,
        zero_init_out: bool = True,
        activation: str = "gelu",
        ratio: int = 4,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if ratio < 1 or (activation == "maxmin" and ratio * d_model % 2):
            raise ValueError(
                f"the MLP's hidden width {ratio}·{d_model} must be >= 1 (even for maxmin)"
            )
        self.activation = activation
        self.fc_in = Linear(d_model, ratio * d_model, bias=bias)  # (ratio·d, d)
        self.fc_out = Linear(ratio * d_model, d_model, zero_init=zero_init_out)

    def linears(self) -> list[Linear]:
        """Its two layers, input first (sensitivity 1 with the 1-Lipschitz activation)."""
        return [self.fc_in, self.fc_out]

    def certificate(
        self, a: float, walk, name: str, gelu_slope: float = GELU_MAX_SLOPE
    ) -> tuple[float, float]:
        """fc_out(GELU(fc_in x)/1.1289): |GELU(z)| ≤ |z| bounds the output, its largest slope
        1.1289041 bounds L. fc_out(MaxMin(fc_in x)): MaxMin permutes pairs, so it keeps norms
        and is 1-Lipschitz. ``gelu_slope``: the slope to count for GELU instead (the paper's
        rule, App. B, counts 1). A bias b of fc_in adds its RMS to the hidden bound."""
        n_in = walk.norm(f"{name}.fc_in.weight", self.fc_in.weight)
        n_out = walk.norm(f"{name}.fc_out.weight", self.fc_out.weight)
        bias = n_out * bias_rms(self.fc_in)  # 0.0 without a bias: the bound is unchanged
        if self.activation == "maxmin":
            return n_out * n_in, n_out * n_in * a + bias
        return n_out * n_in * gelu_slope / GELU_SCALE, (n_out * n_in * a + bias) / GELU_SCALE

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        h = self.fc_in(x)  # (B, T, 4d)
        h = maxmin(h) if self.activation == "maxmin" else F.gelu(h) / GELU_SCALE
        return self.fc_out(h)


def mixer_target_factors(mixer: nn.Module, gamma: float, c: float, after: float) -> dict:
    """The token mixer's part of a residual block's target-norm split (Block.target_factors):
    W_O behind γ gets 1/(γ·after), each path behind the multiplier c (``scaled_linears()``)
    1/(γ·c·after); ``after`` is the product of the sensitivities after the mixer."""
    factors = {id(mixer.o.weight): 1.0 / (gamma * after)}
    for lin in mixer.scaled_linears():
        factors[id(lin.weight)] = 1.0 / (gamma * c * after)
    return factors


RESIDUALS = ("convex", "sum")


class Block(nn.Module):
    """x ← β·x + γ·attn(x); x ← β·x + γ·mlp(x).

    ``mixer``: the token mixer to use as ``attn`` (default: :class:`CausalSelfAttention` built
    from the attention arguments).

    ``residual="convex"`` (the paper, §5.2): β = 1−α, γ = α, so the ∞RMS bound is kept.
    ``residual="sum"``: β = γ = 1, the plain x + f(x) that the paper's May-2025 code ran while
    its ``Mul`` module ignored its scalar (docs/results.md, "Where the paper's Shakespeare rows
    come from"); kept to reproduce those rows, its certificate grows by 1 + L_f per residual.
    """

    certifies_all_tokens = True  # a convex combination: the rule holds in any norm

    def __init__(
        self,
        d_model: int,
        n_head: int,
        seq_len: int,
        alpha: float,
        attn_scale: float = 1.0,
        zero_init_out: bool = True,
        residual: str = "convex",
        attn_out_mult: float | None = None,
        pos_bias: bool = False,
        activation: str = "gelu",
        mixer: nn.Module | None = None,
        mlp_ratio: int = 4,
        mlp_bias: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < alpha <= 1:
            raise ValueError(f"residual weight alpha must be in (0, 1], got {alpha!r}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        self.alpha = float(alpha)
        self.residual = residual
        # the token mixer: the paper's attention, or another module that maps (B, T, d) to
        # (B, T, d) and brings its certificate rule (e.g. lipschitz.nn.lookup.LookupAttention)
        self.attn = mixer or CausalSelfAttention(
            d_model, n_head, seq_len, attn_scale, zero_init_out, attn_out_mult, pos_bias
        )
        self.mlp = MLP(d_model, zero_init_out, activation, mlp_ratio, mlp_bias)

    @property
    def residual_weights(self) -> tuple[float, float]:
        """(β, γ) of x ← β·x + γ·f(x)."""
        return (1 - self.alpha, self.alpha) if self.residual == "convex" else (1.0, 1.0)

    def certificate(
        self, a: float, walk, name: str, weights: tuple[float, float] | None = None
    ) -> tuple[float, float]:
        """Each residual x ↦ β·x + γ·f(x): L ≤ β + γ·L_f, output bound ≤ β·a + γ·a_f.
        ``weights``: (β, γ) to use instead of the block's own (the paper's rule, App. B, always
        takes its convex weights)."""
        beta, gamma = weights or self.residual_weights
        lipschitz = 1.0
        for part in ("attn", "mlp"):
            L_f, a_f = walk.certify(getattr(self, part), a, f"{name}.{part}")
            L, a_next = beta + gamma * L_f, beta * a + gamma * a_f
            walk.step(f"{name}.{part}", L, a, a_next)
            lipschitz, a = lipschitz * L, a_next
        return lipschitz, a

    def target_factors(self, after: float, unit_scalars: bool = False) -> tuple[dict, float]:
        """Modula's sensitivity split of this block's matrices (paper App. D; lipschitz.optim.
        routing): ``after`` is the product of the sensitivities of the residuals after this
        block; returns ({id(weight): factor of the equal share}, ``after`` times this block's
        two sensitivities).

        The block's 6 shares (q, k, v, o, fc_in, fc_out) split as attention 4/6 and MLP 2/6;
        inside attention W_O gets 1/4 and each of the c-scaled paths (value, query, key) 1/(4c)
        (Modula gives the pair (V, scores) 3/4 and divides by c), inside the MLP each matrix
        1/2. A residual's sensitivity is β + γ·s_f: with convex weights (γ = α, c = 1/3) it is
        1 and the factors are 1/α and 1/(α·c), the released code's multipliers; with
        ``residual="sum"`` the attention's is 4 and the MLP's 2, so each layer divides
        everything before it by 8. ``unit_scalars``: as if β, γ and c were 1, whatever the
        forward pass uses (the paper's App. D trick, Modula's ``Mul`` of sensitivity 1)."""
        beta, gamma = (1.0, 1.0) if unit_scalars else self.residual_weights
        c = 1.0 if unit_scalars else self.attn.out_mult
        scaled = self.attn.scaled_linears()  # value path (+ query and key paths)
        s_attn, s_mlp = beta + gamma * len(scaled) * c, beta + gamma * 1.0
        factors = {id(lin.weight): 1.0 / (gamma * after) for lin in self.mlp.linears()}
        after *= s_mlp
        factors.update(mixer_target_factors(self.attn, gamma, c, after))
        return factors, after * s_attn

    def forward(self, x: Tensor, stats: dict | None = None, prefix: str = "") -> Tensor:
        beta, gamma = self.residual_weights
        attn_stats = {} if stats is not None else None
        x = beta * x + gamma * self.attn(x, attn_stats)  # (B, T, d)
        if stats is not None:
            stats[f"{prefix}attn"] = {**token_stats(x), **attn_stats}
        x = beta * x + gamma * self.mlp(x)
        if stats is not None:
            stats[f"{prefix}mlp"] = token_stats(x)
        return x
