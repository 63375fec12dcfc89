"""The names a run's config chooses between, read from the registries of the modules that own
them, and the checks that need those registries: which model reads which dataset, which keys
belong to which model, mixer or dataset, and what each dataset needs.

:class:`~lipschitz.config.Config` checks on its own what it can (types, ranges, sizes) when it
is made; :func:`check_choices` checks the rest. ``train``, ``load_run`` and ``lipschitz sweep``
run it before they write anything.
"""

from __future__ import annotations

from dataclasses import fields

from lipschitz.config import Config
from lipschitz.constraints import CONSTRAINTS
from lipschitz.data.tasks import EVAL_PROTOCOLS, TASKS
from lipschitz.linalg import NS_COEFFICIENTS
from lipschitz.nn.build import MIXERS, MODELS
from lipschitz.nn.layers import ACTIVATIONS, RESIDUALS
from lipschitz.nn.vit import BLOCKS, POOLS
from lipschitz.optim.build import NS_DTYPES, OPTIMIZERS, TARGET_NORM_SCALARS
from lipschitz.schedules import SCHEDULES

__all__ = ["check_choices", "known_choices"]

DEFAULTS = {f.name: f.default for f in fields(Config)}


def known_choices() -> dict[str, tuple]:
    """The names each choice key of the config accepts, from the module that owns each."""
    return {
        "model": tuple(MODELS),
        "dataset": tuple(TASKS),
        "mixer": tuple(MIXERS),
        "optimizer": OPTIMIZERS,
        "embed_optimizer": OPTIMIZERS,
        "constraint": tuple(CONSTRAINTS),
        "eval_protocol": EVAL_PROTOCOLS,
        "residual": RESIDUALS,
        "activation": ACTIVATIONS,
        "target_norm_scalars": TARGET_NORM_SCALARS,
        "ns_dtype": NS_DTYPES,
        "pool": POOLS,
        "block": BLOCKS,
        "schedule": tuple(SCHEDULES),
        "coefficients": tuple(NS_COEFFICIENTS),
    }


def check_choices(cfg: Config) -> None:
    """Every name is a known one and the names fit together; a ValueError naming the keys."""
    for key, allowed in known_choices().items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config: {key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    model, task = MODELS[cfg.model], TASKS[cfg.dataset]
    if model.inputs != task.inputs:
        readers = sorted(name for name, t in TASKS.items() if t.inputs == model.inputs)
        raise ValueError(
            f"config: model {cfg.model!r} cannot train on dataset {cfg.dataset!r} "
            f"(it reads {model.inputs}: datasets {', '.join(readers)})"
        )
    owners = {"model": MODELS, "mixer": MIXERS, "dataset": TASKS}
    for choice, registry in owners.items():
        for key in sorted({k for kind in registry.values() for k in kind.keys}):
            if getattr(cfg, key) == DEFAULTS[key] or key in registry[getattr(cfg, choice)].keys:
                continue
            readers = [name for name, kind in registry.items() if key in kind.keys]
            raise ValueError(
                f"config: {key} belongs to {choice} {' or '.join(map(repr, readers))}, "
                f"got {choice}={getattr(cfg, choice)!r}"
            )
    if task.check is not None:
        task.check(cfg)
