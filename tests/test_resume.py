"""Checkpoints that survive anything: exact resume after SIGKILL, SIGTERM with 2 processes,
damaged states, pickled objects, non-finite losses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from detector import checkpoint
from detector.models import WeightsError, read_checkpoint

from .conftest import TINY, assert_same_weights, data_overrides, dummy_batches, launch_cmd, tool_env


def _cmd(nproc: int, args: list[str]) -> list[str]:
    return launch_cmd("train.py", ["--config", str(TINY), *args], nproc)


ENV = tool_env()


def _states(run: Path) -> list[Path]:
    return checkpoint.list_states(run)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(tiny_dataset, tmp_path):
    common = ["train.epochs=2", "train.checkpoint_every_steps=3", "train.keep_checkpoints=10",
              "logging.plots=false", *data_overrides(tiny_dataset)]  # fmt: skip
    ref = tmp_path / "ref"
    res = subprocess.run(_cmd(1, [f"output_dir={ref}", *common]), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(1, [f"output_dir={run}", *common]), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    # 8 steps per epoch: wait for a mid-epoch state of epoch 2 (step 9 or 12), then kill hard.
    while time.time() < deadline and not any(s.name in ("step_00000009", "step_00000012") for s in _states(run)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    states = _states(run)
    assert states and states[-1].name < "step_00000016", "the run finished before it was killed"
    position = json.loads((states[-1] / checkpoint.COMPLETE).read_text())
    assert 0 < position["batch"] < 8  # a mid-epoch state

    res = subprocess.run(_cmd(1, [f"output_dir={run}", "train.resume=auto", *common]), env=ENV,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert_same_weights(ref / "last.pt", run / "last.pt")


@pytest.mark.slow
def test_sigterm_two_processes_saves_and_resumes(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = [f"output_dir={run}", "train.epochs=50", "logging.plots=false", "data.num_workers=2",
            *data_overrides(tiny_dataset)]  # fmt: skip
    proc = subprocess.Popen(_cmd(2, args), env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not _states(run):
        time.sleep(0.1)
    assert _states(run), "no state was saved"
    # SLURM signals every process of the job step: the launcher, both training processes and
    # their DataLoader workers (torchrun gives the training processes sessions of their own)
    import psutil

    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert (run / "PREEMPTED").is_file(), err[-3000:]
    last = _states(run)[-1]
    meta = json.loads((last / checkpoint.COMPLETE).read_text())
    assert meta["num_processes"] == 2
    assert {"rng_0.pt", "rng_1.pt", "state.pt"} <= set(meta["files"])
    assert "stopped by signal SIGTERM" in out
    res = subprocess.run(_cmd(2, [*args[:1], "train.epochs=" + str(meta["epoch"] + 1), "train.resume=auto", *args[2:]]),
                         env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert not (run / "PREEMPTED").exists()


def _fake_state(run: Path, step: int, accelerator) -> Path:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    pos = {"epoch": 0, "batch": step, "step": step, "best": None, "wandb_id": None, "nonfinite_in_row": 0}
    return checkpoint.save_state(run, accelerator, model, opt, sched, pos, keep=5)


def test_truncated_state_falls_back_to_older(tmp_path, cpu_accelerator):
    acc = cpu_accelerator
    _fake_state(tmp_path, 1, acc)
    newest = _fake_state(tmp_path, 2, acc)
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load_state_files(newest, 0)
    messages = []
    found = checkpoint.find_resumable(tmp_path, 0, messages.append)
    assert found is not None and found[0].name == "step_00000001"
    assert "trying an older state" in messages[0]


def test_interrupted_write_leaves_no_state(tmp_path, cpu_accelerator):
    acc = cpu_accelerator
    _fake_state(tmp_path, 1, acc)
    (tmp_path / "checkpoints" / ".tmp-step_00000002").mkdir()  # a write that died half way
    assert [s.name for s in checkpoint.list_states(tmp_path)] == ["step_00000001"]


def test_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="pickled Python objects"):
        read_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(WeightsError, match="truncated, corrupt"):
        read_checkpoint(tmp_path / "trunc.pt")


class _NaNAfter(torch.nn.Module):
    """A model whose loss turns NaN after `good` steps."""

    def __init__(self, good: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.calls, self.good = 0, good

    def forward(self, images, targets):
        self.calls += 1
        loss = (self.w * 2).sum()
        return {"loss_a": loss * (float("nan") if self.calls > self.good else 1.0)}


def test_nonfinite_steps_skipped_then_stop(cpu_accelerator):
    from detector.engine import NonFiniteLossError, train_one_epoch

    acc = cpu_accelerator
    model = _NaNAfter(good=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = {"epoch": 0, "start_batch": 0, "grad_accum_steps": 1, "clip_grad_norm": None}
    # 2 good steps then 2 NaN steps, under a limit of 5: the NaN steps are skipped and counted.
    stats = train_one_epoch(model, opt, sched, dummy_batches(4), acc, max_nonfinite_steps=5, **kw)
    assert stats["train/nonfinite_steps"] == 2 and stats["nonfinite_in_row"] == 2
    assert model.w.item() == pytest.approx(1 - 2 * 0.1 * 2)  # only the two good steps moved it
    assert sched.last_epoch == 2
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row"):
        train_one_epoch(model, opt, sched, dummy_batches(10), acc, max_nonfinite_steps=5, nonfinite_in_row=2, **kw)
    assert model.w.item() == pytest.approx(0.6)
