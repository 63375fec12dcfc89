"""Certified radii against a real attack: PGD never beats a certificate, and it does work."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lipschitz.robustness as rob
from lipschitz.certify import certify
from lipschitz.cli import main as cli_main
from lipschitz.nn import BaselineMLP, LipschitzMLP
from lipschitz.robustness import (
    autoattack_l2,
    certified_radii,
    check_attack,
    margins,
    pgd_l2,
    robust_accuracy,
)


def test_margins_and_radii_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0])
    torch.testing.assert_close(margins(logits, labels), torch.tensor([2.0, -2.0]))
    radii = certified_radii(logits, labels, lipschitz_l2=0.5)
    torch.testing.assert_close(radii, torch.tensor([2.0 / (math.sqrt(2) * 0.5), 0.0]))
    with pytest.raises(ValueError, match="lipschitz_l2"):
        certified_radii(logits, labels, 0.0)


def _trained_mlp(seed: int) -> tuple[LipschitzMLP, torch.Tensor, torch.Tensor]:
    """A small Lipschitz MLP fitted a little to a separable task, so margins are not tiny."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(128, 24, generator=gen)
    w = torch.randn(24, 4, generator=gen)
    y = ((x - 0.5) @ w).argmax(dim=1)
    torch.manual_seed(seed)
    model = LipschitzMLP(in_features=24, hidden=32, out_features=4, n_layers=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x) * 4, y).backward()
        opt.step()
    return model, x, y


@pytest.mark.parametrize("seed", range(4))
def test_pgd_never_flips_a_certified_input(seed):
    model, x, y = _trained_mlp(seed)
    L = certify(model).lipschitz_l2
    with torch.no_grad():
        radii = certified_radii(model(x), y, L)
    assert (radii > 0).any()
    # attack every certified input right at 0.99 of its own radius: it must stay correct
    for eps in radii[radii > 0].quantile(torch.tensor([0.25, 0.5, 0.9])).tolist():
        inside = radii > eps / 0.99
        x_adv = pgd_l2(model, x[inside], y[inside], eps, steps=100)
        assert (x_adv - x[inside]).flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5)
        with torch.no_grad():
            assert (model(x_adv).argmax(1) == y[inside]).all()
    report = robust_accuracy(model, x, y, L, eps_list=(0.0, 0.05, 0.2, 0.5), pgd_steps=30)
    for row in report["eps"]:
        assert row["pgd_acc"] >= row["verified_acc"]


def test_pgd_breaks_an_unconstrained_model():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 24, generator=gen)
    torch.manual_seed(0)
    model = BaselineMLP(in_features=24, hidden=64, out_features=4, n_layers=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(8.0)  # a sensitive network
        y = model(x).argmax(1)  # clean accuracy 100% by construction
    x_adv = pgd_l2(model, x, y, eps=0.5, steps=50)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < 0.5


def test_attacks_on_a_subset_are_compared_with_the_same_subset():
    model, x, y = _trained_mlp(1)
    cert = certify(model)
    M = torch.tensor(cert.pairwise_l2)
    full = robust_accuracy(model, x, y, cert.lipschitz_l2, (0.05,), 10, pairwise_l2=M)
    part = robust_accuracy(model, x, y, cert.lipschitz_l2, (0.05,), 10, pairwise_l2=M,
                           attack_n=40)  # fmt: skip
    assert part["n_attacked"] == 40 and full["n_attacked"] == len(y)
    row = part["eps"][0]
    assert row["verified_acc"] == full["eps"][0]["verified_acc"]  # still over all inputs
    with torch.no_grad():
        radii = certified_radii(model(x[:40]), y[:40], cert.lipschitz_l2, M)
    assert row["verified_acc_attacked"] == pytest.approx((radii > 0.05).float().mean().item())
    assert row["pgd_acc"] >= row["verified_acc_attacked"]
    with pytest.raises(ValueError, match="n \\(test images\\) must be an integer >= 1"):
        robust_accuracy(model, x, y, cert.lipschitz_l2, (0.05,), 1, attack_n=0)


def test_robust_accuracy_fails_loudly_on_a_wrong_certificate():
    model, x, y = _trained_mlp(0)
    too_small = certify(model).lipschitz_l2 * 1e-3  # pretend the model is far smoother
    with pytest.raises(RuntimeError, match="or the attack is wrong"):
        robust_accuracy(model, x, y, too_small, eps_list=(0.5,), pgd_steps=30)


@pytest.mark.skipif(
    not os.environ.get("LIPSCHITZ_DATA_DIR")
    or not Path(os.environ["LIPSCHITZ_DATA_DIR"], "cifar10/cifar10.npz").exists(),
    reason="needs LIPSCHITZ_DATA_DIR with cifar10/cifar10.npz",
)
def test_cifar_mlp_trains_then_robustness_report(tmp_path, capsys):
    """The training command on CIFAR-10 and `lipschitz robustness` end to end (tiny sizes)."""
    run = tmp_path / "run"
    cli_main(["train", "cifar-mlp", "--out", str(run), "--set", "steps=30", "--set",
              "eval_every=30", "--set", "d_model=32", "--set", "batch_size=64"])  # fmt: skip
    final = json.loads((run / "final.json").read_text())
    assert final["val_acc"] > 0.2  # well above chance after 30 steps
    assert final["lipschitz_bound_l2"] == pytest.approx(
        final["lipschitz_bound"] * math.sqrt(10 / 3072), rel=1e-9
    )
    capsys.readouterr()  # drop the training output
    cli_main(["robustness", str(run), "--n", "100", "--pgd-steps", "10", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["n_examples"] == 100 and (run / "robustness.png").stat().st_size > 0
    for row in result["eps"]:
        assert row["pgd_acc"] >= row["verified_acc"]


@pytest.mark.skipif(
    not os.environ.get("LIPSCHITZ_DATA_DIR")
    or not Path(os.environ["LIPSCHITZ_DATA_DIR"], "cifar10/cifar10.npz").exists(),
    reason="needs LIPSCHITZ_DATA_DIR with cifar10/cifar10.npz",
)
def test_cifar_vit_trains_with_margin_and_augmentation_then_robustness(tmp_path, capsys):
    """cifar-vit at tiny sizes: the margin loss and augmentation train, final.json's verified
    accuracy is the one `lipschitz robustness` recomputes with the pairwise radii on the whole
    test split, and PGD never beats a certificate."""
    run = tmp_path / "run"
    cli_main(["train", "cifar-vit", "--out", str(run), "--set", "steps=30", "--set",
              "eval_every=30", "--set", "d_model=16", "--set", "n_layer=1", "--set",
              "batch_size=64"])  # fmt: skip
    final = json.loads((run / "final.json").read_text())
    assert final["val_acc"] > 0.15 and final["val_verified_acc"] > 0.05
    capsys.readouterr()
    cli_main(["robustness", str(run), "--n", "10000", "--eps", str(36 / 255), "--pgd-steps",
              "0", "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["eps"][0]["verified_acc"] == pytest.approx(final["val_verified_acc"], abs=1e-4)
    cli_main(["robustness", str(run), "--n", "64", "--pgd-steps", "10", "--json"])
    for row in json.loads(capsys.readouterr().out)["eps"]:
        assert row["pgd_acc"] >= row["verified_acc"]


def _images_mlp(seed: int, scale: float) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A 3-layer, 10-class MLP on 8 random 8×8×3 "images" (flattened HWC), labelled by itself."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 8 * 8 * 3, generator=gen)
    torch.manual_seed(seed)
    model = LipschitzMLP(in_features=192, hidden=32, out_features=10, n_layers=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(scale)
        y = model(x).argmax(1)  # clean accuracy 100% by construction
    return model, x, y


def test_autoattack_respects_certificates_and_breaks_a_sensitive_model():
    pytest.importorskip("pyautoattack")
    smooth, x, y = _images_mlp(0, scale=1.0)
    L = certify(smooth).lipschitz_l2
    with torch.no_grad():
        radii = certified_radii(smooth(x), y, L)
    eps = radii.median().item()  # half the inputs are certified at this eps
    report = robust_accuracy(smooth, x, y, L, eps_list=(eps,), pgd_steps=20, image_shape=(8, 8, 3))
    row = report["eps"][0]
    assert row["verified_acc"] == pytest.approx(0.5, abs=1 / 8)
    assert row["autoattack_acc"] >= row["verified_acc"]

    sensitive, x, y = _images_mlp(1, scale=6.0)
    L = certify(sensitive).lipschitz_l2
    report = robust_accuracy(
        sensitive, x, y, L, eps_list=(2.0,), pgd_steps=20, image_shape=(8, 8, 3)
    )
    assert report["eps"][0]["verified_acc"] == 0  # L_l2 ≈ 100: nothing is certified at 2
    assert report["eps"][0]["autoattack_acc"] < 0.5


def _two_class() -> nn.Linear:
    """logits (w·x, −w·x) with w = (0.6, 0.8, 0, 0) (‖w‖ = 1): the margin's gradient in x is
    constant (∓2w), so PGD walks straight along −w for label 0."""
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        w = torch.tensor([0.6, 0.8, 0.0, 0.0])
        model.weight.copy_(torch.stack([w, -w]))
    return model


W_DIR = torch.tensor([0.6, 0.8, 0.0, 0.0])


# ------------------------------------------------------------------------ margins and radii


def test_radii_refuse_a_non_positive_or_nan_bound_by_name():
    logits, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError) as exc:
            certified_radii(logits, labels, bad)
        assert str(exc.value) == f"lipschitz_l2 must be > 0, got {bad!r}"
    # margins 3 − 2 = 1 (label 0) and 1 − 3 = −2 (label 2, misclassified): radii 1/(√2·2), 0
    logits = torch.tensor([[3.0, 2.0, -1.0], [3.0, 0.0, 1.0]])
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(margins(logits, labels), torch.tensor([1.0, -2.0]))
    radii = certified_radii(logits, labels, 2.0)
    torch.testing.assert_close(radii, torch.tensor([1 / (2 * math.sqrt(2)), 0.0]))


# ------------------------------------------------------------------------------------ pgd_l2


def test_pgd_steps_walk_a_straight_line_by_hand():
    """One step of size s along −w from the box centre: x − s·w, exactly; the default step
    size is 2.5·eps/steps; the ball and the pixel box both bind."""
    model = _two_class()
    x = torch.full((1, 4), 0.5)
    y = torch.tensor([0])
    out = pgd_l2(model, x, y, eps=0.3, steps=1, step_size=0.1)
    torch.testing.assert_close(out, x - 0.1 * W_DIR, rtol=0, atol=1e-6)
    small = _two_class()
    with torch.no_grad():
        small.weight.mul_(0.01)  # a gradient of norm 0.02: the step is still normalized
    out = pgd_l2(small, x, y, eps=0.3, steps=1, step_size=0.1)
    torch.testing.assert_close(out, x - 0.1 * W_DIR, rtol=0, atol=1e-6)
    out = pgd_l2(model, x, y, eps=0.3, steps=3, step_size=0.05)  # three steps of 0.05
    torch.testing.assert_close(out, x - 0.15 * W_DIR, rtol=0, atol=1e-6)
    # default step size 2.5·eps/steps = 0.25 with eps = 1, steps = 10: one step of 0.25
    out = pgd_l2(model, x, y, eps=1.0, steps=10, box=None)
    torch.testing.assert_close(out, x - 1.0 * W_DIR, rtol=0, atol=1e-6)  # 10 steps: the ball
    one = pgd_l2(model, x, y, eps=0.4, steps=1, box=None)  # 2.5·0.4 = 1 > eps: projected
    torch.testing.assert_close(one, x - 0.4 * W_DIR, rtol=0, atol=1e-6)
    # default 50 steps of 2.5·eps/50 = 0.01: the ball binds after 20 of them
    default = pgd_l2(model, x, y, eps=0.2, box=None)
    torch.testing.assert_close(default, x - 0.2 * W_DIR, rtol=0, atol=1e-6)
    # the pixel box [0, 1] binds before the ball: 0.5 − 0.8·t ≥ 0 stops coordinate 2 at 0
    boxed = pgd_l2(model, x, y, eps=1.0, steps=10)
    assert float(boxed.min()) == 0.0 and float(boxed.max()) <= 1.0
    assert float(boxed[0, 1]) == 0.0


def test_pgd_default_steps_and_step_size_on_a_curved_loss():
    """A margin whose gradient turns (a quadratic logit), so the path depends on the number and
    size of the steps: the defaults are steps = 50, step size 2.5·eps/steps."""

    class Curved(nn.Module):
        def forward(self, z):
            return torch.stack([(z - 0.3).pow(2).sum(1), z.sum(1) * 0.1], 1)

    model, x, y = Curved(), torch.full((2, 3), 0.5), torch.tensor([0, 0])
    x[1, 0] = 0.9
    default = pgd_l2(model, x, y, eps=0.5)
    torch.testing.assert_close(default, pgd_l2(model, x, y, 0.5, 50, 2.5 * 0.5 / 50))
    assert not torch.equal(default, pgd_l2(model, x, y, 0.5, 51, 2.5 * 0.5 / 51))
    assert not torch.equal(default, pgd_l2(model, x, y, 0.5, 50, 2.6 * 0.5 / 50))


def test_pgd_no_attack_cases_and_a_zero_gradient():
    model = _two_class()
    x, y = torch.full((2, 4), 0.5), torch.tensor([0, 1])
    for out in (pgd_l2(model, x, y, eps=0.0), pgd_l2(model, x, y, eps=0.3, steps=0)):
        assert out is not x and torch.equal(out, x)
    flat = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        flat.weight.zero_()  # zero gradient: the step must not divide by zero
    out = pgd_l2(flat, x, y, eps=0.3, steps=2)
    assert torch.equal(out, x)
    for kwargs, message in (({"eps": -0.1}, "eps must be finite"), ({"steps": -1}, "pgd_steps")):
        with pytest.raises(ValueError, match=message):
            pgd_l2(model, x, y, **{"eps": 0.1, **kwargs})


# -------------------------------------------------------------------------------- check_attack


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (((), 5), "robustness: eps needs at least one radius"),
        (((0.1, -0.5), 5), "robustness: eps must be finite and >= 0, got -0.5"),
        (((math.inf,), 5), "robustness: eps must be finite and >= 0, got inf"),
        (((math.nan,), 5), "robustness: eps must be finite and >= 0, got nan"),
        ((("0.1",), 5), "robustness: eps must be finite and >= 0, got '0.1'"),
        (((0.1,), -1), "robustness: pgd_steps must be an integer >= 0, got -1"),
        (((0.1,), 2.0), "robustness: pgd_steps must be an integer >= 0, got 2.0"),
        (((0.1,), 5, 0), "robustness: n (test images) must be an integer >= 1, got 0"),
        (((0.1,), 5, 2.0), "robustness: n (test images) must be an integer >= 1, got 2.0"),
    ],
)
def test_check_attack_refusals_name_the_argument(args, message):
    with pytest.raises(ValueError) as exc:
        check_attack(*args)
    assert str(exc.value) == message


def test_check_attack_accepts_the_ends_of_its_ranges():
    check_attack((0, 0.0, 1), 0)
    check_attack((0.5,), 0, n=1)
    check_attack((0.5,), 3, n=None)


# ---------------------------------------------------------------------------- robust_accuracy


def _linear_set():
    """Logits ±(w·x − 0.7): the boundary w·x = 0.7 passes through the box centre 0.5·1. Four
    inputs at distances 0.05, 0.1, 0.3, 0.4 from it along w; L_ℓ2 = σ_max([w; −w]) = √2, so
    the certified radius 2·dist/(√2·√2) is the distance itself."""
    model = _two_class()
    model.bias = nn.Parameter(torch.tensor([-0.7, 0.7]))
    dist = torch.tensor([0.05, 0.1, 0.3, 0.4])
    x = 0.5 + dist[:, None] * W_DIR
    return model, x, torch.zeros(4, dtype=torch.long), math.sqrt(2)


def test_robust_accuracy_by_hand_and_default_radii():
    model, x, y, L = _linear_set()
    assert torch.linalg.matrix_norm(model.weight.double(), ord=2).item() == pytest.approx(L)
    model.train()
    result = robust_accuracy(model, x, y, L, pgd_steps=20)
    assert not model.training  # evaluated in eval mode
    assert result["clean_acc"] == 1.0 and result["lipschitz_l2"] == L
    # default ε = 36/255, 72/255, 108/255 = 0.141, 0.282, 0.424: radii 0.05, 0.1, 0.3, 0.4
    assert [r["eps"] for r in result["eps"]] == [36 / 255, 72 / 255, 108 / 255]
    assert [r["verified_acc"] for r in result["eps"]] == [0.5, 0.5, 0.0]
    # PGD pushes straight to the boundary: it flips exactly the inputs closer than ε
    assert [r["pgd_acc"] for r in result["eps"]] == [0.5, 0.5, 0.0]
    assert sorted(result) == ["clean_acc", "eps", "lipschitz_l2", "n_attacked"]
    assert sorted(result["eps"][0]) == ["eps", "pgd_acc", "verified_acc"]


def test_robust_accuracy_checks_the_attack_stays_in_the_ball(monkeypatch):
    model, x, y, L = _linear_set()
    direction = torch.tensor([0.0, 0.0, 1.0, 0.0])  # along the boundary: changes no logit

    def attack_at(radius):
        def fake(model, x, labels, eps, steps):
            return x + radius(eps) * direction

        return fake

    monkeypatch.setattr(rob, "pgd_l2", attack_at(lambda eps: eps * (1 + 5e-5)))
    robust_accuracy(model, x, y, L, eps_list=(0.2,), pgd_steps=1)  # inside the tolerance
    monkeypatch.setattr(rob, "pgd_l2", attack_at(lambda eps: eps * (1 + 1e-4) + 2e-6))
    with pytest.raises(RuntimeError) as exc:
        robust_accuracy(model, x, y, L, eps_list=(0.2,), pgd_steps=1)
    assert str(exc.value) == "pgd at eps=0.2 left the eps-ball"
    monkeypatch.setattr(rob, "pgd_l2", attack_at(lambda eps: 5e-7))
    robust_accuracy(model, x, y, L, eps_list=(0.0,), pgd_steps=1)  # ε = 0: 1e-6 of slack


def test_robust_accuracy_runs_autoattack_when_given_an_image_shape(monkeypatch):
    model, x, y, L = _linear_set()
    seen = []

    def fake_autoattack(model_, x_, labels, eps, image_shape):
        assert model_ is model and x_ is x and torch.equal(labels, y)
        seen.append((eps, image_shape))
        return x_ - 0.15 * W_DIR  # flips the inputs at 0.05 and 0.1 only

    monkeypatch.setattr(rob, "autoattack_l2", fake_autoattack)
    result = robust_accuracy(model, x, y, L, eps_list=(0.2,), pgd_steps=5, image_shape=(2, 1, 2))
    assert seen == [(0.2, (2, 1, 2))]
    (row,) = result["eps"]
    assert row["autoattack_acc"] == 0.5 and row["verified_acc"] == 0.5
    # a certificate claiming L/2 doubles the radii (0.1, 0.2, 0.6, 0.8): at ε = 0.15 the input
    # at distance 0.1 counts as verified, and an attack of size 0.15 flips it
    monkeypatch.setattr(rob, "pgd_l2", lambda model, x, labels, eps, steps: x.clone())
    monkeypatch.setattr(rob, "autoattack_l2", lambda *a: x - 0.15 * W_DIR)
    with pytest.raises(RuntimeError) as exc:
        robust_accuracy(model, x, y, L / 2, eps_list=(0.15,), pgd_steps=5, image_shape=(2, 1, 2))
    assert str(exc.value) == (
        "autoattack at eps=0.15 flipped 1 inputs with a certified radius > eps: the certificate"
        " (L=0.7071) or the attack is wrong"
    )


def test_robust_accuracy_defaults_ties_and_inclusive_ball(monkeypatch):
    model, x, y, L = _linear_set()
    steps = []

    def no_attack(model, x, labels, eps, steps_):
        steps.append(steps_)
        return x.clone()

    monkeypatch.setattr(rob, "pgd_l2", lambda model, x, labels, eps, steps: no_attack(
        model, x, labels, eps, steps))  # fmt: skip
    robust_accuracy(model, x, y, L, eps_list=(0.1,))
    assert steps == [50]  # the default number of PGD steps
    # "radius exceeds ε": an input whose radius is exactly ε is not verified
    radii = certified_radii(model(x).detach(), y, L)
    row = robust_accuracy(model, x, y, L, eps_list=(radii[2].item(),), pgd_steps=1)["eps"][0]
    assert row["verified_acc"] == 0.25  # only the input at 0.4
    with pytest.raises(ValueError, match=r"n \(test images\) must be an integer >= 1, got 0"):
        robust_accuracy(model, x[:0], y[:0], L, eps_list=(0.1,), pgd_steps=1)
    # the ball check includes its tolerance: a perturbation of exactly ε(1 + 1e-4) + 1e-6
    edge = torch.tensor(0.5 * (1 + 1e-4) + 1e-6, dtype=torch.float32)
    shift = torch.zeros(4)
    shift[2] = edge  # along the boundary (w has no third component)
    assert float((shift[None]).norm(dim=1)) == float(edge)
    monkeypatch.setattr(rob, "pgd_l2", lambda model, x, labels, eps, steps: x + shift)
    robust_accuracy(model, torch.zeros(1, 4), y[:1], L, eps_list=(0.5,), pgd_steps=1)


# --------------------------------------------------------------------------------- AutoAttack


def test_autoattack_gets_images_in_channel_first_layout(monkeypatch):
    """x holds (H, W, C)-flattened pixels; AutoAttack sees (B, C, H, W) images and the model
    sees the original flat vectors again (checked element by element)."""
    h, w, c = 2, 3, 2
    x = torch.arange(2 * h * w * c, dtype=torch.float32).view(2, -1) / 100
    labels = torch.tensor([1, 0])
    calls = {}

    class FakeAutoAttack:
        def __init__(self, forward, **kwargs):
            calls["init"] = kwargs
            calls["training"] = forward.training
            self.forward = forward

        def run_standard_evaluation(self, images, labels_, batch_size):
            calls["run"] = (images.clone(), labels_, batch_size)
            calls["model_input"] = self.forward(images)
            return images + 1.0, None

    monkeypatch.setitem(sys.modules, "pyautoattack", SimpleNamespace(AutoAttack=FakeAutoAttack))
    seen_by_model = []
    model = nn.Sequential()
    model.forward = lambda z: seen_by_model.append(z) or z  # the identity, recording its input
    import logging

    monkeypatch.setattr(logging.getLogger("auto-attack"), "level", logging.NOTSET)
    out = autoattack_l2(model, x, labels, 0.5, (h, w, c))
    assert logging.getLogger("auto-attack").level == logging.WARNING  # AutoAttack's chatter off
    assert calls["init"] == {"norm": "L2", "eps": 0.5, "version": "standard", "seed": 0,
                             "device": x.device}  # fmt: skip
    assert calls["training"] is False
    images, passed_labels, batch_size = calls["run"]
    assert images.shape == (2, c, h, w) and images.is_contiguous()
    for b in range(2):
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    assert images[b, k, i, j] == x[b, (i * w + j) * c + k]
    assert torch.equal(passed_labels, labels) and batch_size == 2
    assert torch.equal(seen_by_model[0], x)  # the wrapper flattens back to (H, W, C) order
    torch.testing.assert_close(out, x + 1.0)


def test_autoattack_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails
    with pytest.raises(ImportError) as exc:
        autoattack_l2(nn.Identity(), torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), 0.1,
                      (2, 2, 1))  # fmt: skip
    assert str(exc.value) == (
        'AutoAttack needs the optional pyautoattack package: pip install "lipschitz[autoattack]"'
    )


# -------------------------------------------------------------------------------------- report


def test_report_by_hand_with_a_fake_run(monkeypatch, tmp_path):
    """A one-layer LipschitzMLP (a linear map, so its certificate is exact: σ_max by float64
    SVD) on 1200 fake images; report uses the first n = 1000 by default."""
    import lipschitz.data.images as images
    import lipschitz.training as training

    torch.manual_seed(0)
    model = LipschitzMLP(4, 4, 3, n_layers=1)
    g = torch.Generator().manual_seed(1)
    x_test = torch.rand(1200, 4, generator=g)
    y_test = torch.randint(0, 3, (1200,), generator=g)
    cfg = SimpleNamespace(dataset="fake", model="mlp", data_dir="nowhere")
    runs = []
    monkeypatch.setattr(training, "load_run", lambda run_dir: runs.append(run_dir) or (model, cfg))
    loaded = []
    monkeypatch.setitem(images.LOADERS, "fake", lambda d: loaded.append(d) or SimpleNamespace(
        x_test=x_test, y_test=y_test))  # fmt: skip
    monkeypatch.setitem(images.IMAGE_SHAPES, "fake", (2, 2, 1))
    attacks = []

    def fake_pgd(model, x, labels, eps, steps):
        attacks.append(("pgd", steps))
        return x.clone()

    def fake_autoattack(model, x, labels, eps, image_shape):
        attacks.append(("autoattack", image_shape))
        return x.clone()

    monkeypatch.setattr(rob, "pgd_l2", fake_pgd)
    monkeypatch.setattr(rob, "autoattack_l2", fake_autoattack)
    rob.report(str(tmp_path), eps_list=(0.05,), autoattack=True)
    assert attacks == [("pgd", 50), ("autoattack", (2, 2, 1))]  # default 50 PGD steps
    assert runs == [str(tmp_path)]
    monkeypatch.undo()
    monkeypatch.setattr(training, "load_run", lambda run_dir: (model, cfg))
    monkeypatch.setitem(images.LOADERS, "fake", lambda d: loaded.append(d) or SimpleNamespace(
        x_test=x_test, y_test=y_test))  # fmt: skip
    result = rob.report(str(tmp_path), eps_list=(0.05, 0.1), pgd_steps=2)
    assert loaded == ["nowhere", "nowhere"]
    assert result["n_examples"] == 1000 and result["run"] == str(tmp_path)
    L2 = torch.linalg.matrix_norm(model.layers[0].weight.detach().double(), ord=2).item()
    assert result["lipschitz_l2"] == pytest.approx(L2, rel=1e-9)
    assert result["lipschitz_rms"] == pytest.approx(L2 * math.sqrt(4 / 3), rel=1e-9)
    with torch.no_grad():
        logits = x_test[:1000].double() @ model.layers[0].weight.detach().double().T
    top2 = logits.topk(2, dim=1).values
    true = logits.gather(1, y_test[:1000, None]).squeeze(1)
    other = torch.where(true == top2[:, 0], top2[:, 1], top2[:, 0])
    radii = ((true - other) / (math.sqrt(2) * L2)).clamp_min(0)
    assert result["median_certified_radius"] == pytest.approx(radii.median().item(), abs=1e-6)
    grid = [0.2 * i / 40 for i in range(41)]  # 41 points from 0 to 2·max ε
    assert [c["eps"] for c in result["curve"]] == pytest.approx(grid, abs=1e-7)
    for c in result["curve"]:  # at ε = 0: the inputs with a positive margin
        assert c["verified_acc"] == pytest.approx((radii > c["eps"]).double().mean().item(),
                                                  abs=2e-3)  # fmt: skip
    text = (tmp_path / "robustness.json").read_text()
    assert json.loads(text) == result
    assert text.splitlines()[1].startswith('  "') and text.splitlines()[1][2] == '"'  # indent 2
    assert 0.1 < result["curve"][0]["verified_acc"] < 0.9
    assert (tmp_path / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg.dataset = "text"
    with pytest.raises(ValueError) as exc:
        rob.report(str(tmp_path), eps_list=(0.05,), pgd_steps=1)
    assert str(exc.value) == f"robustness needs an image classifier; {tmp_path} trained mlp"
    with pytest.raises(ValueError, match="n \\(test images\\)"):
        rob.report(str(tmp_path), n=0)


def test_plot_shows_the_curve_and_the_attacks(monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    subplots = plt.subplots

    def recording(*args, **kwargs):
        made.append(subplots(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(plt, "subplots", recording)
    result = {
        "lipschitz_l2": 1.23456,
        "curve": [{"eps": 0.0, "verified_acc": 0.9}, {"eps": 0.5, "verified_acc": 0.4}],
        "eps": [{"eps": 0.1, "pgd_acc": 0.8, "autoattack_acc": 0.7},
                {"eps": 0.3, "pgd_acc": 0.6, "autoattack_acc": 0.5}],
    }  # fmt: skip
    path = tmp_path / "r.png"
    rob._plot(result, path)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 600 and int.from_bytes(png[20:24], "big") == 400
    ((fig, ax),) = made
    assert not plt.fignum_exists(fig.number)  # closed
    lines = ax.get_lines()
    got = [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata()), ln.get_marker(),
            ln.get_linestyle()) for ln in lines]  # fmt: skip
    assert got == [
        ("verified", [0.0, 0.5], [0.9, 0.4], "None", "-"),
        ("PGD-ℓ2", [0.1, 0.3], [0.8, 0.6], "o", "-"),
        ("AutoAttack-ℓ2", [0.1, 0.3], [0.7, 0.5], "s", "--"),
    ]
    assert ax.get_xlabel() == "ε (ℓ2, pixels in [0, 1])" and ax.get_ylabel() == "accuracy"
    assert ax.get_title() == "L_ℓ2 = 1.23"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "verified", "PGD-ℓ2", "AutoAttack-ℓ2"]  # fmt: skip
    for row in result["eps"]:
        del row["autoattack_acc"]
    rob._plot(result, path)
    assert [ln.get_label() for ln in made[-1][1].get_lines()] == ["verified", "PGD-ℓ2"]
