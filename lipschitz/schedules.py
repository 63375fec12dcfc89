"""Learning-rate schedules: plain functions ``step -> multiplier`` of the base learning rate.

Every schedule takes the 0-based step and the total number of steps, an optional linear
warm-up (``(step + 1) / (warmup_steps + 1)`` over the first ``warmup_steps`` steps, as in
nanoGPT) and then decays over the remaining steps; past ``total_steps`` it stays at its final
value. Use one with ``torch.optim.lr_scheduler.LambdaLR`` through :func:`schedule`::

    sched = LambdaLR(optimizer, schedule("linear", total_steps=2000))
    ...
    optimizer.step(); sched.step()

The paper's MLP and Shakespeare runs use ``linear`` (lr·(T − t)/T); its NanoGPT run uses
``constant_cooldown`` with ``cooldown_frac=0.4, floor=0.1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

__all__ = ["SCHEDULES", "constant", "constant_cooldown", "cosine", "linear", "schedule"]


def _progress(step: int, total_steps: int, warmup_steps: int) -> float | None:
    """None during the warm-up, else the fraction of the decay phase done, in [0, 1]."""
    if total_steps <= 0:
        raise ValueError(f"schedule: total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"schedule: warmup_steps must be in [0, total_steps), got {warmup_steps}")
    if step < warmup_steps:
        return None
    return min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / (warmup_steps + 1)


def constant(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """1 after the warm-up."""
    t = _progress(step, total_steps, warmup_steps)
    return _warmup(step, warmup_steps) if t is None else 1.0


def linear(step: int, total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> float:
    """Linear decay from 1 to ``floor`` (default 0) at ``total_steps``: the paper's schedule."""
    t = _progress(step, total_steps, warmup_steps)
    return _warmup(step, warmup_steps) if t is None else floor + (1 - floor) * (1 - t)


def cosine(step: int, total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> float:
    """Half a cosine from 1 to ``floor`` at ``total_steps``."""
    t = _progress(step, total_steps, warmup_steps)
    if t is None:
        return _warmup(step, warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def constant_cooldown(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_frac: float = 0.4,
    floor: float = 0.0,
) -> float:
    """1, then a linear cooldown to ``floor`` over the final ``cooldown_frac`` of all steps."""
    if not 0 < cooldown_frac <= 1:
        raise ValueError(f"constant_cooldown: cooldown_frac must be in (0, 1], got {cooldown_frac}")
    t = _progress(step, total_steps, warmup_steps)
    if t is None:
        return _warmup(step, warmup_steps)
    w = min(1.0, (1 - step / total_steps) / cooldown_frac)  # 1 before the cooldown, 0 at the end
    return floor + (1 - floor) * max(0.0, w)


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "constant_cooldown": constant_cooldown,
}


def schedule(name: str, total_steps: int, **kwargs: float) -> Callable[[int], float]:
    """The named schedule as a function ``step -> multiplier`` (e.g. for LambdaLR).

    Arguments are checked now, so a bad name or value fails before training starts.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule: unknown schedule {name!r}; known: {sorted(SCHEDULES)}")
    fn = functools.partial(SCHEDULES[name], total_steps=total_steps, **kwargs)
    fn(0)  # validate the arguments
    return fn
