"""The SLL layer (lipschitz/nn/sll.py): 1-Lipschitz for any W, and its certificate an upper
bound from the weights as they are, against exact Jacobians in float64."""

import pytest
import torch
from matrices import jacobian_norm

from lipschitz.certify import _Walk, certify
from lipschitz.nn.sll import SLLMLP, SLLBlock, SLLMixerBlock, TokenSLL, TokenSLLHeads
from lipschitz.nn.vit import LipschitzViT, PatchMixing


@pytest.mark.parametrize("seed", range(20))
def test_the_sll_layer_is_one_lipschitz_for_any_weights(seed):
    gen = torch.Generator().manual_seed(seed)
    d, hidden = 6, int(torch.randint(2, 20, (1,), generator=gen))
    layer = SLLMLP(d, hidden).double()
    with torch.no_grad():  # any scale: T renormalises
        scale = float(10 ** torch.empty(1).uniform_(-2, 2, generator=gen))
        layer.fc.weight.copy_(scale * torch.randn(hidden, d, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(hidden, generator=gen, dtype=torch.float64))
        layer.log_q.copy_(2 * torch.randn(hidden, generator=gen, dtype=torch.float64))  # any q
    L, _ = layer.certificate(1.0, _Walk("certified"), "sll")
    assert L == pytest.approx(1.0, abs=1e-9)  # κ ≤ 1 up to rounding
    xs = 3 * torch.randn(64, d, generator=gen, dtype=torch.float64)
    assert max(jacobian_norm(layer, x[None]) for x in xs) <= L * (1 + 1e-9)


def test_a_scaling_below_gershgorin_is_certified_above_one_and_still_bounds_the_slope(monkeypatch):
    """With t halved the layer is not 1-Lipschitz; the certificate must see it (2κ − 1)."""
    torch.manual_seed(0)
    layer = SLLMLP(4, 4).double()
    with torch.no_grad():
        layer.fc.weight.copy_(torch.eye(4, dtype=torch.float64))  # t = 1, κ = 1
    half = layer.scaling() / 2
    monkeypatch.setattr(layer, "scaling", lambda: half)
    L, _ = layer.certificate(1.0, _Walk("certified"), "sll")
    assert L == pytest.approx(3.0)  # κ = 2: the identity map becomes x − 4·ReLU(x) per entry
    xs = torch.randn(64, 4, dtype=torch.float64).abs()  # ReLU on: slope |1 − 4| = 3
    assert max(jacobian_norm(layer, x[None]) for x in xs) == pytest.approx(3.0)


def test_the_output_bound_holds_on_every_token():
    torch.manual_seed(1)
    layer = SLLMLP(8, 16).double()
    with torch.no_grad():
        layer.fc.weight.normal_()
        layer.bias.normal_(0, 2.0)
    a = 0.5
    _, a_out = layer.certificate(a, _Walk("certified"), "sll")
    x = torch.randn(2048, 8, dtype=torch.float64)
    x = x * a / x.pow(2).mean(-1, keepdim=True).sqrt()  # token RMS exactly a
    y = layer(x[None])[0]
    assert float(y.pow(2).mean(-1).sqrt().max()) <= a_out


def _random_sll_vit(seed: int, block: str, patch: int) -> LipschitzViT:
    """A small float64 ViT on 8×8×3 images with every weight random (biases, q and the
    position embedding too), matrices near norm 1."""
    torch.manual_seed(seed)
    model = LipschitzViT(image_shape=(8, 8, 3), n_classes=5, patch=patch, d_model=8, n_layer=2,
                         n_head=2, block=block, bias=True).double()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[1] ** 0.5
            )
    return model


def _assert_exact_slopes_below(model: LipschitzViT, bound: float) -> None:
    """σ_max of the exact Jacobian at 5 random images ≤ bound (float64)."""
    for _ in range(5):
        x = torch.rand(192, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], x)
        assert float(torch.linalg.matrix_norm(J, ord=2)) <= bound * (1 + 1e-9)


def test_an_sll_vit_is_certified_above_its_exact_jacobian():
    model = _random_sll_vit(2, "sll", patch=4)
    _assert_exact_slopes_below(model, certify(model).lipschitz_l2)
    assert isinstance(model.blocks[0], SLLBlock) and isinstance(model.blocks[0].attn, PatchMixing)


def test_routing_reads_the_sll_blocks_own_split():
    """Modula's rule by hand for one SLLBlock (α = 1/4, mixer multiplier 1): the SLL matrix
    has sensitivity 1 behind it (factor 1), W_O and W_V sit behind ×α (factor 1/α = 4), and
    the block's mixing residual has sensitivity (1 − α) + α·1 = 1 (embedding factor 1)."""
    from lipschitz.optim.routing import residual_target_factors

    model = LipschitzViT(image_shape=(8, 8, 3), n_classes=5, patch=4, d_model=8, n_layer=1,
                         n_head=2, alpha=0.25, block="sll")  # fmt: skip
    factors, embed = residual_target_factors(model)
    block = model.blocks[0]
    assert factors == {id(block.mlp.fc.weight): 1.0, id(block.attn.o.weight): 4.0,
                       id(block.attn.v.weight): 4.0}  # fmt: skip
    assert embed == 1.0


@pytest.mark.parametrize("seed", range(10))
def test_the_token_sll_layer_is_one_lipschitz_over_all_tokens_for_any_weights(seed):
    """The exact Jacobian of the whole (T, d) → (T, d) map, in the Frobenius norm."""
    gen = torch.Generator().manual_seed(seed)
    n_tokens, d, hidden = 5, 3, int(torch.randint(2, 12, (1,), generator=gen))
    layer = TokenSLL(n_tokens, hidden).double()
    with torch.no_grad():
        scale = float(10 ** torch.empty(1).uniform_(-2, 2, generator=gen))
        layer.fc.weight.copy_(scale * torch.randn(hidden, n_tokens, generator=gen).double())
        layer.bias.copy_(torch.randn(hidden, generator=gen, dtype=torch.float64))
        layer.log_q.copy_(2 * torch.randn(hidden, generator=gen, dtype=torch.float64))
    L, a_out = layer.certificate(0.5, _Walk("certified", tokens="all"), "tok")
    assert L == pytest.approx(1.0, abs=1e-9)
    slopes = []
    for _ in range(16):
        x = 3 * torch.randn(n_tokens * d, generator=gen, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(
            lambda z: layer(z.view(1, n_tokens, d)).flatten(), x
        )  # (T·d, T·d)
        slopes.append(float(torch.linalg.matrix_norm(J, ord=2)))
    assert max(slopes) <= L * (1 + 1e-9)
    # the output bound in RMS over all entries
    x = torch.randn(256, n_tokens, d, generator=gen, dtype=torch.float64)
    x = x * 0.5 / x.pow(2).mean((1, 2), keepdim=True).sqrt()  # RMS exactly 0.5
    assert float(layer(x).pow(2).mean((1, 2)).sqrt().max()) <= a_out


def test_the_token_sll_layer_mixes_tokens_and_refuses_the_per_token_walk():
    torch.manual_seed(3)
    layer = TokenSLL(4, 6).double()
    with torch.no_grad():
        layer.fc.weight.normal_()
        layer.bias.fill_(0.1)
    x = torch.zeros(1, 4, 2, dtype=torch.float64)
    x[0, 0] = 1.0  # one token on: the others must move
    assert float(layer(x)[0, 1:].abs().max()) > 0
    with pytest.raises(TypeError, match="all tokens only"):
        layer.certificate(1.0, _Walk("certified"), "tok")


def test_an_sll_mixer_vit_is_certified_above_its_exact_jacobian():
    model = _random_sll_vit(4, "sll_mixer", patch=2)
    cert = certify(model)
    _assert_exact_slopes_below(model, cert.lipschitz_l2)
    block = model.blocks[0]
    assert isinstance(block, SLLMixerBlock) and len(block.attn.heads) == 2
    assert block.attn.heads[0].fc.weight.shape == (2 * 16, 16)
    # both SLL layers certify 1 (up to rounding): the bound is σ(embed)·σ(head) alone
    sigma = [float(torch.linalg.matrix_norm(m.weight, ord=2)) for m in (model.embed, model.head)]
    assert cert.lipschitz_l2 == pytest.approx(sigma[0] * sigma[1], rel=1e-9)


def test_a_layer_saved_before_q_was_learned_loads_with_q_one():
    torch.manual_seed(5)
    layer = SLLMLP(4, 6)
    old = {k: v for k, v in layer.state_dict().items() if k != "log_q"}
    fresh = SLLMLP(4, 6)
    with torch.no_grad():
        fresh.log_q.fill_(1.0)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.log_q, torch.zeros(6))
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(fresh(x), layer(x))


def test_token_sll_heads_take_the_largest_head_bound_and_bound_the_output():
    """Two heads on disjoint channels, one made non-contractive (t halved): the certificate is
    that head's 2κ − 1 = 3, the exact Jacobian of the whole map stays below it, and the output
    RMS over all entries below L·a + the heads' combined h(0)."""
    torch.manual_seed(6)
    n_tokens, d = 4, 4
    heads = TokenSLLHeads(d, n_tokens, 6, n_head=2).double()
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
        heads.heads[1].fc.weight.copy_(torch.eye(4, 6, dtype=torch.float64).T)  # t = 1, κ = 1
    factors = heads.factors

    def halved():  # κ = 2 for the second head only (the forward and the certificate both)
        W, t, _ = factors()
        t = torch.stack([t[0], t[1] / 2])
        return W, t, W * (2 / t).unsqueeze(-1)

    heads.factors = halved
    L, a_out = heads.certificate(0.5, _Walk("certified", tokens="all"), "tok")
    assert L == pytest.approx(3.0)
    x = torch.randn(n_tokens * d, dtype=torch.float64).abs()
    J = torch.autograd.functional.jacobian(lambda z: heads(z.view(1, n_tokens, d)).flatten(), x)
    assert 1.0 < float(torch.linalg.matrix_norm(J, ord=2)) <= L * (1 + 1e-9)
    xs = torch.randn(512, n_tokens, d, dtype=torch.float64)
    xs = xs * 0.5 / xs.pow(2).mean((1, 2), keepdim=True).sqrt()  # RMS exactly 0.5
    assert float(heads(xs).pow(2).mean((1, 2)).sqrt().max()) <= a_out


def test_the_output_bounds_at_zero_input_are_the_exact_output_at_zero():
    """At a = 0 the output bound is RMS(h(0)) exactly (no slack for a wrong h(0) to hide in):
    for one channel SLL layer, one TokenSLL and two TokenSLL heads of different biases."""
    torch.manual_seed(7)
    channel, token = SLLMLP(4, 6).double(), TokenSLL(5, 7).double()
    heads = TokenSLLHeads(4, 5, 7, n_head=2).double()
    for layer in (channel, token, heads):
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
    zeros = torch.zeros(1, 5, 4, dtype=torch.float64)
    _, a = channel.certificate(0.0, _Walk("certified"), "sll")
    assert a == pytest.approx(float(channel(zeros).pow(2).mean(-1).sqrt().max()), rel=1e-12)
    for layer in (token, heads):
        _, a = layer.certificate(0.0, _Walk("certified", tokens="all"), "tok")
        assert a == pytest.approx(float(layer(zeros).pow(2).mean().sqrt()), rel=1e-12)


def test_a_non_finite_scaling_is_refused_not_certified_as_one():
    layer = SLLMLP(3, 4).double()
    with torch.no_grad():
        layer.fc.weight.normal_()
        layer.log_q.copy_(torch.tensor([800.0, 0.0, 0.0, -800.0], dtype=torch.float64))  # inf, 0
    with pytest.raises(ValueError, match="not finite"):
        layer.certificate(1.0, _Walk("certified"), "sll")


def test_the_float32_rounding_of_the_scaled_weight_is_charged():
    """With one unit and Gershgorin tight (t = w²), all ReLUs on, the layer is x ↦ (1 − w·v)x
    with v = fl(2/t·w) in float32: |1 − wv| exceeds max(1, 2κ − 1) by up to ~2e-7 unless the
    certificate charges ‖v − 2w/t‖·|w|, which it does."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for w in (torch.rand(300, generator=gen) * 3 + 0.1).tolist():
        layer = SLLMLP(1, 1)
        with torch.no_grad():
            layer.fc.weight.fill_(w)
            layer.bias.fill_(10.0)
        L = layer.certificate(1.0, _Walk("certified", tokens="all"), "layer")[0]
        v = float(layer.scaled_weight().detach())
        worst = max(worst, abs(1 - float(layer.fc.weight) * v) / L)  # exact in float64
    assert worst <= 1 + 1e-12
