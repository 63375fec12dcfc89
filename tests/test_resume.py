"""Resume for an image task: an interrupted MLP run resumes to the weights, metrics and bound of
the uninterrupted run, bit for bit (the token-task and AdamW cases are in test_wiring.py, the
character task in test_train.py)."""

import os
from pathlib import Path

import pytest
import torch
from runlog import untimed_metrics

import lipschitz.data.tasks as tasks
from lipschitz.config import Config
from lipschitz.training import RunDir, train

DATA_DIR = os.environ.get("LIPSCHITZ_DATA_DIR")


@pytest.mark.skipif(
    not DATA_DIR or not Path(DATA_DIR, "mnist/train-images-idx3-ubyte.gz").exists(),
    reason="needs LIPSCHITZ_DATA_DIR with mnist/",
)
@pytest.mark.parametrize("optimizer", ["muon", "adamw", "vit-margin-augment"])
def test_image_run_resumes_bit_identically(tmp_path, train_interrupted, optimizer):
    """vit-margin-augment: the ViT (SLL blocks, biases) with the certified-margin loss (its
    constants recomputed every 10 steps and at every checkpoint step) and random crops and
    flips."""
    model = dict(model="lipschitz_mlp", d_model=32, n_layer=3)
    if optimizer == "vit-margin-augment":
        model = dict(model="lipschitz_vit", d_model=16, n_layer=1, n_head=2, margin_eps=0.5,
                     augment=True, block="sll", bias=True)  # fmt: skip
    cfg = Config(dataset="mnist", data_dir=DATA_DIR, batch_size=32, steps=6, eval_every=3,
                 checkpoint_every=3,
                 log_every=1, optimizer=optimizer.replace("vit-margin-augment", "muon"),
                 constraint="spectral_hard_cap", w_max=2.0,
                 lr=3e-3 if optimizer == "adamw" else 0.05, sample_tokens=0, **model)  # fmt: skip
    final = train(cfg, tmp_path / "full")

    train_interrupted(cfg, tmp_path / "broken", tasks.ImageTask, at=5)  # after checkpoint 3
    assert RunDir(tmp_path / "broken").load_checkpoint()["step"] == 3
    resumed = train(cfg, tmp_path / "broken", resume=True)

    a = RunDir(tmp_path / "full").load_checkpoint()["model"]
    b = RunDir(tmp_path / "broken").load_checkpoint()["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["val_acc"] == final["val_acc"]
    assert resumed["lipschitz_bound"] == final["lipschitz_bound"]
    full = untimed_metrics(tmp_path / "full")
    assert len(full) == 6
    # every line but its wall-clock fields is the uninterrupted run's
    assert untimed_metrics(tmp_path / "broken") == full
