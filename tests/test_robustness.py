"""Certified radii against a real attack: PGD never beats a certificate, and it does work."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lipschitz.certify import certify
from lipschitz.cli import main as cli_main
from lipschitz.nn import BaselineMLP, LipschitzMLP
from lipschitz.robustness import certified_radii, margins, pgd_l2, robust_accuracy


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
