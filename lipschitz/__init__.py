"""lipschitz: train neural networks with an enforced, certified Lipschitz bound."""

from lipschitz.train import load_run

__version__ = "0.1.0"
__all__ = ["load_run"]
