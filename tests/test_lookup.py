"""Lookup attention (lipschitz.nn.lookup): its certificate against empirical lower bounds and
hand computations, its budget, its ablation; the recall task it is built for."""

import functools
import math

import pytest
import torch
from torch import nn

from lipschitz.certify import certify, empirical_lipschitz
from lipschitz.choices import check_choices
from lipschitz.config import Config, apply_overrides
from lipschitz.data.recall import IGNORE, RecallTask, recall_batch
from lipschitz.linalg import rms_operator_norm
from lipschitz.nn import LipschitzGPT
from lipschitz.nn.layers import CausalSelfAttention, RelativePositionBias
from lipschitz.nn.lookup import LookupAttention, content_off, has_content


def _pick(g: torch.Generator, xs: list):
    return xs[int(torch.randint(len(xs), (), generator=g))]


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _random_lookup_gpt(seed: int) -> LipschitzGPT:
    """A 1–2 layer GPT of LookupAttention blocks with every option drawn at random, every matrix
    Gaussian or orthogonal (all singular values equal) at a random norm in [0.5, 3], position
    biases from flat to one-hot, random sink logits."""
    g = torch.Generator().manual_seed(seed)
    d, H = _pick(g, [8, 16]), _pick(g, [1, 2, 4])
    budget = _pick(g, [None, 1.0, 2.0])
    mixer = functools.partial(
        LookupAttention, d, H, 5,
        content_heads=int(torch.randint(H + 1, (), generator=g)),
        content_scale=_uniform(g, 0.0, 8.0),
        qk_tied=_pick(g, [False, True]),
        key_shift=_pick(g, [False, True]),
        lag_window=_pick(g, [0, 1, 3, 5]),
        lag_gate=_uniform(g, 0.0, 3.0),
        sink=_pick(g, [False, True]),
        budget_w_max=budget,
        out_mult=_pick(g, [1 / 3, 0.5, 1.0]),
        zero_init_out=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LipschitzGPT(
        vocab_size=7, d_model=d, n_layer=_pick(g, [1, 2]), n_head=H, seq_len=5,
        zero_init_out=False, zero_init_head=False, residual=_pick(g, ["convex", "sum"]),
        activation=_pick(g, ["gelu", "maxmin"]), mixer=mixer,
    )  # fmt: skip
    orthogonal = seed % 2 == 1
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                W = torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                if orthogonal:
                    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
                    W = U @ Vh
                m.weight.copy_(W * (_uniform(g, 0.5, 3.0) / float(rms_operator_norm(W))))
            if isinstance(m, RelativePositionBias):
                m.bias.copy_(_pick(g, [1.0, 10.0]) * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, LookupAttention) and m.sink is not None:
                m.sink.copy_(3 * torch.randn(m.sink.shape, generator=g))
    return model.double()


def test_empirical_lower_bound_never_exceeds_the_lookup_certificate():
    """50 random models, embeddings domain (every token RMS ≤ 1) and token inputs."""
    for seed in range(50):
        model = _random_lookup_gpt(seed)
        cert = certify(model, inputs="embeds", input_bound=1.0)
        lower = empirical_lipschitz(model, input_bound=1.0, n_pairs=8, steps=50, seed=seed)
        assert 0 < lower <= cert.lipschitz * (1 + 1e-9), (seed, lower, cert.lipschitz)
        a = torch.randint(0, 7, (16, 5), generator=torch.Generator().manual_seed(seed))
        b = a.clone()
        b[:, 1] = (b[:, 1] + 1) % 7  # differ in one token: ∞ℓ1 distance 2
        with torch.no_grad():
            diff = (model(a) - model(b)).pow(2).mean(-1).sqrt().amax(-1)
        assert float(diff.max()) / 2 <= certify(model).lipschitz * (1 + 1e-9), seed


def _head_at(model: LipschitzGPT) -> LookupAttention:
    return model.blocks[0].attn


def test_lookup_without_content_computes_lag_attention_and_its_certificate():
    torch.manual_seed(0)
    lag = CausalSelfAttention(8, 2, 6, attn_scale=0.0, pos_bias=True, zero_init_out=False)
    look = LookupAttention(8, 2, 6, out_mult=1 / 3, zero_init_out=False)
    look.load_state_dict(lag.state_dict(), strict=False)
    with torch.no_grad():
        lag.pos_bias.bias.copy_(torch.randn(2, 6))
        look.pos_bias.bias.copy_(lag.pos_bias.bias)
    x = torch.randn(3, 6, 8)
    assert torch.allclose(look(x), lag(x), atol=1e-6)
    models = []
    for mixer in (lag, look):
        m = LipschitzGPT(vocab_size=5, d_model=8, n_layer=1, n_head=2, seq_len=6,
                         zero_init_out=False, mixer=lambda mixer=mixer: mixer)  # fmt: skip
        models.append(m)
    models[1].load_state_dict(models[0].state_dict(), strict=False)
    certs = [certify(m, inputs="embeds").lipschitz for m in models]
    assert certs[1] == pytest.approx(certs[0], rel=1e-12)
    assert not has_content(models[1])


def _copy_model(scale: float, budget: float | None, shift: bool = True) -> LipschitzGPT:
    """One content head (d = 4, tied Q = K = I, key shift), V = O = I, MLP off, head I."""
    mixer = functools.partial(
        LookupAttention, 4, 1, 6, content_heads=1, content_scale=scale, qk_tied=True,
        key_shift=shift, budget_w_max=budget, out_mult=0.5, zero_init_out=False,
    )  # fmt: skip
    model = LipschitzGPT(
        vocab_size=4, d_model=4, n_layer=1, n_head=1, seq_len=6, zero_init_out=False,
        zero_init_head=False, mixer=mixer,
    ).double()  # fmt: skip
    I4 = torch.eye(4, dtype=torch.float64)
    with torch.no_grad():
        attn = _head_at(model)
        for lin in (attn.q[0], attn.v, attn.o, model.head):
            lin.weight.copy_(I4)
        model.blocks[0].mlp.fc_out.weight.zero_()
        attn.pos_bias.bias.zero_()
    return model


@pytest.mark.parametrize("budget", [None, 1.0])
def test_content_head_certificate_by_hand(budget):
    """L_att = c·‖W_O‖·n·σ_V·(1 + 2·a²·s·σ_Qσ_K) with every σ = 1 and n = 1/(1 + 2s) under the
    budget; block: β + γ·L_att with α = 1/2 (one layer), MLP off, embedding RMS, head 1."""
    s = 3.0
    model = _copy_model(s, budget)
    n = 1.0 if budget is None else 1 / (1 + 2 * s)
    for a in (0.5, 1.0, 2.0):
        L_att = 0.5 * n * (1 + 2 * a * a * s)
        cert = certify(model, inputs="embeds", input_bound=a)
        assert cert.steps[0]["lipschitz"] == pytest.approx(0.5 + 0.5 * L_att, rel=1e-12)
        assert cert.steps[0]["bound_out"] == pytest.approx(0.5 * a + 0.5 * 0.5 * n * a, rel=1e-12)
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(4, dtype=torch.float64) * 2)  # rows of RMS 1
    assert certify(model).steps[1]["lipschitz"] == pytest.approx(0.5 + 0.25 * n * (1 + 2 * s))


def test_the_budget_makes_a_head_at_its_caps_cost_what_a_content_free_head_costs():
    """Every matrix at the cap w (orthogonal: every head block at w too), inputs of RMS a₀ = 1:
    n_h·(1 + t_h) = 1 for every head, so the mixer's bound is c·‖W_O‖·√(Σ_h σ_V,h²), the
    content-free value, whatever the content scale and lag gate."""
    g = torch.Generator().manual_seed(0)
    for w in (0.5, 1.0):
        mixer = LookupAttention(16, 4, 8, content_heads=2, content_scale=5.0, lag_window=3,
                                lag_gate=1.5, budget_w_max=w, out_mult=0.5,
                                zero_init_out=False).double()  # fmt: skip
        with torch.no_grad():
            for m in mixer.modules():
                if isinstance(m, nn.Linear):
                    U, _, Vh = torch.linalg.svd(
                        torch.randn(m.weight.shape, generator=g, dtype=torch.float64),
                        full_matrices=False,
                    )
                    m.weight.copy_(U @ Vh * (w / float(rms_operator_norm(U @ Vh))))
        # the lag rows: every row of M at the cap's worst case √(H·K/d)·w needs M's rows
        # orthogonal with equal norms, which an orthogonal (12 × 16) M has
        walk = _Recorder()
        L, _ = mixer.certificate(1.0, walk, "m")
        assert L == pytest.approx(0.5 * w * 2 * w, rel=1e-9)  # c·‖W_O‖·√(4·w²)


class _Recorder:
    rule = "certified"

    def norm(self, name: str, W: torch.Tensor, **extra) -> float:
        return float(rms_operator_norm(W))


def test_copy_head_recalls_and_its_empirical_ratio_stays_under_the_certificate():
    """The hand-built induction head of _copy_model: query 'b' finds the token after the
    earlier 'b' and reads it; the ratio of two nearby inputs stays below the certificate."""
    model = _copy_model(20.0, None)
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(4, dtype=torch.float64) * 2)
    seq = torch.tensor([[0, 2, 1, 3, 1]])  # pairs (0→2), (1→3); query 1
    attn = _head_at(model)
    with torch.no_grad():
        probs = torch.softmax(attn.logits(model.embed(seq))[0], -1)[
            0, 0, -1
        ]  # last query's weights
    assert float(probs[3]) > 0.99  # reads the token after the earlier 1: the value 3
    lower = empirical_lipschitz(model, input_bound=1.0, n_pairs=8, steps=100)
    assert lower <= certify(model, inputs="embeds").lipschitz


def test_content_off_and_the_budget_scale():
    model = _copy_model(4.0, 1.0)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        with_content = model(inputs_embeds=x)
        with content_off(model):
            lags_only = model(inputs_embeds=x)
            cert_off = certify(model, inputs="embeds").lipschitz
        assert not torch.allclose(with_content, lags_only)
        assert torch.equal(model(inputs_embeds=x), with_content)  # restored
    assert has_content(model)
    assert cert_off <= certify(model, inputs="embeds").lipschitz
    assert float(_head_at(model).head_scales()[0]) == pytest.approx(1 / 9)  # 1/(1 + 2·4)


def test_lookup_refuses_bad_arguments_by_name():
    for kwargs, word in (
        (dict(content_heads=3), "content_heads"),
        (dict(lag_window=-1), "lag_window"),
        (dict(content_scale=math.nan), "content_scale"),
        (dict(lag_gate=-1.0), "lag_gate"),
        (dict(budget_w_max=-1.0), "budget_w_max"),
    ):
        with pytest.raises(ValueError, match=word):
            LookupAttention(8, 2, 4, **kwargs)
    with pytest.raises(TypeError, match="paper"):
        certify(_copy_model(1.0, None), rule="paper")


# --------------------------------------------------------------------------------------------
# The recall task


def test_recall_sequences_pair_every_query_with_its_value():
    x, y = recall_batch(64, 20, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 20)
    for seq, target in zip(x.tolist(), y.tolist(), strict=True):
        keys, values = seq[0:8:2], seq[1:8:2]
        assert len(set(keys)) == 4 and all(k < 10 for k in keys)
        assert all(10 <= v < 20 for v in values)
        assert target[:8] == [IGNORE] * 8
        for q, t in zip(seq[8:], target[8:], strict=True):
            assert q in keys and t == values[keys.index(q)]


def test_recall_task_validation_is_fixed_and_counts_queries_only():
    task = RecallTask(seq_len=12, pairs=3, vocab=5)
    (x1, y1), (x2, y2) = next(task.val_batches()), next(RecallTask(12, 3, 5).val_batches())
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert task.n_outputs == 10 and (y1 != IGNORE).sum() == 6 * len(y1)
    from lipschitz.training.inference import score

    class Oracle(nn.Module):  # the value of the query's key, read from the sequence
        def forward(self, x):
            keys, values = x[:, 0:6:2], x[:, 1:6:2]
            hit = (x[:, :, None] == keys[:, None, :]).float()  # (B, T, N)
            answer = (hit * values[:, None, :]).sum(-1).long()  # (B, T)
            return nn.functional.one_hot(answer, 10).double()

    assert score(Oracle(), task.val_batches(), torch.device("cpu"))["val_acc"] == 1.0


def test_config_names_the_lookup_and_recall_keys_it_refuses():
    base = Config(mixer="lookup", n_head=2)
    for assignment, word in (
        ("content_heads=3", "content_heads"),
        ("lag_window=999", "lag_window"),
    ):
        with pytest.raises(ValueError, match=word):
            apply_overrides(base, [assignment])
    with pytest.raises(ValueError, match="content_heads belongs to mixer 'lookup'"):
        check_choices(Config(content_heads=1))
    with pytest.raises(ValueError, match="mixer belongs to model 'lipschitz_gpt'"):
        check_choices(Config(model="baseline_gpt", mixer="lookup"))
    with pytest.raises(ValueError, match="seq_len"):
        check_choices(Config(dataset="recall", seq_len=8, recall_pairs=4))
    with pytest.raises(ValueError, match="recall_vocab"):
        check_choices(Config(dataset="recall", recall_pairs=20, recall_vocab=10))
    with pytest.raises(ValueError, match="recall_vocab=100000000 is above 65536"):
        Config(dataset="recall", recall_vocab=10**8)  # a 400 GB allocation before


def _directional_slope(mixer: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> float:
    """‖J(x)·dx‖_∞RMS / ‖dx‖_∞RMS: a lower bound on the mixer's Lipschitz constant near x."""
    with torch.no_grad():
        _, jdx = torch.func.jvp(lambda z: mixer(z), (x,), (dx,))

    def inf_rms(z: torch.Tensor) -> float:
        return float(z.pow(2).mean(-1).sqrt().amax())

    return inf_rms(jdx) / inf_rms(dx)


def test_dynamic_lag_term_is_attained_within_a_factor_two():
    """One head, lags Δ ∈ {0, 1}, M's Δ = 0 row r·u: query 1 weighs itself by g·r·(u·x₁) against
    token 0 at logit 0. With x₁ ⟂ u and x₀ = −x₁ (RMS a) the weights are ½, ½ and a push of x₁
    along u moves them at slope g·r·√d/4 between values 2σ·√d·a apart: the lag part of the
    slope is ½·g·r·√d·a·σ, half of the rule's g·r·√d·a·σ."""
    d, g, r, sigma, a = 4, 1.5, 0.8, 0.7, 1.0
    mixer = LookupAttention(d, 1, 2, lag_window=2, lag_gate=g, out_mult=1.0,
                            zero_init_out=False).double()  # fmt: skip
    u, w = torch.eye(d, dtype=torch.float64)[0], torch.eye(d, dtype=torch.float64)[1]
    with torch.no_grad():
        mixer.pos_bias.bias.zero_()
        mixer.lags.weight.zero_()
        mixer.lags.weight[0] = r * u  # (M x)[Δ = 0] = r·(u·x)
        mixer.v.weight.copy_(sigma * torch.eye(d, dtype=torch.float64))
        mixer.o.weight.copy_(torch.eye(d, dtype=torch.float64))
    x1 = a * math.sqrt(d) * w  # RMS a, orthogonal to u
    x = torch.stack([-x1, x1])[None]  # (1, 2, d)
    dx = torch.zeros_like(x)
    dx[0, 1] = math.sqrt(d) * u  # RMS 1, along u, on the query token only
    slope = _directional_slope(mixer, x, dx)
    lag_part = g * r * math.sqrt(d) * a * sigma
    walk = _Recorder()
    bound, _ = mixer.certificate(a, walk, "m")
    assert bound == pytest.approx(sigma * (1 + lag_part / sigma), rel=1e-9)
    assert slope <= bound
    assert slope >= math.hypot(0.5 * lag_part, 0.5 * sigma) * (1 - 1e-9)


def test_content_head_rule_by_hand_and_above_every_directional_slope():
    """One tied content head Q = K = q·I, values σ·I, no lags: the rule is σ·(1 + 2·a²·s·q²).
    Directional slopes at 500 random points of the domain's boundary (every token at RMS a)
    stay below it; they reach 0.18 of it at s = 4 (the bilinear term assumes the query and the
    key move at once, at a balanced softmax between far-apart values)."""
    d, q, sigma, a = 4, 1.0, 1.0, 1.0
    e = torch.eye(d, dtype=torch.float64)
    for s in (0.5, 4.0):
        mixer = LookupAttention(d, 1, 3, content_heads=1, content_scale=s, qk_tied=True,
                                out_mult=1.0, zero_init_out=False).double()  # fmt: skip
        with torch.no_grad():
            mixer.pos_bias.bias.zero_()
            mixer.q[0].weight.copy_(q * e)
            mixer.v.weight.copy_(sigma * e)
            mixer.o.weight.copy_(e)
        bound, _ = mixer.certificate(a, _Recorder(), "m")
        assert bound == pytest.approx(sigma * (1 + 2 * a * a * s * q * q), rel=1e-12)
        g = torch.Generator().manual_seed(0)
        best = 0.0
        for _ in range(500):
            x = torch.randn(1, 3, d, generator=g, dtype=torch.float64)
            x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * a
            dx = torch.randn(1, 3, d, generator=g, dtype=torch.float64)
            best = max(best, _directional_slope(mixer, x, dx))
        assert sigma < best <= bound, (s, best, bound)


def _reference_lookup(m: LookupAttention, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's formula, query by query, head by head."""
    B, T, d = x.shape
    H, dh = m.n_head, m.d_head
    v = m.v(x).view(B, T, H, dh)
    n = m.head_scales().to(x)
    y = torch.zeros(B, T, H, dh, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                logit = []
                for j in range(i + 1):
                    lag = i - j
                    value = m.pos_bias.bias[h, lag]
                    if m.lags is not None and lag < m.lag_window:
                        value = value + m.lag_gate * m.lags(x[b, i])[h * m.lag_window + lag]
                    if h < m.content_heads:
                        key = x[b, j - 1] if m.key_shift else x[b, j]
                        if m.key_shift and j == 0:
                            key = torch.zeros_like(key)
                        value = value + m.content_scale / d * (m.q[h](x[b, i]) @ m.keys()[h](key))
                    logit.append(value)
                logit = torch.stack(logit + ([m.sink[h]] if m.sink is not None else []))
                w = torch.softmax(logit, 0)[: i + 1]
                y[b, i, h] = n[h] * (w[:, None] * v[b, : i + 1, h]).sum(0)
    return m.o(y.reshape(B, T, d) * m.out_mult)


@pytest.mark.parametrize("lags", [0, 2])
def test_lookup_forward_matches_the_formula_head_by_head(lags):
    torch.manual_seed(0)
    m = LookupAttention(8, 4, 5, content_heads=2, content_scale=3.0, key_shift=True,
                        lag_window=lags, lag_gate=0.7, sink=True, budget_w_max=1.0,
                        out_mult=0.5, zero_init_out=False).double()  # fmt: skip
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        x = torch.randn(2, 5, 8, dtype=torch.float64)
        assert torch.allclose(m(x), _reference_lookup(m, x), atol=1e-10)
