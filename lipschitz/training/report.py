"""What a run shows while it trains (a progress bar or log lines) and after (curves.png)."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from lipschitz.fileio import atomic_write


class Progress:
    """A tqdm bar on a terminal; plain log lines every ``every`` steps otherwise; silent when
    not ``enabled`` (ranks other than 0)."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool = True) -> None:
        self.total, self.every, self.start = total, every, time.time()
        self.initial, self.enabled = initial, enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, info: dict) -> None:
        if not self.enabled:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown, refresh=False)
        elif step % self.every == 0 or step == self.total:
            done = step - self.initial
            eta = (time.time() - self.start) / max(done, 1) * (self.total - step)
            items = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"step {step}/{self.total} {items} eta={eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_curves(rows: list[dict], path: str | Path) -> Path:
    """Losses, validation accuracy and certified bound against steps, from metrics rows;
    written atomically to ``path`` (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rows if "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train")
    axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0].legend()
    axes[1].plot([r["step"] for r in evals], [r["val_acc"] for r in evals], "o-")
    axes[1].set(xlabel="step", ylabel="accuracy", title="validation accuracy")
    bounded = [r for r in evals if r.get("lipschitz_bound") is not None]
    if bounded:
        axes[2].semilogy([r["step"] for r in bounded], [r["lipschitz_bound"] for r in bounded])
    axes[2].set(xlabel="step", ylabel="bound", title="certified Lipschitz bound")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path = Path(path)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
    return path
