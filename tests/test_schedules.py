"""Tests for lipschitz.schedules."""

from __future__ import annotations

import pytest
import torch

from lipschitz.schedules import constant, constant_cooldown, cosine, linear, schedule


def test_linear_is_the_papers_schedule():
    # JAX `linear`: lr·(T − t)/T.
    for t in (0, 1, 50, 99):
        assert linear(t, 100) == pytest.approx((100 - t) / 100)
    assert linear(100, 100) == linear(500, 100) == 0.0
    assert linear(100, 100, floor=0.1) == pytest.approx(0.1)


def test_cosine():
    assert cosine(0, 100) == 1.0
    assert cosine(50, 100) == pytest.approx(0.5)
    assert cosine(100, 100, floor=0.1) == pytest.approx(0.1)


def test_constant_cooldown_matches_nanogpt():
    # NanoGPT script: 1 for 60% of steps, then linear to 0.1 over the final 40%.
    def nanogpt(step, total=1000, cooldown_frac=0.4):
        x = step / total
        if x < 1 - cooldown_frac:
            return 1.0
        w = (1 - x) / cooldown_frac
        return w * 1.0 + (1 - w) * 0.1

    for step in (0, 300, 599, 600, 601, 800, 999, 1000):
        assert constant_cooldown(step, 1000, floor=0.1) == pytest.approx(nanogpt(step))


def test_warmup():
    # by hand: warm-up (t + 1)/(4 + 1) for t < 4, then progress (t − 4)/(T − 4)
    assert [constant(t, 100, warmup_steps=4) for t in range(6)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    )
    assert linear(4, 104, warmup_steps=4) == 1.0
    assert linear(54, 104, warmup_steps=4) == pytest.approx(0.5)
    assert cosine(2, 100, warmup_steps=4) == pytest.approx(0.6)


def test_with_lambda_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule("linear", total_steps=10))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * (10 - t) / 10 for t in range(10)])
    sched.load_state_dict(sched.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule("triangle", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        schedule("linear", total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        schedule("cosine", total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="cooldown_frac"):
        schedule("constant_cooldown", total_steps=10, cooldown_frac=0.0)
