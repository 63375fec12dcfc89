"""Training runs: the loop, the run directory, and using a trained model.

- :mod:`~lipschitz.training.loop`: ``train(cfg, out)``, the :class:`Trainer` and its phases;
- :mod:`~lipschitz.training.rundir`: :class:`RunDir`, every file of a run and its guarantees;
- :mod:`~lipschitz.training.inference`: ``score``, ``evaluate``, ``load_run``, ``generate``;
- :mod:`~lipschitz.training.runtime`: device, autocast and torchrun's process group;
- :mod:`~lipschitz.training.report`: the progress display and curves.png.
"""

from lipschitz.training.inference import evaluate, generate, load_run, sample_text, score
from lipschitz.training.loop import ConstraintViolation, Trainer, TrainState, train
from lipschitz.training.rundir import RunDir

__all__ = [
    "ConstraintViolation",
    "RunDir",
    "TrainState",
    "Trainer",
    "evaluate",
    "generate",
    "load_run",
    "sample_text",
    "score",
    "train",
]
