"""Robustness of a classifier: certified ℓ2 radii from a Lipschitz bound, and a PGD-ℓ2 attack.

If the logit map is L-Lipschitz from ℓ2 to ℓ2, an input whose true-class logit beats every
other logit by a margin m keeps its label within the ℓ2 ball of radius m / (√2·L) (a
perturbation δ moves the difference of two logits by at most √2·L·‖δ‖). Verified robust
accuracy at ε counts correctly classified inputs whose radius exceeds ε. An attack can only
find adversarial examples outside those radii, so empirical robust accuracy under any attack
is never below verified robust accuracy: :func:`robust_accuracy` checks that and fails loudly if
not.

AutoAttack (Croce & Hein, the standard ℓ2 ensemble: APGD-CE, APGD-T, FAB-T, Square) runs too
when the optional ``pyautoattack`` package is installed (``pip install "lipschitz[autoattack]"``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from lipschitz.certify import certified_radii, margins
from lipschitz.fileio import atomic_write, atomic_write_text

__all__ = ["autoattack_l2", "certified_radii", "margins", "pgd_l2", "report", "robust_accuracy"]


def pgd_l2(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    eps: float,
    steps: int = 50,
    step_size: float | None = None,
    box: tuple[float, float] | None = (0.0, 1.0),
) -> Tensor:
    """Projected gradient ascent on the margin loss inside the ℓ2 ball of radius ``eps`` (and
    the pixel box): returns adversarial inputs of x's shape. Steps are normalized gradients of
    size ``step_size`` (default 2.5·eps/steps); ``steps=0`` or ``eps=0`` is no attack."""
    check_attack(eps_list=(eps,), pgd_steps=steps)
    if eps == 0 or steps == 0:
        return x.clone()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        loss = -margins(model(x + delta), labels).sum()  # raise the best wrong logit
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g = grad.flatten(1)  # (B, n)
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            d = delta.flatten(1) + step_size * g
            d = d * (eps / d.norm(dim=1, keepdim=True).clamp_min(eps)).clamp_max(1.0)
            d = d.view_as(x)
            if box is not None:
                d = (x + d).clamp(*box) - x
            delta.copy_(d)
    return (x + delta).detach()


class _FlatImages(nn.Module):
    """Feeds AutoAttack's (B, C, H, W) images to a model of flattened (B, H·W·C) pixels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images.permute(0, 2, 3, 1).flatten(1))


def autoattack_l2(
    model: nn.Module, x: Tensor, labels: Tensor, eps: float, image_shape: tuple[int, int, int]
) -> Tensor:
    """AutoAttack's standard ℓ2 evaluation: adversarial inputs of x's (flattened) shape.
    ``image_shape`` is (H, W, C), the layout the pixels were flattened from."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:
        raise ImportError(
            "AutoAttack needs the optional pyautoattack package: "
            'pip install "lipschitz[autoattack]"'
        ) from err
    import logging

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    h, w, c = image_shape
    images = x.view(len(x), h, w, c).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
    attack = AutoAttack(_FlatImages(model).eval(), norm="L2", eps=eps, version="standard",
                        seed=0, device=x.device)  # fmt: skip
    x_adv, _ = attack.run_standard_evaluation(images, labels, batch_size=len(x))
    return x_adv.permute(0, 2, 3, 1).reshape(x.shape)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    return model(x).argmax(dim=1) == labels


def check_attack(eps_list: tuple[float, ...], pgd_steps: int, n: int | None = None) -> None:
    """Refuse attack settings that would give NaNs or nothing, naming the argument: ε must be
    finite and ≥ 0 (at least one), pgd_steps an integer ≥ 0, n (examples) an integer ≥ 1."""
    if len(eps_list) == 0:
        raise ValueError("robustness: eps needs at least one radius")
    for eps in eps_list:
        if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"robustness: eps must be finite and >= 0, got {eps!r}")
    if not isinstance(pgd_steps, int) or pgd_steps < 0:
        raise ValueError(f"robustness: pgd_steps must be an integer >= 0, got {pgd_steps!r}")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"robustness: n (test images) must be an integer >= 1, got {n!r}")


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    lipschitz_l2: float,
    eps_list: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255),
    pgd_steps: int = 50,
    image_shape: tuple[int, int, int] | None = None,
    pairwise_l2: Tensor | None = None,
    attack_n: int | None = None,
) -> dict:
    """Clean accuracy, and verified and PGD robust accuracy at each ε (and AutoAttack's, when
    ``image_shape`` (H, W, C) is given); raises RuntimeError if an attack ever beats a
    certificate (a wrong certificate or a wrong attack). ``pairwise_l2``: see
    :func:`certified_radii`. ``attack_n``: attack only the first ``attack_n`` inputs (attacks
    cost ``pgd_steps`` forward and backward passes each); their accuracies are then over those,
    next to ``verified_acc_attacked``, the verified accuracy of the same inputs."""
    check_attack(eps_list, pgd_steps, n=len(labels))
    if attack_n is not None:
        check_attack(eps_list, pgd_steps, n=attack_n)
    k = len(labels) if attack_n is None else min(attack_n, len(labels))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    radii = certified_radii(logits, labels, lipschitz_l2, pairwise_l2)
    clean = _accuracy(model, x, labels)
    result = {"clean_acc": clean.float().mean().item(), "lipschitz_l2": lipschitz_l2,
              "n_attacked": k, "eps": []}  # fmt: skip
    xa, ya = (x, labels) if k == len(labels) else (x[:k], labels[:k])
    for eps in eps_list:
        verified = clean & (radii > eps)
        row = {"eps": eps, "verified_acc": verified.float().mean().item()}
        if k < len(labels):
            row["verified_acc_attacked"] = verified[:k].float().mean().item()
        verified = verified[:k]
        for name in ["pgd"] if image_shape is None else ["pgd", "autoattack"]:
            if name == "pgd":
                x_adv = pgd_l2(model, xa, ya, eps, steps=pgd_steps)
            else:
                x_adv = autoattack_l2(model, xa, ya, eps, image_shape)
            if not ((x_adv - xa).flatten(1).norm(dim=1) <= eps * (1 + 1e-4) + 1e-6).all():
                raise RuntimeError(f"{name} at eps={eps:.4g} left the eps-ball")
            robust = _accuracy(model, x_adv, ya) & clean[:k]
            broken = verified & ~robust
            if broken.any():
                raise RuntimeError(
                    f"{name} at eps={eps:.4g} flipped {int(broken.sum())} inputs with a certified"
                    f" radius > eps: the certificate (L={lipschitz_l2:.4g}) or the attack is wrong"
                )
            row[f"{name}_acc"] = robust.float().mean().item()
        result["eps"].append(row)
    return result


def report(
    run_dir: str,
    data_dir: str | None = None,
    n: int = 1000,
    eps_list: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255),
    pgd_steps: int = 50,
    autoattack: bool = False,
    attack_n: int | None = None,
) -> dict:
    """Robustness of a trained image classifier (a run directory): clean accuracy, certified
    radii, verified and PGD-ℓ2 (and AutoAttack) robust accuracy at each ε on the first ``n``
    test images, and a verified-accuracy curve over ε. Writes ``robustness.json`` and
    ``robustness.png``, each atomically; bad arguments are refused before anything is read."""
    from lipschitz.certify import certify
    from lipschitz.data.images import IMAGE_SHAPES, LOADERS
    from lipschitz.training import load_run

    check_attack(eps_list, pgd_steps, n)
    model, cfg = load_run(run_dir)
    if cfg.dataset not in LOADERS:
        raise ValueError(f"robustness needs an image classifier; {run_dir} trained {cfg.model}")
    data = LOADERS[cfg.dataset](data_dir or cfg.data_dir)
    x, y = data.x_test[:n], data.y_test[:n]
    cert = certify(model)
    pairwise = None if cert.pairwise_l2 is None else torch.tensor(cert.pairwise_l2)
    image_shape = IMAGE_SHAPES[cfg.dataset] if autoattack else None
    result = robust_accuracy(
        model, x, y, cert.lipschitz_l2, eps_list, pgd_steps, image_shape, pairwise, attack_n
    )
    with torch.no_grad():
        radii = certified_radii(model(x), y, cert.lipschitz_l2, pairwise)
    grid = torch.linspace(0, 2 * max(eps_list), 41)
    result.update(
        run=str(run_dir),
        n_examples=len(y),
        lipschitz_rms=cert.lipschitz,
        median_certified_radius=radii.median().item(),
        curve=[
            {"eps": e, "verified_acc": (radii > e).float().mean().item()} for e in grid.tolist()
        ],
    )
    out = Path(run_dir)
    _plot(result, out / "robustness.png")
    atomic_write_text(out / "robustness.json", json.dumps(result, indent=2))
    return result


def _plot(result: dict, path: Path) -> None:
    """The verified-accuracy curve over ε and the attacks' accuracies, as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = result["curve"]
    ax.plot([c["eps"] for c in curve], [c["verified_acc"] for c in curve], label="verified")
    rows = result["eps"]
    subset = "" if "verified_acc_attacked" not in rows[0] else f" (first {result['n_attacked']})"
    ax.plot([r["eps"] for r in rows], [r["pgd_acc"] for r in rows], "o-", label="PGD-ℓ2" + subset)
    if "autoattack_acc" in rows[0]:
        ax.plot([r["eps"] for r in rows], [r["autoattack_acc"] for r in rows], "s--",
                label="AutoAttack-ℓ2")  # fmt: skip
    ax.set(xlabel="ε (ℓ2, pixels in [0, 1])", ylabel="accuracy",
           title=f"L_ℓ2 = {result['lipschitz_l2']:.3g}")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
