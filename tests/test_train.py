"""End to end: the training command trains `tiny`, survives an interruption, certifies, samples."""

import json
import os
from pathlib import Path

import pytest
import torch

import lipschitz.data.tasks as tasks
import lipschitz.training.loop as loop
from lipschitz.choices import check_choices
from lipschitz.cli import main as cli_main
from lipschitz.config import Config, apply_overrides
from lipschitz.linalg import rms_operator_norm
from lipschitz.nn import build_model
from lipschitz.optim import build_optimizers
from lipschitz.presets import PRESETS, preset
from lipschitz.training import RunDir, load_run, train

DATA_DIR = os.environ.get("LIPSCHITZ_DATA_DIR")
needs_data = pytest.mark.skipif(
    not DATA_DIR or not Path(DATA_DIR, "tinyshakespeare/input.txt").exists(),
    reason="needs LIPSCHITZ_DATA_DIR with tinyshakespeare/input.txt",
)


def _weights(run_dir: Path) -> dict:
    return RunDir(run_dir).load_checkpoint()["model"]


@needs_data
def test_tiny_interrupt_resume_certify_sample(tmp_path, train_interrupted, capsys):
    cfg = preset("tiny")
    full = tmp_path / "full"
    final = train(cfg, full)
    assert final["steps"] == cfg.steps
    for key in ("val_loss", "val_acc", "lipschitz_bound", "steps", "tokens_seen", "wall_time_s"):
        assert key in json.loads((full / "final.json").read_text())
    assert (full / "curves.png").stat().st_size > 0

    # Interrupt a second run during step 13 (after the checkpoint at step 10), then resume.
    broken = tmp_path / "broken"
    train_interrupted(cfg, broken, tasks.CharTask, at=13)
    assert RunDir(broken).load_checkpoint()["step"] == 10
    metrics_before = (broken / "metrics.jsonl").read_text().splitlines()
    assert metrics_before, "an interrupted run keeps its metrics"
    with pytest.raises(FileExistsError):
        train(cfg, broken)  # never overwrite a run by accident
    resumed = train(cfg, broken, resume=True)

    a, b = _weights(full), _weights(broken)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["val_loss"] == final["val_loss"]
    assert resumed["work_per_rank"] == final["work_per_rank"]  # the whole run's, not the resume's
    assert resumed["work_from_step"] == final["work_from_step"] == 0
    # the resumed run's metrics are those of the uninterrupted run, line for line
    assert (broken / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()

    # certify --json reads the checkpoint back; its bound is the one training reported
    capsys.readouterr()
    cli_main(["certify", str(full), "--json"])
    cert = json.loads(capsys.readouterr().out)
    assert cert["lipschitz_bound"] == pytest.approx(final["lipschitz_bound"], rel=1e-12)
    names = {layer["name"] for layer in cert["layers"]}
    assert names >= {"embed.weight", "head.weight", "blocks.0.attn.q.weight"}
    cli_main(["certify", str(full), "--json", "--rule", "paper"])
    paper = json.loads(capsys.readouterr().out)["paper_formula_not_a_bound"]
    assert paper == pytest.approx(final["lipschitz_bound_paper_rule"], rel=1e-12)
    for layer in cert["layers"]:
        if layer["name"] != "embed.weight":  # the embedding is capped per row, not as a matrix
            assert layer["rms_operator_norm"] <= cfg.w_max * 1.001, layer["name"]

    cli_main(["sample", str(full), "--prompt", "ROMEO:", "--tokens", "30"])
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= 30


@needs_data
def test_nan_loss_names_the_step(tmp_path, monkeypatch):
    real_build = loop.build_model

    def poisoned(*args):
        model = real_build(*args)
        calls = {"n": 0}

        def hook(module, args, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] >= 4 else output

        model.head.register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    with pytest.raises(FloatingPointError, match="at step 4"):
        train(preset("tiny"), tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@needs_data
def test_initial_weights_start_inside_a_small_ball(tmp_path):
    """The soft cap only absorbs steps, so training must start inside w_max < 1 (init is 1)."""
    cfg = apply_overrides(preset("tiny"), ["w_max=0.5", "steps=3", "eval_every=3"])
    train(cfg, tmp_path / "run")
    model, _ = load_run(tmp_path / "run")
    for name, p in model.named_parameters():
        if name.startswith("blocks.") or name == "head.weight":
            assert rms_operator_norm(p).item() <= 0.5 * (1 + 1e-3), name


def test_set_overrides_are_typed_and_checked():
    cfg = apply_overrides(Config(), ["lr=0.5", "steps=7", "nesterov=true", "head_w_max=none"])
    assert (cfg.lr, cfg.steps, cfg.nesterov, cfg.head_w_max) == (0.5, 7, True, None)
    cfg = apply_overrides(cfg, ["head_w_max=2", "adam_betas=0.8,0.99"])
    assert cfg.head_w_max == 2.0 and cfg.adam_betas == (0.8, 0.99)
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(Config(), ["learning_rate=1"])
    with pytest.raises(ValueError, match="steps=ten: expected a value of type int"):
        apply_overrides(Config(), ["steps=ten"])
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(Config(), ["steps"])
    with pytest.raises(ValueError, match="eval_every must be > 0"):
        apply_overrides(Config(), ["eval_every=0"])
    with pytest.raises(ValueError, match="constraint must be one of"):
        check_choices(apply_overrides(Config(), ["constraint=spectral_cap"]))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")
    assert set(PRESETS) >= {"shakespeare", "shakespeare-baseline", "shakespeare-cpu", "tiny"}


def test_every_preset_passes_the_choice_checks_and_mismatches_are_named():
    for name in PRESETS:
        check_choices(preset(name))
    with pytest.raises(ValueError, match="model 'lipschitz_vit' cannot train on dataset 'shake"):
        check_choices(Config(model="lipschitz_vit"))
    with pytest.raises(ValueError, match="model 'baseline_gpt' cannot train on dataset 'mnist'"):
        check_choices(Config(model="baseline_gpt", dataset="mnist"))
    with pytest.raises(ValueError, match="model must be one of"):
        check_choices(Config(model="lipschitz"))


def test_a_bad_choice_is_refused_before_the_run_directory_exists(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        train(apply_overrides(preset("tiny"), ["dataset=cifar"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_set_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "tiny", "--out", str(tmp_path / "x"), "--set", "bogus=1"])
    assert exit_info.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_eval_windows_cover_the_split_once():
    starts = tasks.eval_windows(1000, 64, "full", 8)
    assert starts[0] == 0 and (starts[1:] - starts[:-1] == 64).all()
    assert starts[-1] + 64 + 1 <= 1000 < starts[-1] + 2 * 64 + 1  # last full window is used
    paper = tasks.eval_windows(100_000, 64, "paper", 8)
    assert len(paper) == 160 and (paper == torch.arange(160)).all()


def test_token_task_windows(token_shards):
    cfg = apply_overrides(preset("tiny"), ["dataset=tokens", f"token_dir={token_shards}"])
    task = tasks.TokenTask(cfg)  # val shard: 820 tokens, seq_len 32
    assert task.n_outputs == 50257 and task.n_train_starts == (3000 - 32) + (2000 - 32)
    assert list(task.val_starts) == list(range(0, 820 - 32, 32))  # every position once
    x, y = task.batch(5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 32) and torch.equal(x[:, 1:], y[:, :-1])
    few = tasks.TokenTask(apply_overrides(cfg, ["val_tokens=128"]))
    # 128 // 32 = 4 windows spread over the 25: window i·25 // 4 = 0, 6, 12, 18, times 32
    assert list(few.val_starts) == [0, 192, 384, 576]
    with pytest.raises(FileNotFoundError, match="lipschitz prepare"):
        tasks.TokenTask(apply_overrides(cfg, ["token_dir=no/such/folder"]))
    with pytest.raises(ValueError, match="needs token_dir"):
        check_choices(apply_overrides(preset("tiny"), ["dataset=tokens"]))


def test_token_run_with_adamw_embedding(tmp_path, token_shards, capsys):
    cfg = apply_overrides(
        preset("tiny"),
        ["dataset=tokens", f"token_dir={token_shards}", "steps=4", "eval_every=4",
         "embed_optimizer=adamw", "embed_lr=0.05", "head_lr=0.01", "val_tokens=256"],
    )  # fmt: skip
    final = train(cfg, tmp_path / "run")
    n_matrices = 2 * 6 + 1  # q, k, v, o, fc_in, fc_out per layer, and the head
    assert final["work_per_rank"] == [{"msign": 4 * n_matrices, "projections": 4 * n_matrices}]
    model, loaded = load_run(tmp_path / "run")
    assert loaded.dataset == "tokens" and model.head.weight.shape == (50257, cfg.d_model)
    assert model.embed.weight.norm(dim=1).max() <= cfg.d_model**0.5 * (1 + 1e-5)  # rows RMS ≤ 1
    capsys.readouterr()
    cli_main(["certify", str(tmp_path / "run"), "--json"])
    cert = json.loads(capsys.readouterr().out)
    assert cert["lipschitz_bound"] == pytest.approx(final["lipschitz_bound"], rel=1e-12)


@needs_data
def test_paper_variant_run_reports_both_protocols_and_trains_the_position_bias(tmp_path):
    cfg = apply_overrides(preset("tiny"), [
        "eval_protocol=paper", "residual=sum", "attn_out_mult=1", "pos_bias=true",
        "train_temperature=3", "vector_lr=0.05", "blocks_mass=32", "sample_tokens=0",
    ])  # fmt: skip
    final = train(cfg, tmp_path / "run")
    assert final["eval_protocol"] == "paper"
    assert 0 < final["val_acc_full"] < 1 and final["val_loss_full"] > 0
    # trained on softmax(3·logits): that loss is reported next to the plain one
    assert final["val_loss_at_train_temperature"] > 0
    assert final["val_loss_at_train_temperature"] != final["val_loss"]
    # the sum model's certified bound is far above what the paper's formula reports for it
    assert final["lipschitz_bound"] > final["lipschitz_bound_paper_rule"] > 0
    model, _ = load_run(tmp_path / "run")
    init = build_model(cfg, model.head.out_features)
    trained, start = model.blocks[0].attn.pos_bias.bias, init.blocks[0].attn.pos_bias.bias
    assert not torch.allclose(trained, start)  # AdamW trained it at vector_lr


def test_optimizer_keys_reach_the_param_groups():
    cfg = apply_overrides(
        preset("gpt-small-cpu"), ["d_model=32", "n_layer=1", "n_head=1", "seq_len=16"]
    )
    muon, adamw = build_optimizers(cfg, build_model(cfg, 100))
    lrs = {g["role"]: g["lr"] for g in muon.param_groups}
    assert lrs == {"hidden": cfg.lr, "head": cfg.head_lr}
    assert all(g["nesterov"] and g["momentum_warmup_steps"] == 20 for g in muon.param_groups)
    (embed,) = adamw.param_groups
    assert embed["role"] == "embedding" and embed["lr"] == cfg.embed_lr
    assert embed["constraint"] == "row_rms_cap" and embed["betas"] == (0.8, 0.95)
    big = preset("gpt-145m")
    assert (big.d_model, big.n_layer, big.n_head, big.seq_len, big.batch_size) == (
        768, 12, 6, 1024, 384)  # fmt: skip
    assert big.ns_dtype == "bfloat16" and big.compile and big.token_dir == "fineweb10B"


def test_the_logged_learning_rate_is_the_hidden_matrices_not_the_embeddings(tmp_path):
    """metrics.jsonl's lr is the scheduled lr of the hidden matrices (it was the first param
    group's, the embedding's under Muon: 0.123 here)."""
    cfg = apply_overrides(preset("recall-cpu"), [
        "steps=3", "eval_every=3", "checkpoint_every=3", "log_every=1", "schedule=constant",
        "embed_lr=0.123", "sample_tokens=0", "d_model=32", "val_tokens=256"])  # fmt: skip
    train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["lr"] for r in rows if "lr" in r] == [cfg.lr] * 3


def test_cpu_bf16_trains_in_bfloat16_and_evaluates_in_float32(tmp_path, monkeypatch):
    """cpu_bf16: the training forward runs under bfloat16 autocast on the CPU (its logits are
    bf16), the evaluation does not (float32 logits), and the weights stay float32."""
    seen = []
    real_forward = loop.Trainer.train_step

    def spy(self):
        hook = self.model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        try:
            return real_forward(self)
        finally:
            hook.remove()

    monkeypatch.setattr(loop.Trainer, "train_step", spy)
    cfg = apply_overrides(preset("tiny"), ["steps=2", "eval_every=2", "cpu_bf16=true"])
    real_eval = loop.evaluate

    def eval_spy(model, *args, **kwargs):
        hook = model.register_forward_hook(lambda m, i, out: seen.append(("eval", out.dtype)))
        try:
            return real_eval(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(loop, "evaluate", eval_spy)
    train(cfg, tmp_path / "run")
    assert seen[:2] == [torch.bfloat16, torch.bfloat16]
    assert ("eval", torch.float32) in seen and ("eval", torch.bfloat16) not in seen
    assert all(w.dtype == torch.float32 for w in _weights(tmp_path / "run").values()
               if w.is_floating_point())  # fmt: skip
