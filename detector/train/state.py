"""Where a run is: the training position a resumable state records, and the best-score rule.

A checkpoint stores the state as the plain dict ``RunState.to_dict`` makes (read back with
``torch.load(weights_only=True)``); ``RunState.from_dict`` reads it and the dicts that earlier
versions saved, which lack the keys added since.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def is_better(value: float | None, best: float | None, mode: str) -> bool:
    """Does value improve on best (max or min)? NaN and missing values never do."""
    if value is None or value != value:
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


@dataclass(kw_only=True)
class RunState:
    """The run's position and bookkeeping, saved in every resumable state.

    The fields are the keys of the saved dict, in the order it has always had them. world_size,
    batch_size and grad_accum_steps (the layout the state was trained with) have no default: a
    fresh state takes the run's own.
    """

    epoch: int = 0  # epochs done; the loop runs epoch..train.epochs-1
    batch: int = 0  # this process's batches of the current epoch done (a mid-epoch state)
    step: int = 0  # optimizer steps done in the whole run (also the W&B x axis)
    best: float | None = None  # the best eval.best_metric so far (None: none was a score)
    best_epoch: int = 0  # the epoch whose weights best.pt holds
    evals_since_best: int = 0  # evaluations without improvement (eval.early_stop_patience)
    wandb_id: str | None = None  # the W&B run to continue
    nonfinite_in_row: int = 0  # skipped non-finite steps in a row, carried across epochs
    world_size: int
    batch_size: int
    grad_accum_steps: int
    # set only in a state saved after an epoch's training and before its validation (which
    # failed): that training's numbers, reported when the resumed run validates the epoch
    trained: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a checkpoint stores; ``trained`` only when set, as before it was a field."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["trained"] is None:
            del out["trained"]
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any], fallback: RunState | None = None) -> RunState:
        """The state a checkpoint's dict holds, also one an earlier version saved.

        Args:
            saved: the dict (``to_dict``, or an earlier version's, which may lack best_epoch,
                evals_since_best and the layout). Keys that are no field are ignored.
            fallback: what keys missing from ``saved`` are taken from: this run's fresh state
                (a state saved before the layout was recorded ran with this run's, as far as it
                can tell). None: the field defaults, and the layout must be in ``saved``.

        Raises:
            ValueError: a layout key is missing and there is no fallback.
        """
        names = {f.name for f in fields(cls)}
        values = fallback.to_dict() if fallback is not None else {}
        values.update((k, v) for k, v in saved.items() if k in names)
        missing = [k for k in LAYOUT_KEYS if k not in values]
        if missing:
            raise ValueError(f"a run state without {', '.join(missing)} needs a fallback state to take them from")
        return cls(**values)

    @property
    def layout(self) -> dict[str, int]:
        """The process count, per-process batch size and accumulation the state trained with."""
        return {k: getattr(self, k) for k in LAYOUT_KEYS}

    def end_epoch(self, epoch: int, stats: dict[str, Any]) -> None:
        """Epoch ``epoch`` is trained: the position moves to the start of the next one.

        A state resumed after its validation failed brings that epoch's training numbers
        (``trained``): they go into ``stats`` (the resumed run trained no batch of it).
        """
        stats.update(self.trained or {})
        self.trained = None
        self.epoch, self.batch = epoch + 1, 0

    def record_validation(self, score: float | None, mode: str) -> bool:
        """Count an evaluation of the epoch just trained; True when its score is the best so far
        (then best.pt is to be written).

        Args:
            score: its eval.best_metric (checkpoint.best_score; None: nothing to score).
            mode: "max" or "min" (config.best_mode).
        """
        if is_better(score, self.best, mode):
            self.best, self.best_epoch, self.evals_since_best = score, self.epoch, 0
            return True
        self.evals_since_best += 1
        return False

    def patience_spent(self, patience: int) -> bool:
        """Has eval.early_stop_patience run out (0: never)?"""
        return 0 < patience <= self.evals_since_best


LAYOUT_KEYS = ("world_size", "batch_size", "grad_accum_steps")
