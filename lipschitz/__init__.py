"""lipschitz: train neural networks with an enforced, certified Lipschitz bound.

Importing the package loads nothing heavy; the pieces are ``lipschitz.linalg``,
``lipschitz.constraints``, ``lipschitz.nn``, ``lipschitz.optim``, ``lipschitz.certify`` and
``lipschitz.training`` (see docs/architecture.md).
"""

__version__ = "0.1.0"
__all__ = ["load_run"]


def __getattr__(name: str):
    if name == "load_run":  # lipschitz.load_run(dir): the trained model of a run directory
        from lipschitz.training import load_run

        return load_run
    raise AttributeError(f"module 'lipschitz' has no attribute {name!r}")
