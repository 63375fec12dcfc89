"""lipschitz.optim.routing and lipschitz.optim.build: tests written to kill mutants that survived
tests/test_optim.py and tests/test_wiring.py (docs/testing.md).

References: target norms worked out by hand from Modula's mass rule as route_parameters'
docstring states it (paper "Training Transformers with Enforced Lipschitz Constants", arXiv
2507.13338, App. D), the configuration values passed in, and float64 SVD.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipschitz.config import Config, apply_overrides
from lipschitz.nn import build_model
from lipschitz.optim import build_optimizers, route_parameters, start_inside_constraints
from lipschitz.optim.routing import residual_target_factors

VOCAB = 50


def _cfg(*overrides: str) -> Config:
    base = ["d_model=16", "n_layer=2", "n_head=1", "seq_len=8"]
    return apply_overrides(Config(), base + list(overrides))


def _groups(optimizers) -> dict[str, tuple[str, dict]]:
    """{parameter name: (optimizer class name, its param group)}."""
    return {name: (type(opt).__name__, g) for opt in optimizers for g in opt.param_groups
            for name in g["param_names"]}  # fmt: skip


# --------------------------------------------------------------------------- build_optimizers


def test_muon_target_norms_follow_blocks_mass():
    """blocks_mass 32, 2 layers (12 hidden matrices), convex residuals α = 1/4, c = 1/3: by
    hand M = 32/(34·12); W_O and the MLP M/α = 0.3137, Q/K/V M/(α·c) = 0.9412, embed/head 1/34."""
    groups = _groups(build_optimizers(_cfg("blocks_mass=32"), build_model(_cfg(), VOCAB)))
    M = 32 / (34 * 12)
    for i in range(2):
        for name in ("attn.o", "mlp.fc_in", "mlp.fc_out"):
            assert groups[f"blocks.{i}.{name}.weight"][1]["target_norm"] == pytest.approx(4 * M)
        for name in ("q", "k", "v"):
            assert groups[f"blocks.{i}.attn.{name}.weight"][1]["target_norm"] == pytest.approx(
                12 * M
            )
    assert groups["head.weight"][1]["target_norm"] == pytest.approx(1 / 34)
    assert groups["embed.weight"][1]["target_norm"] == pytest.approx(1 / 34)


def test_unit_scalars_route_a_convex_model_as_if_every_scalar_were_1():
    """target_norm_scalars=unit (paper App. D): β = γ = c = 1, so the last block's MLP gets M,
    its attention M/2 (÷ the MLP residual's sensitivity 2), block 0 everything ÷ 8 more
    (attention residual 1 + 3, MLP 2), the embedding 1/34 ÷ 8²."""
    cfg = _cfg("blocks_mass=32", "target_norm_scalars=unit")
    groups = _groups(build_optimizers(cfg, build_model(cfg, VOCAB)))
    M = 32 / (34 * 12)
    tn = {n: g["target_norm"] for n, (_, g) in groups.items()}
    for i, decay in ((1, 1.0), (0, 8.0)):
        for name in ("mlp.fc_in", "mlp.fc_out"):
            assert tn[f"blocks.{i}.{name}.weight"] == pytest.approx(M / decay, rel=1e-12)
        for name in ("q", "k", "v", "o"):
            assert tn[f"blocks.{i}.attn.{name}.weight"] == pytest.approx(M / 2 / decay, rel=1e-12)
    assert tn["embed.weight"] == pytest.approx(1 / 34 / 64, rel=1e-12)
    assert tn["head.weight"] == pytest.approx(1 / 34, rel=1e-12)


def test_adamw_ignores_blocks_mass_and_decays_by_lambda():
    """AdamW never uses target norms: with blocks_mass 32 every matrix still decays by λ·1."""
    cfg = _cfg("optimizer=adamw", "constraint=svd_cap", "blocks_mass=32", "weight_decay=0.2",
               "lr=0.03", "adam_betas=[0.7, 0.9]")  # fmt: skip
    (adamw,) = build_optimizers(cfg, build_model(cfg, VOCAB))
    groups = _groups([adamw])
    for name, (_, g) in groups.items():
        if name.startswith("blocks.") or name == "head.weight":
            assert g["weight_decay"] == 0.2, name
        assert "target_norm" not in g and "rule" not in g, name
        assert (g["lr"], g["betas"]) == (0.03, (0.7, 0.9)), name
    assert groups["embed.weight"][1]["weight_decay"] == 0.0


@pytest.mark.parametrize("embed_optimizer", ["muon", "adamw"])
def test_every_optimizer_option_reaches_muon_and_adamw(embed_optimizer):
    """Options away from their defaults arrive unchanged in the param groups; AdamW's groups
    carry no Muon-only key (rule, target_norm)."""
    cfg = _cfg("lr=0.05", "momentum=0.8", "nesterov=true", "momentum_warmup_steps=7",
               "momentum_start=0.6", "coefficients=jordan5", "ns_dtype=bfloat16",
               "weight_decay=0.1", "adam_betas=[0.8, 0.99]", "pos_bias=true",
               f"embed_optimizer={embed_optimizer}")  # fmt: skip
    muon, adamw = build_optimizers(cfg, build_model(cfg, VOCAB))
    want = {"lr": 0.05, "momentum": 0.8, "nesterov": True, "momentum_warmup_steps": 7,
            "momentum_start": 0.6, "coefficients": "jordan5",
            "ns_dtype": torch.bfloat16}  # fmt: skip
    for g in muon.param_groups:
        assert {k: g[k] for k in want} == want
        assert g["weight_decay"] == (0.0 if g["role"] == "embedding" else 0.1)
    assert {g["role"] for g in muon.param_groups} == (
        {"hidden", "head", "embedding"} if embed_optimizer == "muon" else {"hidden", "head"}
    )
    for g in adamw.param_groups:
        assert g["betas"] == (0.8, 0.99)
        assert "rule" not in g and "target_norm" not in g
        assert g["role"] in (("vector",) if embed_optimizer == "muon" else ("vector", "embedding"))
        if g["role"] == "embedding":  # the run's lr (no embed_lr given), not AdamW's default
            assert g["lr"] == 0.05


def test_unknown_optimizer_is_refused_by_name():
    cfg = _cfg()
    object.__setattr__(cfg, "optimizer", "sgd")  # past the choice check, as a caller might
    with pytest.raises(ValueError) as exc:
        build_optimizers(cfg, build_model(_cfg(), VOCAB))
    assert str(exc.value) == "optimizer must be one of ('muon', 'adamw'), got 'sgd'"


# ---------------------------------------------------------------------------- route_parameters


class _Stack(nn.Module):
    """A (3, 4, 5) stack of three 4×5 matrices: a matrix type with a batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 4, 5))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.stack = _Stack()
        self.mid = nn.Linear(5, 5)
        self.head = nn.Linear(5, 7, bias=False)


def test_stacked_matrices_count_one_share_each():
    """n_hidden counts every matrix of a stack: 3 + 1 = 4 hidden matrices, 2 io (embed, head).
    blocks_mass 2: M = 2/((2 + 2)·4) = 1/8 for each hidden matrix, 1/4 for embed and head."""
    net = _Net()
    groups = route_parameters(net, blocks_mass=2.0, matrix_types=(nn.Linear, _Stack))
    tn = {name: g["target_norm"] for g in groups for name, _ in g["params"]}
    assert tn == {"embed.weight": 0.25, "stack.weight": 0.125, "mid.weight": 0.125,
                  "mid.bias": 1.0, "head.weight": 0.25}  # fmt: skip
    rules = {g["role"]: g.get("rule") for g in groups}
    assert rules == {"embedding": "embedding", "hidden": "matrix", "head": "matrix", "vector": None}
    assert [g["role"] for g in groups] == ["embedding", "hidden", "vector", "head"]
    assert (
        route_parameters(net, head_rule="embedding", matrix_types=(nn.Linear, _Stack))[-1]["rule"]
        == "embedding"
    )


def test_param_role_vector_and_explicit_head():
    net = _Net()
    net.stack.param_role = "vector"  # a module may declare its (≥ 2-dim) parameters vectors
    groups = route_parameters(net)
    roles = {name: g["role"] for g in groups for name, _ in g["params"]}
    assert roles == {"embed.weight": "embedding", "stack.weight": "vector", "mid.weight": "hidden",
                     "mid.bias": "vector", "head.weight": "head"}  # fmt: skip
    # head given explicitly: model.head is then an ordinary hidden matrix
    roles = {
        name: g["role"] for g in route_parameters(net, head=net.mid) for name, _ in g["params"]
    }
    assert roles["mid.weight"] == "head" and roles["head.weight"] == "hidden"
    # model.head that is not a Linear is not taken as the head
    net.head = nn.Embedding(7, 5)
    roles = {name: g["role"] for g in route_parameters(net) for name, _ in g["params"]}
    assert roles["head.weight"] == "embedding"


def test_a_tied_weight_is_listed_once_and_its_module_s_other_parameters_still_are():
    net = _Net()
    net.tied = nn.Linear(5, 7)  # weight (7, 5) tied to the embedding's, its own bias
    net.tied.weight = net.embed.weight
    groups = route_parameters(net, matrix_types=(nn.Linear, _Stack))
    names = [name for g in groups for name, _ in g["params"]]
    assert sorted(names) == sorted(["embed.weight", "stack.weight", "mid.weight", "mid.bias",
                                    "head.weight", "tied.bias"])  # fmt: skip


def test_route_parameters_refusals_name_the_problem():
    net = _Net()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError) as exc:
            route_parameters(net, blocks_mass=bad)
        assert str(exc.value) == f"route_parameters: blocks_mass must be > 0, got {bad!r}"
    assert route_parameters(net, blocks_mass=1e-9, matrix_types=(nn.Linear, _Stack))
    with pytest.raises(ValueError) as exc:
        route_parameters(net, head_rule="rows")
    assert str(exc.value) == (
        "route_parameters: head_rule must be one of ('matrix', 'embedding'), got 'rows'"
    )
    with pytest.raises(ValueError) as exc:
        route_parameters(net)
    assert str(exc.value) == (
        "route_parameters: don't know how to treat stack.weight of shape (3, 4, 5) in a _Stack;"
        " pass its type in matrix_types if it is a (..., out, in) weight matrix"
    )


def test_residual_target_factors_of_a_convex_model_by_hand():
    """Convex residuals (α = 1/4, c = 1/3): every residual has sensitivity 1, so W_O and the MLP
    get 1/α = 4, Q/K/V 1/(α·c) = 12, the embedding 1."""
    model = build_model(_cfg(), VOCAB)
    factors, embed = residual_target_factors(model)
    assert embed == pytest.approx(1.0, rel=1e-12)
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        for lin, want in ((attn.o, 4.0), (mlp.fc_in, 4.0), (mlp.fc_out, 4.0), (attn.q, 12.0),
                          (attn.k, 12.0), (attn.v, 12.0)):  # fmt: skip
            assert factors[id(lin.weight)] == pytest.approx(want, rel=1e-12)
    assert len(factors) == 12


# ------------------------------------------------------------------- start_inside_constraints


def test_start_inside_constraints_projects_exactly():
    """Matrices onto the spectral ball by SVD, embedding rows onto the RMS ball by scaling."""
    cfg = _cfg("w_max=0.5", "embed_w_max=0.25", "blocks_mass=none")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    optimizers = build_optimizers(cfg, model)
    W = model.blocks[0].mlp.fc_in.weight.detach().double().clone()
    E = model.embed.weight.detach().double().clone()
    start_inside_constraints(optimizers)
    sv = torch.linalg.svdvals(model.blocks[0].mlp.fc_in.weight.detach().double())
    rms_sv = sv * math.sqrt(W.shape[1] / W.shape[0])
    want = (torch.linalg.svdvals(W) * math.sqrt(W.shape[1] / W.shape[0])).clamp_max(0.5)
    torch.testing.assert_close(rms_sv, want, rtol=1e-5, atol=1e-6)
    rows = model.embed.weight.detach().double().pow(2).mean(1).sqrt()
    want_rows = E.pow(2).mean(1).sqrt().clamp_max(0.25)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=0)
