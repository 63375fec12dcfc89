"""lipschitz: train neural networks with an enforced, certified Lipschitz bound."""

__version__ = "0.1.0"
