"""Lookup attention: a token mixer that reads by position *and* by content inside a small
certificate. It owns its forward pass and its certificate rule (``certificate``), so a model
uses it by name and ``lipschitz.certify`` walks it without knowing what it is.

H heads. For head h, query token i and key token j ≤ i at lag Δ = i − j, the logit is

    ℓ_h(i, j) = b[h, Δ]                                  lag bias (learned, input-free)
              + g·(M_h x_i)[Δ]            for Δ < K      dynamic lags (lag heads)
              + (s/d)·(Q_h x_i)·(K_h x̃_j)               content (the first n_c heads)

- the lag bias costs nothing in the certificate: it does not depend on the input;
- dynamic lags (Wu et al. 2019, "Pay less attention with lightweight and dynamic
  convolutions"): the query chooses which of the last K lags to read. M_h is head h's K rows of
  M (H·K × d); its logit is linear in the input, so it costs a·(its slope), not a² as q·k does;
- content: q·k with a full-width d × d query and key map per content head (each sees all of a
  token, so the bound on its logit is attained, unlike a d/H slice), scaled by s/d. With
  ``qk_tied`` K_h = Q_h: the logit is a similarity, largest for equal tokens. With
  ``key_shift`` the key is the *previous* token, x̃_j = x_{j−1} (x̃_0 = 0), as H3's shift on the
  keys (Fu et al. 2023): a query finds the token after an earlier occurrence of itself, a
  one-layer induction head. A shifted token is still a token of the input: same certificate;
- an optional sink: one more key with a learned logit z_h and value 0, so a head can read
  little at all. A constant key with value 0 lies inside every ball: free.

The gains g and s are fixed hyperparameters (``lag_gate``, ``content_scale``); M starts at 0, so
a fresh model reads by lag alone, and Q, K, M are capped matrices like every other one.

**A Lipschitz budget per head.** On inputs whose tokens have RMS ≤ a, head h's Jacobian (∞RMS)
is at most σ_V,h·(1 + t_h) with

    t_h = √d·a·g·r_h + 2·a²·s·σ(Q_h)·σ(K_h)

(σ: spectral norm; σ_V,h of head h's rows of W_V; r_h: the largest ℓ2 norm of a row of M_h).
With ``budget_w_max`` = w (the cap the matrices are trained under) and ``budget_input`` a₀, head
h's values are multiplied by n_h = 1/(1 + t_h⁰), t_h⁰ being t_h at the caps (r_h ≤
√(H·K/d)·w, σ(Q_h), σ(K_h) ≤ w) and a₀: a head then costs the certificate no more than a
content-free head, and pays for sharp logits with amplitude. ``budget_w_max=None``: n_h = 1.

Certificate (docs/certificates.md, "Lookup attention"), from the weights as they are:

    L ≤ c·‖W_O‖·√(Σ_h (n_h·σ_V,h·(1 + t_h))²),   output bound c·‖W_O‖·√(Σ_h (n_h σ_V,h)²)·a.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz.linalg import head_spectral_norms
from lipschitz.nn.layers import Linear, RelativePositionBias

__all__ = ["LookupAttention", "content_off", "has_content"]


class LookupAttention(nn.Module):
    """Causal multi-head attention over lags, dynamic lags, content and a sink (module docs).

    With ``content_heads=0``, ``lag_window=0`` and no sink it computes exactly
    ``CausalSelfAttention(attn_scale=0, pos_bias=True)``.
    """

    out_mult = 1.0 / 3.0

    def __init__(
        self,
        d_model: int,
        n_head: int,
        seq_len: int,
        *,
        content_heads: int = 0,
        content_scale: float = 0.0,
        qk_tied: bool = False,
        key_shift: bool = False,
        lag_window: int = 0,
        lag_gate: float = 0.0,
        sink: bool = False,
        budget_w_max: float | None = None,
        budget_input: float = 1.0,
        out_mult: float | None = None,
        zero_init_out: bool = True,
    ) -> None:
        super().__init__()
        if n_head < 1 or d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_head={n_head}")
        if not (isinstance(content_heads, int) and 0 <= content_heads <= n_head):
            raise ValueError(f"content_heads must be an int in [0, n_head={n_head}]")
        if not (isinstance(lag_window, int) and 0 <= lag_window <= seq_len):
            raise ValueError(f"lag_window must be an int in [0, seq_len={seq_len}]")
        numbers = {"content_scale": content_scale, "lag_gate": lag_gate,
                   "budget_input": budget_input, "budget_w_max": budget_w_max,
                   "out_mult": out_mult}  # fmt: skip
        for key, value in numbers.items():
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be finite and >= 0, got {value!r}")
        self.n_head, self.d_head, self.seq_len = n_head, d_model // n_head, seq_len
        self.content_heads, self.content_scale = content_heads, float(content_scale)
        self.key_shift, self.lag_window, self.lag_gate = (
            bool(key_shift),
            lag_window,
            float(lag_gate),
        )
        self.budget_w_max = None if budget_w_max is None else float(budget_w_max)
        self.budget_input = float(budget_input)
        if out_mult is not None:
            self.out_mult = float(out_mult)
        self.v = Linear(d_model, d_model)
        self.o = Linear(d_model, d_model, zero_init=zero_init_out)
        self.pos_bias = RelativePositionBias(n_head, seq_len)  # lag heads: the lag ladder
        with torch.no_grad():
            self.pos_bias.bias[:content_heads] = 0.0  # content heads start reading by content
        # M (H·K × d), zero at the start: the model starts from lag attention
        self.lags = Linear(d_model, n_head * lag_window, zero_init=True) if lag_window else None
        self.q = nn.ModuleList(Linear(d_model, d_model) for _ in range(content_heads))
        self.k = (
            None
            if qk_tied
            else nn.ModuleList(Linear(d_model, d_model) for _ in range(content_heads))
        )
        self.sink = nn.Parameter(torch.zeros(n_head)) if sink else None  # z: the sink's logit
        self.content_enabled = True  # False: dynamic lags and content read as 0 (content_off)

    def keys(self) -> nn.ModuleList:
        return self.q if self.k is None else self.k

    def scaled_linears(self) -> list[Linear]:
        """The layers whose output passes through ×out_mult (for the target-norm rule)."""
        return [self.v, *self.q, *(self.k or []), *([self.lags] if self.lags else [])]

    def head_scales(self) -> Tensor:
        """(H,) n_h = 1/(1 + t_h⁰), t_h⁰ at the caps and budget_input (module docstring)."""
        t = torch.zeros(self.n_head, dtype=torch.float64)
        if self.budget_w_max is not None:
            w, a, H = self.budget_w_max, self.budget_input, self.n_head
            if self.lags is not None:  # √d·a·g·r_h with r_h ≤ σ_max(M) = √(H·K/d)·w
                t += math.sqrt(H * self.lag_window) * a * self.lag_gate * w
            t[: self.content_heads] += 2 * a * a * self.content_scale * w * w
        return 1 / (1 + t)

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attention logits (−inf above the diagonal), split by whether they depend on the
        input: (B, n, T, T) for the first n heads (the content heads; every head when dynamic
        lags are on) and (H − n, T, T) for the lag heads, the same for every sequence."""
        B, T, d = x.shape
        H, K, n_c = self.n_head, self.lag_window, self.content_heads
        bias = self.pos_bias(T).to(x.dtype)  # (H, T, T): b[h, i − j]
        if not self.content_enabled:
            return bias[:0].expand(B, 0, T, T), bias
        if self.lags is not None:
            m = self.lags(x).view(B, T, H, K).transpose(1, 2)  # (B, H, T, K): (M x_i)[h, Δ]
            t = torch.arange(T, device=x.device)
            lag = t[:, None] - t[None, :]  # (T, T): i − j
            inside = (lag >= 0) & (lag < K)
            index = lag.clamp(0, K - 1).expand(B, H, T, T)
            dependent = bias + self.lag_gate * m.gather(-1, index) * inside  # (B, H, T, T)
            n = H
        else:
            dependent, n = bias[:n_c].expand(B, n_c, T, T), n_c
        if n_c:
            x_k = F.pad(x, (0, 0, 1, 0))[:, :T] if self.key_shift else x  # (B, T, d)
            q = torch.stack([lin(x) for lin in self.q], dim=1)  # (B, n_c, T, d)
            k = torch.stack([lin(x_k) for lin in self.keys()], dim=1)
            content = (self.content_scale / d) * (q @ k.transpose(-2, -1))  # (B, n_c, T, T)
            dependent = torch.cat([dependent[:, :n_c] + content, dependent[:, n_c:]], dim=1)
        return dependent, bias[n:]

    def _softmax(self, logits: Tensor, heads: slice) -> Tensor:
        """Attention weights over the keys, and over the sink (then dropped) if there is one."""
        if self.sink is None:
            return torch.softmax(logits, dim=-1)
        T = logits.shape[-1]
        sink = self.sink[heads].to(logits.dtype)[:, None, None].expand(*logits.shape[:-1], 1)
        return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :T]

    def forward(self, x: Tensor, stats: dict | None = None) -> Tensor:
        B, T, C = x.shape  # (batch, tokens, d_model)
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds seq_len={self.seq_len}")
        H, dh = self.n_head, self.d_head
        dependent, shared = self.logits(x)  # (B, n, T, T), (H − n, T, T)
        n = dependent.shape[1]
        if stats is not None:
            stats["max_logit"] = torch.cat(
                [dependent.detach().flatten(), shared.detach().flatten()]
            ).amax()
        v = self.v(x).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        v = v * self.head_scales().to(v)[:, None, None]  # each head within its budget
        y_dep = self._softmax(dependent, slice(0, n)) @ v[:, :n]  # (B, n, T, dh)
        # lag heads: one (T × T)·(T × B·dh) product per head, the batch in the columns
        v_shared = v[:, n:].permute(1, 2, 0, 3).reshape(H - n, T, B * dh)
        y_shared = self._softmax(shared, slice(n, H)) @ v_shared  # (H − n, T, B·dh)
        y_shared = y_shared.view(H - n, T, B, dh).permute(2, 0, 1, 3)  # (B, H − n, T, dh)
        y = torch.cat([y_dep, y_shared], dim=1).transpose(1, 2).reshape(B, T, C)  # (B, T, d)
        return self.o(y * self.out_mult)

    def certificate(self, a: float, walk, name: str) -> tuple[float, float]:
        """(Lipschitz bound on inputs of token RMS ≤ a, bound on the output's token RMS), in
        ∞RMS, from the weights as they are (module docstring; derivation in
        docs/certificates.md, "Lookup attention"). ``walk`` records every matrix norm."""
        if walk.rule == "paper":
            raise TypeError("the paper's rule (App. B) has no formula for LookupAttention")
        H, d, f64 = self.n_head, self.v.in_features, torch.float64
        hv = torch.tensor(head_spectral_norms(self.v.weight, H), dtype=f64)
        walk.norm(f"{name}.v.weight", self.v.weight, head_spectral_norms=hv.tolist())
        n_out = walk.norm(f"{name}.o.weight", self.o.weight)
        t = torch.zeros(H, dtype=f64)  # (H,) Lipschitz constants of each head's logits, ×1/a
        if self.lags is not None:
            rows = self.lags.weight.detach().to("cpu", f64).view(H, self.lag_window, d)
            r = rows.norm(dim=-1).amax(-1)  # (H,) largest row ℓ2 norm of M_h
            walk.norm(f"{name}.lags.weight", self.lags.weight, head_row_norms=r.tolist())
            t += math.sqrt(d) * a * self.lag_gate * r
        for h in range(self.content_heads):  # Q_h, K_h are d × d: RMS→RMS norm = σ
            sq = sk = walk.norm(f"{name}.q.{h}.weight", self.q[h].weight)
            if self.k is not None:
                sk = walk.norm(f"{name}.k.{h}.weight", self.k[h].weight)
            t[h] += 2 * a * a * self.content_scale * sq * sk
        v = self.head_scales() * hv  # (H,) n_h·σ_V,h
        c = self.out_mult
        return c * n_out * float((v * (1 + t)).norm()), c * n_out * float(v.norm()) * a


def content_off(model: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which every LookupAttention of ``model`` reads with its lag bias (and sink)
    alone, its dynamic-lag and content logits set to 0: the ablation ``val_acc_lags_only``."""

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        mixers = [m for m in model.modules() if isinstance(m, LookupAttention)]
        before = [m.content_enabled for m in mixers]
        try:
            for m in mixers:
                m.content_enabled = False
            yield
        finally:
            for m, flag in zip(mixers, before, strict=True):
                m.content_enabled = flag

    return ctx()


def has_content(model: nn.Module) -> bool:
    """Whether ``model`` has a LookupAttention with dynamic lags or content heads."""
    return any(
        isinstance(m, LookupAttention) and (m.lags is not None or m.content_heads > 0)
        for m in model.modules()
    )
