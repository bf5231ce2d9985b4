"""Review of the fault handling (issue #17): a state saved again at the same step, a lock held by
a live process of the same SLURM job, a write error on one process only."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector.core import errors
from detector.core.errors import ConfigError, WriteError
from detector.train import checkpoint
from detector.train import process as runtime
from detector.train.state import RunState


def _objects() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _position(step: int, epoch: int, batch: int) -> RunState:
    return RunState(epoch=epoch, batch=batch, step=step, world_size=1, batch_size=4, grad_accum_steps=1)


def test_a_state_saved_again_at_the_same_step_keeps_the_old_one_when_the_write_fails(
    tmp_path, cpu_accelerator, monkeypatch
):
    """The end of an epoch (or a preemption) saves a state at the step the mid-epoch checkpoint
    just saved: if moving the new one into place fails, the one already there must survive
    (keep=1: it is the only state of the run)."""
    model, opt, sched = _objects()
    checkpoint.save_state(tmp_path, cpu_accelerator, model, opt, sched, _position(4, 0, 4), keep=1)
    real_replace = os.replace

    def failing(src, dst, *a, **kw):
        if Path(src).name.startswith(".tmp-step_"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(checkpoint.os, "replace", failing)
    with pytest.raises(WriteError, match="Input/output error"):
        checkpoint.save_state(tmp_path, cpu_accelerator, model, opt, sched, _position(4, 1, 0), keep=1)
    states = checkpoint.list_states(tmp_path)
    assert [p.name for p in states] == ["step_00000004"], "the state already saved at this step was deleted"
    state, _ = checkpoint.load_state_files(states[0], 0)
    assert state["position"]["epoch"] == 0 and state["position"]["batch"] == 4
    assert sorted(p.name for p in (tmp_path / checkpoint.STATE_DIR).iterdir()) == ["step_00000004"]


def test_a_state_saved_again_at_the_same_step_replaces_it(tmp_path, cpu_accelerator):
    model, opt, sched = _objects()
    checkpoint.save_state(tmp_path, cpu_accelerator, model, opt, sched, _position(4, 0, 4), keep=1)
    checkpoint.save_state(tmp_path, cpu_accelerator, model, opt, sched, _position(4, 1, 0), keep=1)
    assert sorted(p.name for p in (tmp_path / checkpoint.STATE_DIR).iterdir()) == ["step_00000004"]
    state, _ = checkpoint.load_state_files(checkpoint.list_states(tmp_path)[0], 0)
    assert state["position"]["epoch"] == 1 and state["position"]["batch"] == 0


def test_a_live_run_of_the_same_slurm_job_is_not_taken_over(tmp_path, monkeypatch):
    """Two runs on one output_dir inside one allocation (salloc, two sruns) share SLURM_JOB_ID:
    the second must be refused while the first runs; a requeued job (a higher restart count)
    takes the lock over."""
    run = tmp_path / "run"
    run.mkdir()
    lock = run / runtime.LOCK_FILE
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "now", "slurm_job": "4242"}
    lock.write_text(json.dumps(live))
    with pytest.raises(ConfigError, match=f"in use by another run .pid {os.getppid()}"):
        runtime.take_lock(run)
    theirs = {**live, "host": "node-17", "slurm_restart": 0}
    lock.write_text(json.dumps(theirs))
    with pytest.raises(ConfigError, match="in use by another run"):  # same incarnation, another node
        runtime.take_lock(run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job was requeued
    runtime.take_lock(run)
    taken = json.loads(lock.read_text())
    assert taken["pid"] == os.getpid() and taken["slurm_restart"] == 1
    runtime._release(lock, os.getpid())


def test_a_write_error_of_one_process_only_is_said_by_that_process(monkeypatch, capsys):
    """A raw OSError (not a WriteError, which every process raises together) is that process's
    alone: rank 1 must say it, or nobody does."""
    monkeypatch.setenv("RANK", "1")

    def main() -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")

    assert errors.run_main(main) == errors.EXIT_WRITE_FAILED
    err = capsys.readouterr().err
    assert "error: cannot write /runs/x/metrics.jsonl: No space left on device" in err

    def agreed() -> int:
        raise WriteError("cannot write /runs/x/best.pt: No space left on device")

    assert errors.run_main(agreed) == errors.EXIT_WRITE_FAILED
    assert capsys.readouterr().err == ""  # rank 0 says it for everyone


@pytest.mark.parametrize(
    "gloo_error",
    [
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4242: Connection reset by peer",
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 6000ms for send operation",
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:25496",
        # what the survivor of a hung (SIGSTOPped) peer got in DDP's buffer broadcast on CI's loaded machine
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Application timeout caused pair closure",
    ],
)
def test_every_gloo_error_of_a_lost_peer_is_said_in_one_line(monkeypatch, capsys, gloo_error):
    """gloo raises a plain RuntimeError when a peer dies or hangs; each of its wordings must become
    the one-line peer-lost message and exit code, not a stack trace."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def main() -> int:
        raise RuntimeError(gloo_error)

    assert errors.run_main(main) == errors.EXIT_PEER_LOST
    err = capsys.readouterr().err
    assert err.startswith("error: a collective operation with the other processes failed (")
    assert "train.dist_timeout_minutes" in err and "third_party" not in err


@pytest.mark.slow
def test_resume_after_an_image_vanished_mid_window_is_exact(tiny_dataset, tmp_path):
    """The image of the second micro-batch of an accumulation window vanishes: the state saved at
    the failure must be the one of the window's start (weights, optimizer and every RNG), so the
    resumed run, with the file back, ends with the weights of a run that never met the fault."""
    import shutil

    from detector.config import load
    from detector.data.coco import CocoIndex
    from detector.data.loader import TrainBatchSampler
    from tests.conftest import ROOT, TINY, assert_same_weights, data_overrides, run_cmd, tool_env

    def train(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return run_cmd([sys.executable, str(ROOT / script), *common, *args], env=tool_env(env), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset["root"], root)
    ds = {"root": root, "train": root / "train.json", "val": root / "val.json"}
    cfg = load(TINY, ["train.grad_accum_steps=2", *data_overrides(ds)])
    idx = CocoIndex(ds["train"])
    sampler = TrainBatchSampler(idx.aspect_ratios(), cfg.train.batch_size, cfg.train.seed, 1, 0,
                                cfg.data.aspect_ratio_grouping)  # fmt: skip
    batches, _ = sampler.global_batches(0)
    names = [idx.file_name(i) for i in batches[5]]  # window 3 (batches 4, 5), after the state of step 1
    gone = tmp_path / "gone"
    gone.mkdir()
    common = ["--config", str(TINY), "logging.plots=false", "train.epochs=1", "train.grad_accum_steps=2",
              "train.checkpoint_every_steps=1", *data_overrides(ds)]  # fmt: skip
    ref = train("tools/train.py", f"output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    env = {"VANISH": os.pathsep.join(str(root / "train" / n) for n in names), "VANISH_TO": str(gone)}
    res = train("tests/scripts/vanish.py", f"output_dir={run}", env=env)
    assert res.returncode == 2 and "A state was saved at step 2" in res.stderr, res.stderr[-3000:]
    state, _ = checkpoint.load_state_files(checkpoint.list_states(run)[-1], 0)
    assert (state["position"]["step"], state["position"]["batch"]) == (2, 4)
    for n in names:
        (gone / n).rename(root / "train" / n)
    res = train("tools/train.py", f"output_dir={run}", "train.resume=auto")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert_same_weights(tmp_path / "ref" / "last.pt", run / "last.pt")


def test_wandb_start_failure_message_carries_no_secret(tmp_path, monkeypatch):
    """wandb's error text can hold the server URL (user:password@ of a self-hosted server behind
    basic auth) or the key: the fallback message must not print either."""
    import wandb

    from detector.config import WandbConfig
    from detector.runs.tracking import RunLogger

    key = "local-0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setattr("detector.runs.tracking._online", lambda print_fn: True)
    calls: list[str] = []

    class Run:
        id, dir = "abc", str(tmp_path / "wandb" / "offline-run-x" / "files")

        def define_metric(self, *a, **kw) -> None:
            pass

    def init(mode: str, **kw) -> Run:
        calls.append(mode)
        if mode == "online":
            raise wandb.errors.CommError(f"error communicating with https://bob:hunter2@wandb.example/graphql "
                                         f"(api key {key})")  # fmt: skip
        return Run()

    monkeypatch.setattr(wandb, "init", init)
    said: list[str] = []
    RunLogger(tmp_path, enabled=True).start_wandb(WandbConfig(enabled=True, mode="online"), {}, None, said.append)
    assert calls == ["online", "offline"]
    text = "\n".join(said)
    assert "logging offline instead" in text and "wandb.example" in text
    assert "hunter2" not in text and key not in text, text


def test_check_dataset_decode_reads_images_from_a_url_root(tiny_dataset, capsys):
    """--decode joins the file names to the images root as training does: a URL root (here a
    web server on 127.0.0.1) must not become 'http:/host/...' (every image undecodable)."""
    from tests.conftest import http_server, run_tool_in_process

    with http_server(tiny_dataset["root"]) as url:
        code = run_tool_in_process("check_dataset.py", tiny_dataset["val"], f"{url}/val", "--decode", "--workers", "2")
    out = capsys.readouterr().out
    assert code == 0 and "problems: 0" in out and "decoded 7 of 7 image(s)" in out, out[-2000:]


def test_slurm_script_does_not_requeue_on_a_marker_an_earlier_run_left(tmp_path):
    """A requeued job that fails before the trainer starts (rendezvous, a bad node) must not find
    the PREEMPTED of its earlier run and requeue itself again, forever."""
    from tests.conftest import ROOT, TINY

    bin_dir, log, run = tmp_path / "bin", tmp_path / "scontrol.log", tmp_path / "run"
    bin_dir.mkdir()
    run.mkdir()
    (run / runtime.PREEMPTED_MARKER).write_text("signal SIGUSR1\n")  # the earlier run's
    (bin_dir / "srun").write_text("#!/bin/bash\necho 'rendezvous failed' >&2\nexit 1\n")
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$*" >> "{log}"; fi\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NAME": "detector",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "RUN_DIR": str(run)}  # fmt: skip
    res = subprocess.run(["bash", "launch/slurm.sh", str(TINY)], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert "requeueing" not in res.stdout and not log.exists(), res.stdout


def test_a_stale_lock_taken_over_by_another_run_first_is_not_taken_twice(tmp_path, monkeypatch):
    """Two runs start on a directory whose lock is stale: both judge it stale, the other one takes
    it over first. This one must then find that run's fresh lock and stop, not delete it."""
    run = tmp_path / "run"
    run.mkdir()
    lock = run / runtime.LOCK_FILE
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "then"}
    other = {"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}
    lock.write_text(json.dumps(dead))
    real_alive = runtime._alive

    def racing(pid: int) -> bool:  # while this run checks the dead pid, the other run takes the lock over
        if pid == dead["pid"] and json.loads(lock.read_text()) == dead:
            lock.unlink()
            lock.write_text(json.dumps(other))
        return real_alive(pid)

    monkeypatch.setattr(runtime, "_alive", racing)
    with pytest.raises(ConfigError, match=f"in use by another run .pid {os.getppid()}"):
        runtime.take_lock(run)
    assert json.loads(lock.read_text()) == other
    assert [p.name for p in run.iterdir()] == [runtime.LOCK_FILE]


@pytest.mark.slow
def test_a_validation_image_vanishing_in_the_last_epoch_is_validated_on_resume(tiny_dataset, tmp_path):
    """The state saved when validation fails holds the epoch's training; the resume must still
    validate that epoch (and write last.pt, best.pt and its metrics), also when it is the last."""
    from detector.models import weights
    from detector.runs import tracking
    from tests.conftest import ROOT, TINY, data_overrides, run_cmd, tool_env, vanishing_dataset

    ds, names, gone, env = vanishing_dataset(tiny_dataset, tmp_path, "val")
    root = ds["root"]
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests" / "scripts" / "vanish.py"), "--config", str(TINY), f"output_dir={run}",
           "logging.plots=false", "train.epochs=1", "train.checkpoint_every_steps=2", *data_overrides(ds)]  # fmt: skip
    res = run_cmd(cmd, env=tool_env(env), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "The state after epoch 1's training was saved" in res.stderr, res.stderr[-3000:]
    for n in names:
        (gone / n).rename(root / "val" / n)
    cmd[1] = str(ROOT / "tools" / "train.py")
    res = run_cmd([*cmd, "train.resume=auto"], env=tool_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    epochs = [r for r in tracking.read_metrics(run) if r["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 1 and epochs[0]["val/images"] == 7, epochs
    assert epochs[0]["train/loss"] > 0  # the epoch's training numbers, kept from before the failure
    assert weights.read(run / "last.pt")["epoch"] == 1 and (run / "best.pt").is_file()
