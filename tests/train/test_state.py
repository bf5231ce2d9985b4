"""RunState and the plain dict a resumable state stores (state.pt's "position", COMPLETE.json)."""

from __future__ import annotations

import json

import pytest
import torch

from detector.train import checkpoint
from detector.train.state import RunState

LAYOUT = {"world_size": 2, "batch_size": 4, "grad_accum_steps": 1}


def test_a_fresh_state_is_the_dict_the_states_have_always_stored():
    """The keys and their order, as tools/train.py wrote them before RunState (a dict literal)."""
    fresh = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_epoch": 0, "evals_since_best": 0,
             "wandb_id": None, "nonfinite_in_row": 0, **LAYOUT}  # fmt: skip
    d = RunState(**LAYOUT).to_dict()
    assert d == fresh and list(d) == list(fresh)


def test_the_dict_round_trip_keeps_every_value():
    state = RunState(epoch=3, batch=5, step=41, best=0.625, best_epoch=2, evals_since_best=1, wandb_id="abc123",
                     nonfinite_in_row=2, **LAYOUT, trained={"train/loss": 0.5, "batch": 12})  # fmt: skip
    d = state.to_dict()
    assert list(d)[-1] == "trained" and d["trained"] == {"train/loss": 0.5, "batch": 12}
    assert RunState.from_dict(d) == state
    state.trained = None
    assert "trained" not in state.to_dict() and RunState.from_dict(state.to_dict()) == state


def test_a_state_of_an_earlier_version_takes_the_missing_keys_from_this_runs(tmp_path, cpu_accelerator):
    """The position the first versions saved (checkpoint.save_state's "position": epoch, batch,
    step, best, W&B id, non-finite count; no best epoch, patience count or layout) still resumes:
    the missing keys are this run's fresh values, as the dict merge before RunState gave them."""
    old = {"epoch": 1, "batch": 3, "step": 11, "best": 0.25, "wandb_id": "run7", "nonfinite_in_row": 0}
    fresh = RunState(world_size=1, batch_size=8, grad_accum_steps=2)
    state = RunState.from_dict(old, fresh)
    assert state == RunState(epoch=1, batch=3, step=11, best=0.25, best_epoch=0, evals_since_best=0,
                             wandb_id="run7", nonfinite_in_row=0, world_size=1, batch_size=8, grad_accum_steps=2)  # fmt: skip
    assert state.to_dict() == {**fresh.to_dict(), **old}
    with pytest.raises(ValueError, match="world_size, batch_size, grad_accum_steps"):
        RunState.from_dict(old)

    # the same through the files: a state.pt whose position is the old dict, read with weights_only
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state_dir = checkpoint.save_state(tmp_path, cpu_accelerator, model, opt, sched, state, keep=2)
    saved = torch.load(state_dir / "state.pt", weights_only=True)
    assert saved["position"] == state.to_dict()
    saved["position"] = old
    torch.save(saved, state_dir / "state.pt")
    resumed = checkpoint.resume("auto", tmp_path, cpu_accelerator, model, opt, sched, lambda m: None, fresh=fresh)
    assert resumed == state


def test_a_new_state_is_plain_data_in_its_files(tmp_path, cpu_accelerator):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = RunState(epoch=2, batch=0, step=16, best=0.5, best_epoch=2, **LAYOUT, trained={"train/loss": 0.75})
    state_dir = checkpoint.save_state(tmp_path, cpu_accelerator, model, opt, sched, state, keep=2)
    position = torch.load(state_dir / "state.pt", weights_only=True)["position"]
    assert type(position) is dict and position == state.to_dict()
    meta = json.loads((state_dir / checkpoint.COMPLETE).read_text())
    assert {k: meta[k] for k in state.to_dict() if k != "trained"} == {
        k: v for k, v in state.to_dict().items() if k != "trained"
    }
    assert "trained" not in meta  # JSON holds the scalar keys only
    assert checkpoint.resume("auto", tmp_path, cpu_accelerator, model, opt, sched, lambda m: None) == state


def test_validation_bookkeeping():
    state = RunState(epoch=1, **LAYOUT)
    assert not state.record_validation(None, "max") and state.evals_since_best == 1 and state.best is None
    state.epoch = 2
    assert state.record_validation(0.4, "max") and (state.best, state.best_epoch, state.evals_since_best) == (0.4, 2, 0)
    state.epoch = 3
    assert not state.record_validation(float("nan"), "max") and state.best_epoch == 2
    assert not state.record_validation(0.3, "max") and state.evals_since_best == 2
    assert state.patience_spent(2) and not state.patience_spent(3) and not state.patience_spent(0)


def test_the_end_of_an_epoch_reports_the_training_a_failed_validation_saved():
    state = RunState(epoch=2, batch=12, **LAYOUT, trained={"train/loss": 0.5, "batch": 12})
    stats = {"train/loss": 0.0, "batch": 12, "lr": 0.01}  # a resumed epoch with no batch left to train
    state.end_epoch(2, stats)
    assert stats == {"train/loss": 0.5, "batch": 12, "lr": 0.01}
    assert (state.epoch, state.batch, state.trained) == (3, 0, None)
    assert "trained" not in state.to_dict()
