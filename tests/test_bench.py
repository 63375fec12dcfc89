"""The benchmarks run and report what they claim (timings themselves are not asserted)."""

import pytest

from lipschitz.benchmarks import profile as bench_profile
from lipschitz.benchmarks import projections as bench_projections
from lipschitz.benchmarks import throughput as bench_throughput
from lipschitz.constraints import METHODS


def test_projection_benchmark_reports_every_method():
    results = bench_projections.run(shapes=[(24, 16)], min_rounds=1, max_rounds=1, budget_s=0)
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) >= {"svd_cap", "spectral_soft_cap", "spectral_hard_cap", "stiefel"}
    assert rows["svd_cap"]["cost_vs_svd_cap"] == 1.0
    assert abs(rows["svd_cap"]["sigma_after_over_w_max"] - 1) < 1e-5
    assert abs(rows["spectral_soft_cap"]["sigma_after_from_1.05_over_w_max"] - 1) < 1e-3
    assert "| `spectral_hard_cap` |" in bench_projections.markdown(results)
    # every matrix constraint of the registry, with the registry's guarantee
    for name, c in METHODS.items():
        if name != "none" and not c.per_row:
            assert rows[name]["guarantee"] == c.guarantee


def test_throughput_benchmark_compares_the_four_setups():
    result = bench_throughput.run("tiny", rounds=1)
    assert set(result["step_ms"]) == {
        "lipschitz",
        "lipschitz-unconstrained",
        "lipschitz-adamw",
        "baseline",
    }
    assert result["tokens_per_s"]["baseline"] > 0
    assert "Projection share" in bench_throughput.markdown(result)


def test_peak_memory_counts_weights_gradients_and_optimizer_state():
    """A fresh process's peak RSS grows by at least the weights, their gradients and Muon's
    momentum (3 × 4 bytes per parameter) once the model has trained a step."""
    memory = bench_throughput._memory_in_fresh_processes("tiny", ["d_model=256"], ["lipschitz"])
    m = memory["lipschitz"]
    n_params = 2 * 12 * 256 * 256  # 2 blocks of 12·d² weights (the embedding and head are small)
    assert m["peak_rss"] - m["rss_before_model"] >= 3 * 4 * n_params


def test_profile_splits_the_step_into_its_phases():
    result = bench_profile.run("tiny", rounds=2)
    lip, base = result["ms_per_step"]["lipschitz"], result["ms_per_step"]["baseline"]
    assert lip["msign"] > 0 and lip["projection"] > 0  # Muon + soft cap
    assert base["msign"] == 0  # AdamW
    assert base["projection"] < 0.05 * base["step"]  # constraint "none": the hook only returns
    assert lip["msign"] + lip["projection"] <= lip["optimizer"]  # nested inside the step
    parts = lip["batch"] + lip["forward"] + lip["backward"] + lip["optimizer"]
    assert lip["step"] == parts and lip["forward"] > 0 and lip["backward"] > 0
    assert "Newton–Schulz (msign)" in bench_profile.markdown(result)


def test_vit_step_benchmark_and_its_reference_compute_the_same_model():
    """The as-written SLL forward (the benchmark's reference) and the fused one give the same
    logits, so the ratio compares two ways of computing one map."""
    import torch

    from lipschitz.benchmarks import vit_step
    from lipschitz.config import apply_overrides
    from lipschitz.nn import build_model
    from lipschitz.presets import preset

    small = ["d_model=16", "n_layer=1", "batch_size=8"]
    cfg = apply_overrides(preset("cifar-vit"), small)
    fused = build_model(cfg, 10, 3072)
    written = build_model(cfg, 10, 3072)
    written.load_state_dict(fused.state_dict())
    vit_step._as_written(written)
    with torch.no_grad():
        for p in fused.parameters():
            if p.dim() == 1:  # biases and q: nonzero, so every term of the formula counts
                p.add_(torch.randn_like(p))
        fused.head.weight.normal_()  # zero at init: the logits would agree trivially
        written.load_state_dict(fused.state_dict())
    x = torch.rand(4, 3072)
    assert torch.allclose(written(x), fused(x), atol=1e-5)
    result = vit_step.run("cifar-vit", small, rounds=1, vs=["n_head=2,mlp_ratio=1"])
    assert set(result["ms_per_step"]) == {
        "bf16",
        "bf16-svd",
        "float32",
        "float32-as-written",
        "bf16 n_head=2,mlp_ratio=1",
    }
    assert "float32 ÷ bf16" in vit_step.markdown(result)
    assert "bf16 n_head=2,mlp_ratio=1 ÷ bf16" in vit_step.markdown(result)
    with pytest.raises(ValueError, match="--vs must keep batch_size"):
        vit_step.run("cifar-vit", small, rounds=1, vs=["batch_size=4"])
