"""Building blocks and models of lipschitz.nn: shapes, inits, the math of each layer, the API."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipschitz.linalg import rms_operator_norm
from lipschitz.nn import (
    GELU_MAX_SLOPE,
    GELU_SCALE,
    MLP,
    MODELS,
    BaselineGPT,
    BaselineMLP,
    Block,
    CausalSelfAttention,
    Embedding,
    Linear,
    LipschitzGPT,
    LipschitzMLP,
    activation_stats,
    build_model,
)
from lipschitz.nn.layers import apply_rope, rope_tables

SMALL = dict(vocab_size=11, d_model=16, n_layer=2, n_head=2, seq_len=8)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every zero-initialised matrix random weights, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


# ---------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("shape", [(8, 8), (32, 8), (8, 32), (10, 3)])
def test_linear_init_is_orthogonal_with_unit_rms_norm(shape):
    out_f, in_f = shape
    layer = Linear(in_f, out_f)
    assert isinstance(layer, nn.Linear) and layer.bias is None
    sv = torch.linalg.svdvals(layer.weight.detach().double())
    # every singular value equals sqrt(out/in): RMS→RMS norm exactly 1 (orthogonal × scale)
    torch.testing.assert_close(sv, torch.full_like(sv, math.sqrt(out_f / in_f)), rtol=1e-5, atol=0)
    assert float(rms_operator_norm(layer.weight)) == pytest.approx(1.0, abs=1e-5)
    zero = Linear(in_f, out_f, zero_init=True)
    assert not zero.weight.any()
    zero.reset_parameters()  # re-initialising keeps the zero init
    assert not zero.weight.any()


def test_embedding_rows_have_rms_one():
    emb = Embedding(50, 24)
    assert isinstance(emb, nn.Embedding)
    rms = emb.weight.detach().double().pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-6, atol=0)
    assert emb.weight.std() > 0.5  # Gaussian rows, not constant


def test_gelu_scale_is_its_max_slope():
    x = torch.linspace(-6, 6, 400_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(F.gelu(x).sum(), x)
    assert float(slope.max()) == pytest.approx(GELU_MAX_SLOPE, abs=1e-9)
    assert float(x.detach()[slope.argmax()]) == pytest.approx(math.sqrt(2), abs=1e-4)
    # the paper's rounded constant leaves a slope a hair above 1; the certificate accounts for it
    assert 1.0 < GELU_MAX_SLOPE / GELU_SCALE < 1.00001


def test_rope_is_a_per_token_isometry_and_relative():
    cos, sin = rope_tables(12, 8)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64)
    qs = apply_rope(q.expand(1, 1, 12, 8), cos, sin)  # the same vector at every position
    ks = apply_rope(k.expand(1, 1, 12, 8), cos, sin)
    torch.testing.assert_close(qs.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 12), rtol=1e-6, atol=0)
    dots = (qs[0, 0] @ ks[0, 0].T).float()  # (12, 12): depends on position difference only
    torch.testing.assert_close(dots[3, 1], dots[7, 5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots[2, 2], dots[9, 9], rtol=1e-5, atol=1e-5)


def _reference_attention(m: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention written out: explicit logits (+ bias b[h, t − s]), mask, softmax, ·V, ×1/3, W_O."""
    T = x.shape[1]
    H, dh = m.n_head, m.d_head
    heads = []
    cos, sin = rope_tables(T, dh)
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        v = (x @ m.v.weight.T)[..., sl]
        logits = torch.zeros(x.shape[0], T, T, dtype=x.dtype)  # (B, T, T)
        if m.q is not None:
            q = apply_rope((x @ m.q.weight.T)[:, None, :, sl], cos, sin)[:, 0]  # (B, T, dh)
            k = apply_rope((x @ m.k.weight.T)[:, None, :, sl], cos, sin)[:, 0]
            logits = q @ k.transpose(1, 2) / dh * m.attn_scale
        if m.pos_bias is not None:
            for t in range(T):
                for s_ in range(t + 1):
                    logits[:, t, s_] += m.pos_bias.bias[h, t - s_]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        heads.append(logits.masked_fill(~mask, -math.inf).softmax(-1) @ v)
    return (torch.cat(heads, dim=-1) / 3) @ m.o.weight.T


@pytest.mark.parametrize("pos_bias", [False, True])
@pytest.mark.parametrize("attn_scale", [0.0, 1.0, 3.0])
def test_attention_matches_written_out_math(attn_scale, pos_bias):
    torch.manual_seed(0)
    m = CausalSelfAttention(16, 4, seq_len=8, attn_scale=attn_scale, pos_bias=pos_bias)
    m = _randomize(m).double()
    if pos_bias:
        with torch.no_grad():
            m.pos_bias.bias.normal_(0.0, 2.0)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference_attention(m, x), rtol=1e-10, atol=1e-12)
    assert (m.q is None) == (attn_scale == 0.0)  # content-free attention has no q, k
    if attn_scale == 0.0 and not pos_bias:  # uniform causal average of the values
        v = x @ m.v.weight.T
        avg = v.cumsum(1) / torch.arange(1, 7, dtype=torch.float64)[:, None]
        torch.testing.assert_close(m(x), avg / 3 @ m.o.weight.T, rtol=1e-10, atol=1e-12)


def test_attention_is_causal_and_checks_its_arguments():
    torch.manual_seed(0)
    m = _randomize(CausalSelfAttention(16, 2, seq_len=8))
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[:, 5:] += torch.randn(1, 3, 16)
    torch.testing.assert_close(m(x)[:, :5], m(y)[:, :5])
    assert not torch.allclose(m(x)[:, 5:], m(y)[:, 5:])
    with pytest.raises(ValueError, match="seq_len"):
        m(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="multiple of n_head"):
        CausalSelfAttention(16, 3, seq_len=8)
    with pytest.raises(ValueError, match="even head size"):
        CausalSelfAttention(12, 4, seq_len=8)


def test_mlp_and_block_math():
    torch.manual_seed(0)
    mlp = _randomize(MLP(8)).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    expected = (F.gelu(x @ mlp.fc_in.weight.T) / 1.1289) @ mlp.fc_out.weight.T
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.fc_in.weight.shape == (32, 8) and mlp.fc_out.weight.shape == (8, 32)
    mlp.activation = "maxmin"  # pairs (h_i, h_{i+16}) → (max, min), written out
    h = x @ mlp.fc_in.weight.T  # (3, 5, 32)
    pairs = torch.stack([h[..., :16], h[..., 16:]], dim=-1)  # (3, 5, 16, 2)
    expected = torch.cat([pairs.amax(-1), pairs.amin(-1)], dim=-1) @ mlp.fc_out.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="activation"):
        MLP(8, activation="relu")

    block = Block(8, 2, seq_len=5, alpha=0.25)  # zero-init o and fc_out: both branches output 0
    torch.testing.assert_close(block(x.float()), 0.75**2 * x.float())
    _randomize(block)
    block.double()
    mid = 0.75 * x + 0.25 * block.attn(x)
    torch.testing.assert_close(block(x), 0.75 * mid + 0.25 * block.mlp(mid))
    with pytest.raises(ValueError, match="alpha"):
        Block(8, 2, seq_len=5, alpha=0.0)


def test_layers_declare_their_matrices():
    """Routing reads which layers sit behind attention's ×out_mult from the attention itself."""
    attn = CausalSelfAttention(16, 2, 8)
    assert attn.scaled_linears() == [attn.q, attn.k, attn.v]
    content_free = CausalSelfAttention(16, 2, 8, attn_scale=0.0)
    assert content_free.scaled_linears() == [content_free.v]
    mlp = MLP(16)
    assert mlp.linears() == [mlp.fc_in, mlp.fc_out]


# ---------------------------------------------------------------------------- models


def test_lipschitz_gpt_structure_and_inputs():
    torch.manual_seed(0)
    model = LipschitzGPT(**SMALL)
    assert isinstance(model.embed, Embedding) and isinstance(model.head, Linear)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    assert all(isinstance(b, Block) and b.alpha == 1 / 4 for b in model.blocks)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    # zero-init head and output projections by default
    assert not model.head.weight.any()
    assert not model.blocks[0].attn.o.weight.any() and not model.blocks[1].mlp.fc_out.weight.any()
    idx = torch.randint(0, 11, (3, 8))
    assert model(idx).shape == (3, 8, 11) and not model(idx).any()

    _randomize(model)
    logits = model(idx)
    torch.testing.assert_close(logits, model(inputs_embeds=model.embed(idx)))
    model.final_scale = 2.5
    torch.testing.assert_close(model(idx), 2.5 * logits)
    with pytest.raises(TypeError, match="exactly one"):
        model(idx, inputs_embeds=model.embed(idx))
    with pytest.raises(TypeError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        model(inputs_embeds=torch.randn(2, 8, 15))
    with pytest.raises(TypeError, match="long"):
        model(idx.float())
    with pytest.raises(ValueError, match="n_layer"):
        LipschitzGPT(**{**SMALL, "n_layer": 0})


def test_lipschitz_gpt_options():
    model = LipschitzGPT(**SMALL, attn_scale=2.0, zero_init_out=False, zero_init_head=False)
    assert model.blocks[1].attn.attn_scale == 2.0
    assert float(rms_operator_norm(model.blocks[0].attn.o.weight)) == pytest.approx(1, abs=1e-5)
    assert float(rms_operator_norm(model.head.weight)) == pytest.approx(1, abs=1e-5)
    tied = LipschitzGPT(**SMALL, tie_head=True)
    assert tied.head.weight is tied.embed.weight and tied.head.weight.any()
    assert sum(p is tied.embed.weight for p in tied.parameters()) == 1  # listed once
    idx = torch.randint(0, 11, (2, 8))
    x = tied.embed(idx)
    for block in tied.blocks:
        x = block(x)
    torch.testing.assert_close(tied(idx), x @ tied.embed.weight.T)


def test_build_model_leaves_architectural_constants_to_the_models():
    from lipschitz.config import apply_overrides
    from lipschitz.presets import preset

    assert set(MODELS) == {"lipschitz_gpt", "baseline_gpt", "lipschitz_mlp", "baseline_mlp",
                           "lipschitz_vit"}  # fmt: skip
    cfg = apply_overrides(preset("tiny"), ["d_model=16", "n_layer=3", "n_head=2", "seq_len=8"])
    model = build_model(cfg, 11)
    assert isinstance(model, LipschitzGPT) and model.embed.num_embeddings == 11
    assert cfg.residual_alpha is None  # so α is the model's own 1/(2·n_layer)
    assert all(b.alpha == 1 / 6 and b.residual == "convex" for b in model.blocks)
    assert all(b.attn.out_mult == cfg.attn_out_mult for b in model.blocks)
    mlp_cfg = apply_overrides(cfg, ["model=lipschitz_mlp", "dataset=cifar10"])
    mlp = build_model(mlp_cfg, 10, 48)
    assert isinstance(mlp, LipschitzMLP)
    assert [m.weight.shape for m in mlp.layers] == [(16, 48), (16, 16), (10, 16)]


def test_baseline_gpt_same_interface():
    torch.manual_seed(0)
    model = BaselineGPT(**SMALL)
    names = dict(model.named_children())
    assert isinstance(names["embed"], nn.Embedding) and isinstance(names["blocks"], nn.ModuleList)
    assert isinstance(names["head"], nn.Linear) and model.head.weight.shape == (11, 16)
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 2 * 2 + 1
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    assert model.blocks[0].attn.logit_scale() == pytest.approx(1 / math.sqrt(8))
    idx = torch.randint(0, 11, (2, 8))
    model.head.weight.data.normal_()
    logits = model(idx)
    assert logits.shape == (2, 8, 11)
    torch.testing.assert_close(logits, model(inputs_embeds=model.embed(idx)))
    # standard residual x + f(x): a zero-init block is the identity (no (1-α) shrinkage)
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(model.blocks[0](x), x)
    logits.square().mean().backward()
    assert model.embed.weight.grad.abs().sum() > 0
    tied = BaselineGPT(**SMALL, tie_head=True)
    assert tied.head.weight is tied.embed.weight


@pytest.mark.parametrize("cls", [LipschitzMLP, BaselineMLP])
def test_mlps(cls):
    torch.manual_seed(0)
    model = cls()
    dims = [(m.in_features, m.out_features) for m in model.layers]
    assert dims == [(3072, 256), (256, 256), (256, 10)]
    assert all(m.bias is None for m in model.layers)
    x = torch.rand(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out, model(inputs_embeds=x))
    h = x.flatten(1)
    for i, layer in enumerate(model.layers):
        h = layer(h if i == 0 else torch.relu(h))
    torch.testing.assert_close(out, h)
    norms = [float(rms_operator_norm(m.weight)) for m in model.layers]
    if cls is LipschitzMLP:
        assert norms == pytest.approx([1, 1, 1], abs=1e-5)
    else:  # PyTorch default init is not norm-1
        assert all(abs(n - 1) > 0.05 for n in norms)
    assert len(cls(12, 8, 3, n_layers=4).layers) == 4
    with pytest.raises(ValueError, match="input features"):
        model(torch.rand(2, 100))


def test_return_stats_and_activation_stats():
    torch.manual_seed(0)
    model = _randomize(LipschitzGPT(**SMALL)).requires_grad_(False)
    idx = torch.randint(0, 11, (3, 8))
    logits, _ = model(idx, return_stats=True)
    torch.testing.assert_close(logits, model(idx))
    floats = activation_stats(model, idx)
    assert list(floats) == [
        "embed",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
        "logits",
    ]
    assert floats["embed"]["max_rms"] == pytest.approx(1.0, abs=1e-6)  # embedding rows RMS 1
    assert floats["logits"]["max_abs"] == pytest.approx(float(logits.abs().max()))
    rms = logits.pow(2).mean(-1).sqrt().max()
    assert floats["logits"]["max_rms"] == pytest.approx(float(rms))
    # the residual stream after block 0's attention, recomputed by hand
    b0 = model.blocks[0]
    x = model.embed(idx)
    x = 0.75 * x + 0.25 * b0.attn(x)
    assert floats["blocks.0.attn"]["max_abs"] == pytest.approx(float(x.abs().max()), rel=1e-6)
    ref = {}
    b0.attn(model.embed(idx), ref)
    assert floats["blocks.0.attn"]["max_logit"] == pytest.approx(float(ref["max_logit"]))
    # largest logit by brute force over heads and causal pairs
    e = model.embed(idx)
    cos, sin = rope_tables(8, 8)
    q = apply_rope((e @ b0.attn.q.weight.T).view(3, 8, 2, 8).transpose(1, 2), cos, sin)
    k = apply_rope((e @ b0.attn.k.weight.T).view(3, 8, 2, 8).transpose(1, 2), cos, sin)
    lg = (q @ k.transpose(-1, -2)) / 8
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert floats["blocks.0.attn"]["max_logit"] == pytest.approx(float(lg[..., causal].max()))

    base = BaselineGPT(**SMALL)
    assert set(activation_stats(base, idx)) == set(floats)
    mlp_stats = activation_stats(LipschitzMLP(12, 8, 3), torch.randn(5, 12))
    assert list(mlp_stats) == ["layers.0", "layers.1", "layers.2"]
