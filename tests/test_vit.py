"""The image transformer (lipschitz.nn.vit): its ℓ2 certificate over the whole image against
exact and empirical lower bounds, the pairwise head radius, augmentation and the margin loss."""

import math

import pytest
import torch
from matrices import jacobian_norm

from lipschitz.certify import _Walk, certify, empirical_lipschitz
from lipschitz.choices import check_choices
from lipschitz.config import Config
from lipschitz.data.images import augment
from lipschitz.nn import LipschitzGPT, LipschitzMLP
from lipschitz.nn.vit import BLOCKS, LipschitzViT, PatchMixing, _shift_matrices, image_shape_of
from lipschitz.robustness import certified_radii


def _random_vit(seed: int) -> LipschitzViT:
    """A small ViT with random sizes and every weight random (no zero branch), some matrices
    scaled beyond norm 1, random mixing kernels and residual weights, half with a stem, half
    averaged over mirror images (in eval mode, which it is returned in)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    torch.manual_seed(seed)
    shape = pick([(8, 8, 3), (8, 8, 1), (12, 12, 3), (4, 8, 3)])
    n_head = pick([1, 2, 4])
    model = LipschitzViT(
        image_shape=shape, n_classes=pick([2, 5, 10]), patch=pick([2, 4]), d_model=8 * n_head,
        n_layer=pick([1, 2, 3]), n_head=n_head, alpha=pick([None, 0.3, 1.0]),
        mlp_ratio=pick([1, 2]), activation=pick(["maxmin", "gelu"]), pool=pick(["flatten", "mean"]),
        bias=pick([False, True]), block=pick(list(BLOCKS)),
        stem_layers=pick([0, 0, 1, 2]), stem_hidden=pick([4, 8]), stem_channels=pick([None, 16]),
        flip_average=pick([False, True]),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("kernel_logits"):
                p.copy_(3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # biases and the position embedding: constants, any size
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
                p.mul_(float(torch.empty(1).uniform_(0.5, 2.0, generator=gen)))
    return model


def _patch_direction(model: LipschitzViT, gen, single: bool) -> torch.Tensor:
    """A unit ℓ2 perturbation of the image: noise in one p×p patch, or spread over all."""
    H, W, C = model.image_shape
    p = model.patch
    d = torch.randn(H, W, C, generator=gen, dtype=torch.float64)
    if single:
        mask = torch.zeros(H, W, 1, dtype=torch.float64)
        mask[p : 2 * p, 0:p] = 1.0 if H >= 2 * p else 0.0
        mask[:p, :p] = 1.0 if H < 2 * p else 0.0
        d = d * mask
    return (d / d.norm()).flatten()


@pytest.mark.parametrize("seed", range(50))
def test_the_l2_certificate_bounds_every_slope_of_a_random_vit(seed):
    model = _random_vit(seed).double()
    cert = certify(model)
    n = math.prod(model.image_shape)
    gen = torch.Generator().manual_seed(seed)
    xs = torch.rand(4, n, generator=gen, dtype=torch.float64)
    slopes = [jacobian_norm(model, x) for x in xs]
    # structured worst cases: one perturbation spread over every patch, one in a single patch
    for single in (False, True):
        d = _patch_direction(model, gen, single)
        for x in xs:
            dz = (model((x + 1e-4 * d)[None]) - model((x - 1e-4 * d)[None])) / 2e-4
            slopes.append(float(dz.detach().norm()))
    assert max(slopes) <= cert.lipschitz_l2 * (1 + 1e-9)
    # the same in RMS units against the repository's gradient-ascent lower bound
    lower = empirical_lipschitz(model, n_pairs=4, steps=20, n_starts=8, seed=seed)
    assert lower <= cert.lipschitz * (1 + 1e-9)
    # each logit difference: ‖∇(z_i − z_j)‖ ≤ pairwise_l2[i][j] ≤ √2·lipschitz_l2
    M = torch.tensor(cert.pairwise_l2, dtype=torch.float64)
    assert (M <= math.sqrt(2) * cert.lipschitz_l2 * (1 + 1e-9)).all()
    for x in xs[:2]:
        J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], x)  # (K, n)
        slope = torch.cdist(J, J)  # (K, K): ‖∇z_i − ∇z_j‖
        assert (slope <= M * (1 + 1e-9) + 1e-12).all()


@pytest.mark.parametrize("pool", ["flatten", "mean"])
def test_a_linear_vit_is_certified_exactly_up_to_the_mixing_bound(pool):
    """With attention-free MLP branches at zero, the ViT is linear: its exact ℓ2 norm is the
    σ_max of its matrix, which the certificate must bound and, with one head and square
    kernels, match within the slack of the per-factor product."""
    torch.manual_seed(0)
    model = LipschitzViT(image_shape=(8, 8, 3), n_classes=4, patch=4, d_model=8, n_layer=2,
                         n_head=1, pool=pool).double()  # fmt: skip
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.weight.copy_(torch.eye(8))  # mixing on, MLPs stay zero
        model.head.weight.normal_()
    A = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], torch.zeros(192).double())
    exact = float(torch.linalg.matrix_norm(A, ord=2))
    bound = certify(model).lipschitz_l2
    assert exact <= bound * (1 + 1e-9)
    assert exact >= 0.3 * bound  # not vacuous


def test_patch_mixing_is_a_convex_combination_of_shifts_with_norm_at_most_one():
    S = _shift_matrices(3, 4)  # (K, T, T)
    assert S.shape == (5 * 7, 12, 12)
    assert (S.sum(dim=1) <= 1).all() and (S.sum(dim=2) <= 1).all()  # partial permutations
    mixer = PatchMixing(8, 2, (3, 4))
    with torch.no_grad():
        mixer.kernel_logits.normal_(0, 3)
    A = mixer.mixing()  # (H, T, T)
    assert (A >= 0).all() and (A.sum(-1) <= 1 + 1e-6).all()
    assert (torch.linalg.matrix_norm(A.double(), ord=2) <= 1 + 1e-6).all()
    # the offset (0, 0) reads the token itself: a kernel all on it is the identity
    with torch.no_grad():
        mixer.kernel_logits.fill_(-1e4).view(2, -1)[:, 2 * 7 + 3] = 0.0  # offset (0, 0)
    torch.testing.assert_close(mixer.mixing()[0], torch.eye(12))


def test_each_walk_refuses_the_rules_it_has_no_derivation_for():
    mixer = PatchMixing(8, 2, (2, 2))
    with pytest.raises(TypeError, match="all tokens only"):
        mixer.certificate(1.0, _Walk("certified"), "mix")
    gpt = LipschitzGPT(vocab_size=5, d_model=8, n_layer=1, n_head=2, seq_len=4)
    walk = _Walk("certified", tokens="all")
    with pytest.raises(TypeError, match="CausalSelfAttention has no rule for ℓ2 over all tokens"):
        walk.certify(gpt.blocks[0], 1.0, "blocks.0")


def test_pairwise_radius_is_exact_for_a_linear_classifier():
    """One Linear layer: the distance from x to the boundary with class j is exactly
    (z_y − z_j)/‖w_y − w_j‖; the certified radius is their minimum, and a step just beyond it
    towards the nearest boundary flips the prediction."""
    torch.manual_seed(0)
    model = LipschitzMLP(in_features=6, hidden=6, out_features=3, n_layers=1).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    cert = certify(model)
    M = torch.tensor(cert.pairwise_l2, dtype=torch.float64)
    radii = certified_radii(logits, y, cert.lipschitz_l2, M)
    assert (radii >= certified_radii(logits, y, cert.lipschitz_l2) - 1e-12).all()
    W = model.layers[0].weight
    for i in range(len(x)):
        gaps = [((logits[i, y[i]] - logits[i, j]) / (W[y[i]] - W[j]).norm(), j)
                for j in range(3) if j != y[i]]  # fmt: skip
        r, j = min(gaps)
        assert float(radii[i]) == pytest.approx(float(r), rel=1e-9)
        step = (W[j] - W[y[i]]) / (W[j] - W[y[i]]).norm()
        assert model((x[i] + r * 1.001 * step)[None]).argmax() != y[i]


def test_flip_average_is_the_mean_over_mirror_images_and_keeps_the_certificate():
    """Eval mode: ½·(g(x) + g(Fx)) with F the left-right mirror, which is an involution and an
    isometry; training mode: g alone; the certificate is the same as without the average, and
    bounds the averaged model's exact slopes (tested on many models above as well)."""
    torch.manual_seed(0)
    kw = dict(image_shape=(8, 4, 3), n_classes=5, patch=2, d_model=8, n_layer=2, n_head=2,
              bias=True, block="sll_mixer")  # fmt: skip
    model = LipschitzViT(**kw, flip_average=True).double()
    plain = LipschitzViT(**kw).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(6, 96, dtype=torch.float64)
    mirrored = model.mirror(x).view(6, 8, 4, 3)
    assert torch.equal(mirrored[:, :, 0], x.view(6, 8, 4, 3)[:, :, 3])
    assert torch.equal(model.mirror(model.mirror(x)), x)
    assert torch.allclose(model(x), plain(x))  # training mode: g alone
    model.eval()
    assert torch.allclose(model(x), (plain(x) + plain(model.mirror(x))) / 2)
    assert not torch.allclose(model(x), plain(x))
    cert, cert_plain = certify(model), certify(plain)
    assert cert.lipschitz_l2 == cert_plain.lipschitz_l2
    assert cert.pairwise_l2 == cert_plain.pairwise_l2
    assert max(jacobian_norm(model, xi) for xi in x) <= cert.lipschitz_l2 * (1 + 1e-9)
    with pytest.raises(ValueError, match="flip_average belongs to model 'lipschitz_vit'"):
        check_choices(Config(model="lipschitz_mlp", dataset="cifar10", flip_average=True))


def test_augment_crops_and_flips_inside_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 6 * 5 * 3)
    out = augment(x, (6, 5, 3), gen, pad=2).view(64, 6, 5, 3)
    padded = torch.nn.functional.pad(x.view(64, 6, 5, 3), (0, 0, 2, 2, 2, 2))
    flips = 0
    for img, src in zip(out, padded, strict=True):
        crops = [(src[dy : dy + 6, dx : dx + 5], f) for dy in range(5) for dx in range(5)
                 for f in (False, True)]  # fmt: skip
        matches = [f for c, f in crops if torch.equal(c.flip(1) if f else c, img)]
        assert matches, "an augmented image is not a crop of the padded image"
        flips += matches[0]
    assert 16 < flips < 48
    # pad 0: no crop, each image is itself or its mirror (the flip-only augmentation)
    same = augment(x, (6, 5, 3), gen, pad=0).view(64, 6, 5, 3)
    for img, src in zip(same, x.view(64, 6, 5, 3), strict=True):
        assert torch.equal(img, src) or torch.equal(img, src.flip(1))


def test_image_shapes_and_config_checks():
    assert image_shape_of(3072) == (32, 32, 3) and image_shape_of(784) == (28, 28, 1)
    with pytest.raises(ValueError, match="not a square image"):
        image_shape_of(3000)
    with pytest.raises(ValueError, match="patch=3 must divide"):
        LipschitzViT(image_shape=(8, 8, 3), n_classes=2, patch=3)
    with pytest.raises(ValueError, match="margin_eps belongs to dataset 'cifar10' or 'mnist'"):
        check_choices(Config(margin_eps=0.1))
    with pytest.raises(ValueError, match="stem_channels and stem_hidden need stem_layers ≥ 1"):
        Config(model="lipschitz_vit", dataset="cifar10", stem_channels=32)
    with pytest.raises(ValueError, match="augment_pad needs augment=true"):
        Config(model="lipschitz_vit", dataset="cifar10", augment_pad=0)
    with pytest.raises(ValueError, match="augment_pad must be >= 0"):
        Config(model="lipschitz_vit", dataset="cifar10", augment=True, augment_pad=-1)
    with pytest.raises(ValueError, match="patch=3 must be even with a stem"):
        LipschitzViT(image_shape=(6, 6, 3), n_classes=2, patch=3, stem_layers=1)
    with pytest.raises(ValueError, match="patch_size belongs to model 'lipschitz_vit'"):
        check_choices(Config(model="lipschitz_mlp", dataset="cifar10", patch_size=2))
    with pytest.raises(ValueError, match="pool belongs to model 'lipschitz_vit'"):
        check_choices(Config(model="lipschitz_mlp", dataset="cifar10", pool="mean"))
    with pytest.raises(ValueError, match="mlp_ratio belongs to model 'lipschitz_gpt' or 'lip"):
        check_choices(Config(model="lipschitz_mlp", dataset="cifar10", mlp_ratio=2))
    with pytest.raises(ValueError, match="pool must be one of"):
        LipschitzViT(image_shape=(8, 8, 3), n_classes=2, pool="max")
    check_choices(Config(model="lipschitz_vit", dataset="cifar10", patch_size=2, margin_eps=0.1,
                         augment=True))  # fmt: skip


@pytest.mark.parametrize("activation", ["maxmin", "gelu"])
def test_an_mlp_with_a_bias_keeps_its_slope_and_bounds_its_output(activation):
    """The bias (bias=True) moves the output bound by ‖W_out‖·RMS(b) and leaves L alone: checked
    on random inputs of token RMS exactly a, against the rule's output bound and slope."""
    from lipschitz.nn.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(16, zero_init_out=False, activation=activation, ratio=2, bias=True).double()
    with torch.no_grad():
        mlp.fc_in.bias.normal_(0, 3.0)
    a = 0.7
    L, a_out = mlp.certificate(a, _Walk("certified"), "mlp")
    x = torch.randn(4096, 16, dtype=torch.float64)
    x = x * a / x.pow(2).mean(-1, keepdim=True).sqrt()  # every token at RMS a
    y = mlp(x)
    assert float(y.pow(2).mean(-1).sqrt().max()) <= a_out
    dx = 1e-6 * torch.randn_like(x)
    slopes = (mlp(x + dx) - y).norm(dim=-1) / dx.norm(dim=-1)
    assert float(slopes.max()) <= L * (1 + 1e-6)
    # without a bias the output bound is the old one: the bias adds its own part only
    mlp.fc_in.bias = None
    L_no_bias, a_no_bias = mlp.certificate(a, _Walk("certified"), "mlp")
    assert L_no_bias == L and a_no_bias < a_out
