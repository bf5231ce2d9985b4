"""Training: the epoch loop and validation pass, the run's process set-up, checkpoints, optimisation."""
