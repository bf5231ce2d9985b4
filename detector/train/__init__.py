"""Training: the epoch loop and validation pass, the run's process set-up, checkpoints, optimisation."""

from detector.train.process import make_accelerator

__all__ = ["make_accelerator"]
