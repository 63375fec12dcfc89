"""lipschitz.certify: tests written to kill mutants that survived tests/test_certify.py
(docs/testing.md).

References: values worked out by hand from the rules in the module docstring (the paper's
App. B formulas, "Training Transformers with Enforced Lipschitz Constants", arXiv 2507.13338),
float64 SVD and exact Jacobians from torch.autograd.functional, never the function under test
on both sides of a comparison of values.
"""

import math

import pytest
import torch

import lipschitz.certify as certify_module
from lipschitz.certify import (
    Certificate,
    certificate_table,
    certify,
    empirical_lipschitz,
    jacobian_power_iteration,
    main,
)
from lipschitz.nn import LipschitzGPT, LipschitzMLP

# ------------------------------------------------------------------------------- Certificate


def test_certificate_to_dict_lists_every_field():
    cert = Certificate(2.5, "RMS", "inf-RMS", 1.0, [{"name": "w"}], [{"name": "s"}], 3.5, "paper")
    assert cert.to_dict() == {
        "lipschitz": 2.5,
        "input_norm": "RMS",
        "output_norm": "inf-RMS",
        "input_bound": 1.0,
        "layers": [{"name": "w"}],
        "steps": [{"name": "s"}],
        "lipschitz_l2": 3.5,
        "rule": "paper",
        "pairwise_l2": None,
    }


# ------------------------------------------------------------------------ the σ table and CLI


def test_main_prints_the_table_rows_in_four_significant_digits(monkeypatch, capsys):
    seen = []

    def table(sigmas):
        seen.append(sigmas)
        return [{"sigma": s, "paper": 23.123456 * s, "certified": 908.54321e2 * s} for s in sigmas]

    monkeypatch.setattr(certify_module, "certificate_table", table)
    main(["--table"])
    assert seen == [(1.0, 1.2, 1.6, 2.0)]  # the paper's σ values by default
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "| σ | paper's rule (App. B) | certified (`certify(model)`) |",
        "|---|---|---|",
    ]
    assert lines[2] == "| 1.0 | 23.12 | 9.085e+04 |"
    assert lines[5] == "| 2.0 | 46.25 | 1.817e+05 |"
    assert len(lines) == 6
    main(["--table", "--sigmas", "0.5", "3"])
    assert seen[-1] == (0.5, 3.0)
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| 0.5 | 11.56 | 4.543e+04 |",
        "| 3.0 | 69.37 | 2.726e+05 |",
    ]


def test_main_without_table_is_an_error_and_help_describes_it(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps to the terminal width
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: python -m lipschitz.certify ")
    assert err[-1] == "python -m lipschitz.certify: error: nothing to do: pass --table"
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert "Certificates of the Shakespeare-shaped GPT with every matrix at norm σ." in out
    assert any(line.split() == ["--table", "print", "the", "Shakespeare", "σ", "table"]
               for line in out)  # fmt: skip


def test_certificate_table_builds_the_shakespeare_shape_and_keys_rows_by_sigma(monkeypatch):
    """The table's model is the paper's Shakespeare transformer (character vocabulary of 65,
    d = 256, 3 layers, 4 heads); a small stand-in model keeps the test fast."""
    calls = []

    def small(vocab_size, d_model, n_layer, n_head):
        calls.append((vocab_size, d_model, n_layer, n_head))
        return LipschitzGPT(vocab_size=5, d_model=4, n_layer=1, n_head=1, seq_len=4,
                            zero_init_out=False, zero_init_head=False)  # fmt: skip

    monkeypatch.setattr(certify_module, "_shakespeare_model", small)
    rows = certificate_table((1.5,))
    assert calls == [(65, 256, 3, 4)]
    assert [sorted(r) for r in rows] == [["certified", "paper", "sigma"]]
    assert rows[0]["sigma"] == 1.5
    # by hand (App. B, one head, every Linear at RMS→RMS norm 1.5, embedding rows RMS 1, a = 1):
    # attention (1/3)·1.5·(1.5 + 2·1.5³), MLP 1.5²/1.1289, α = 1/2, head 1.5
    s = 1.5
    L_att = (s / 3) * (s + 2 * s**3)
    L_mlp = s * s / 1.1289
    assert rows[0]["paper"] == pytest.approx((0.5 + 0.5 * L_att) * (0.5 + 0.5 * L_mlp) * s, 1e-6)


# --------------------------------------------------------------------- jacobian_power_iteration


def _mlp(seed: int = 0) -> LipschitzMLP:
    torch.manual_seed(seed)
    model = LipschitzMLP(6, 5, 4, n_layers=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.copy_(torch.randn(layer.weight.shape))
    return model


def test_jacobian_power_iteration_is_reproducible_and_leaves_the_model_alone():
    model = _mlp()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    first = jacobian_power_iteration(model, x, iters=3)
    torch.manual_seed(6)  # the start vector comes from its own seeded generator
    assert jacobian_power_iteration(model, x, iters=3) == first
    assert jacobian_power_iteration(model, x, iters=3, seed=1) != first
    # the model is copied before it is converted to float64
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_jacobian_power_iteration_exact_value_and_defaults():
    model = _mlp(2).double()
    x = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    J = torch.autograd.functional.jacobian(lambda z: model(z)[0], x)[:, 0]  # (out, in)
    exact = float(torch.linalg.matrix_norm(J, ord=2)) * math.sqrt(6 / 4)  # RMS units
    assert jacobian_power_iteration(model, x) == pytest.approx(exact, rel=1e-9)
    # a linear map with singular values 1 and 0.99: still converging after 30 iterations, so
    # the default (30 iterations from seed 0, not 31, not seed 1) shows in the last digits
    slow = LipschitzMLP(3, 3, 3, n_layers=2).double()
    slow.layers = slow.layers[:1]
    with torch.no_grad():
        slow.layers[0].weight.copy_(torch.diag(torch.tensor([1.0, 0.99, 0.5])))
    x3 = torch.ones(1, 3, dtype=torch.float64)
    default = jacobian_power_iteration(slow, x3)
    assert default == pytest.approx(1.0, rel=1e-3)
    assert default == jacobian_power_iteration(slow, x3, iters=30, seed=0)
    assert default != jacobian_power_iteration(slow, x3, iters=31, seed=0)
    assert default != jacobian_power_iteration(slow, x3, iters=30, seed=1)


def test_jacobian_power_iteration_error_names_the_function():
    gpt = LipschitzGPT(vocab_size=5, d_model=4, n_layer=1, n_head=1, seq_len=4)
    with pytest.raises(TypeError, match=r"^jacobian_power_iteration is for MLPs \(samples"):
        jacobian_power_iteration(gpt, torch.zeros(1, 4))


# ------------------------------------------------------------------------- empirical_lipschitz


def test_empirical_lipschitz_defaults():
    """Default: input ball of radius 1, 8 pairs, 100 steps, 256 starts, seed 0 (a radius of 2,
    9 pairs, 101 steps or 255 starts give another value: their mutants fail here)."""
    torch.manual_seed(0)
    model = LipschitzGPT(vocab_size=5, d_model=4, n_layer=1, n_head=1, seq_len=2,
                         zero_init_out=False, zero_init_head=False)  # fmt: skip
    default = empirical_lipschitz(model)
    same = empirical_lipschitz(model, input_bound=1.0, n_pairs=8, steps=100, n_starts=256, seed=0)
    assert default == same
    assert default <= certify(model, inputs="embeds").lipschitz


def test_empirical_lipschitz_is_reproducible_and_leaves_the_model_alone():
    model = _mlp(1)
    torch.manual_seed(3)
    first = empirical_lipschitz(model, n_pairs=2, steps=3)
    torch.manual_seed(4)  # the start comes from its own generator, seeded by ``seed``
    assert empirical_lipschitz(model, n_pairs=2, steps=3) == first
    assert empirical_lipschitz(model, n_pairs=2, steps=3, seed=1) != first
    assert all(p.dtype == torch.float32 for p in model.parameters())  # a float64 copy ran
    # an MLP with an ``embed`` module but no ``blocks`` is still an MLP (and vice versa)
    model.embed = torch.nn.Identity()
    assert empirical_lipschitz(model, n_pairs=2, steps=3) == first
    assert jacobian_power_iteration(model, torch.ones(1, 6), iters=2) > 0
    del model.embed
    model.blocks = torch.nn.ModuleList()
    assert empirical_lipschitz(model, n_pairs=2, steps=3) == first


def test_empirical_lipschitz_argument_checks():
    model = _mlp(1)
    assert empirical_lipschitz(model, n_pairs=1, steps=0) > 0  # the smallest valid search
    bad_options = (
        {"n_pairs": 0},
        {"steps": -1},
        {"n_pairs": 0, "steps": 5},
        {"n_pairs": 3, "steps": -1},
        {"n_starts": -1},
    )
    for bad in bad_options:
        with pytest.raises(ValueError, match=r"^n_pairs must be >= 1, steps >= 0 and n_starts"):
            empirical_lipschitz(model, **bad)
    gpt = LipschitzGPT(vocab_size=5, d_model=4, n_layer=1, n_head=1, seq_len=2)
    for bound in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^input_bound must be > 0, got {bound!r}$"):
            empirical_lipschitz(gpt, input_bound=bound, steps=0)


# ------------------------------------------------------------------------------------ certify


def _linear_mlp() -> LipschitzMLP:
    """3 → 4 → 2, weights with known RMS→RMS norms: 2·[I; 0] (norm 2·√(3/4)) and 0.5·[I 0]."""
    model = LipschitzMLP(3, 4, 2, n_layers=2)
    with torch.no_grad():
        model.layers[0].weight.copy_(2 * torch.eye(4, 3))
        model.layers[1].weight.copy_(0.5 * torch.eye(2, 4))
    return model


def test_mlp_certificate_records_every_layer_and_step_by_hand():
    n0, n1 = 2 * math.sqrt(3 / 4), 0.5 * math.sqrt(4 / 2)  # σ·√(in/out)
    for inputs in (None, "features"):  # "features" is the MLP's only input kind
        cert = certify(_linear_mlp(), inputs=inputs)
        assert cert.rule is None and cert.input_bound is None
        assert (cert.input_norm, cert.output_norm) == ("RMS", "RMS")
        assert [e["name"] for e in cert.layers] == ["layers.0.weight", "layers.1.weight"]
        assert [e["shape"] for e in cert.layers] == [[4, 3], [2, 4]]
        assert [e["rms_operator_norm"] for e in cert.layers] == pytest.approx([n0, n1], rel=1e-12)
        # an input of RMS 1 (the global bound's unit) through the two linear maps
        expected = [("layers.0", n0, 1.0, n0), ("layers.1", n1, n0, n0 * n1)]
        got = [(s["name"], s["lipschitz"], s["bound_in"], s["bound_out"]) for s in cert.steps]
        assert [g[0] for g in got] == [e[0] for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert g[1:] == pytest.approx(e[1:], rel=1e-12)
        assert cert.lipschitz == pytest.approx(n0 * n1, rel=1e-12)


def test_mlp_certificate_refusals_name_the_problem():
    message = r"^an MLP certificate is global: pass neither inputs nor input_bound$"
    for kwargs in ({"inputs": "embeds"}, {"input_bound": 1.0}, {"inputs": "FEATURES"}):
        with pytest.raises(ValueError, match=message):
            certify(_linear_mlp(), **kwargs)

    class Odd(torch.nn.Module):
        pass

    with pytest.raises(TypeError) as exc:
        certify(Odd())
    assert str(exc.value) == (
        "no certificate for Odd: supported models are LipschitzGPT, LipschitzMLP, BaselineMLP"
        " and LipschitzViT (a LayerNorm model has no useful global bound)"
    )
    model = _linear_mlp()
    model.layers[1] = Odd()
    with pytest.raises(TypeError) as exc:
        certify(model)
    message = str(exc.value)
    assert message.startswith("no certificate rule for Odd; give it a method certificate(")
    assert "register_rule(Odd)" in message

    class Inherited(torch.nn.Linear):  # a subclass may compute something else: no inherited rule
        def forward(self, x):
            return 2 * super().forward(x)

    model.layers[1] = Inherited(4, 4)
    with pytest.raises(TypeError, match="no certificate rule for Inherited"):
        certify(model)


def _identity_gpt() -> LipschitzGPT:
    """d = 4, one head, W_Q = 2I, W_K = 3I, W_V = 0.5I, W_O = 1.5I, head 0.7I (norms by eye)."""
    model = LipschitzGPT(vocab_size=4, d_model=4, n_layer=1, n_head=1, seq_len=2,
                         zero_init_out=False, zero_init_head=False).double()  # fmt: skip
    I4 = torch.eye(4, dtype=torch.float64)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for lin, W in ((attn.q, 2 * I4), (attn.k, 3 * I4), (attn.v, 0.5 * I4), (attn.o, 1.5 * I4),
                       (model.head, 0.7 * I4)):  # fmt: skip
            lin.weight.copy_(W)
        rows = [[2.0, 0, 0, 0], [1, 1, 1, 1], [3, 3, 0, 0], [0, 0, 0, 0]]
        model.embed.weight.copy_(torch.tensor(rows))
    return model


def test_gpt_certificate_fields_and_an_input_bound_of_zero():
    model = _identity_gpt()
    cert = certify(model)
    assert cert.rule == "certified" and cert.lipschitz_l2 is None
    assert certify(model, rule="paper").rule == "paper"
    embed = cert.layers[0]
    # rows [2,0,0,0], [1,1,1,1], [3,3,0,0], 0: RMS 1, 1, √(18/4), 0
    assert embed["name"] == "embed.weight" and embed["shape"] == [4, 4]
    assert embed["l1_to_rms"] == pytest.approx(math.sqrt(18 / 4), rel=1e-12)
    assert cert.steps[0]["lipschitz"] == pytest.approx(math.sqrt(18 / 4), rel=1e-12)
    # the domain {every token's RMS ≤ 0} is allowed: the a² term vanishes, the value path stays
    zero = certify(model, inputs="embeds", input_bound=0)
    assert zero.input_bound == 0.0
    L_att = (1 / 3) * 1.5 * 0.5  # (‖W_O‖/3)·‖W_V‖
    mlp = model.blocks[0].mlp
    n_mlp = (
        float(torch.linalg.matrix_norm(mlp.fc_in.weight.detach().double(), ord=2)) * 0.5
    )  # √(4/16)
    n_mlp *= (
        float(torch.linalg.matrix_norm(mlp.fc_out.weight.detach().double(), ord=2)) * 2
    )  # √(16/4)
    slope = 1.1289041451851550 / 1.1289  # the largest slope of GELU(x)/1.1289
    expected = (0.5 + 0.5 * L_att) * (0.5 + 0.5 * n_mlp * slope) * 0.7
    assert zero.lipschitz == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match=r"^input_bound must be >= 0, got -1\.0$"):
        certify(model, inputs="embeds", input_bound=-1)
    with pytest.raises(
        ValueError, match=r"^input_bound applies to inputs='embeds' only \(tokens are one-hot\)$"
    ):
        certify(model, inputs="tokens", input_bound=1.0)


def test_empirical_lipschitz_search_scales_with_the_input_ball():
    """For a positively homogeneous model (f(t·x) = t·f(x)) the search in the ball of radius b
    is the search in the unit ball scaled by b: start, gap, step size and projection all scale
    with b, so the ratio found is the same (up to Adam's ε and rounding). Content-free attention
    (attn_scale = 0) with the MLP's output zeroed is such a model: linear in the embeddings."""
    torch.manual_seed(0)
    model = LipschitzGPT(vocab_size=5, d_model=4, n_layer=1, n_head=1, seq_len=3, attn_scale=0,
                         pos_bias=True, zero_init_out=False, zero_init_head=False)  # fmt: skip
    with torch.no_grad():
        model.blocks[0].mlp.fc_out.weight.zero_()
        model.blocks[0].attn.pos_bias.bias.normal_()
        x = torch.randn(2, 3, 4)
        assert torch.allclose(model(inputs_embeds=3 * x), 3 * model(inputs_embeds=x), atol=1e-5)
    unit = empirical_lipschitz(model, input_bound=1.0, n_pairs=4, steps=4)
    for bound in (0.25, 4.0):
        assert empirical_lipschitz(model, input_bound=bound, n_pairs=4, steps=4) == pytest.approx(
            unit, rel=1e-6
        )
    assert unit <= certify(model, inputs="embeds").lipschitz * (1 + 1e-9)
