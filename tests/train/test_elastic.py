"""Elastic runs: torchrun's agents with --nnodes 1:2 and c10d rendezvous on localhost, two
"nodes" of one CPU process each on one host. One node is lost mid-epoch (its agent and its
training process killed at once); the surviving agent restarts its training process
(--max-restarts 1), the rendezvous closes with the one node left, and the run resumes from the
last state at the same global sample position and finishes. Its weights must equal, bitwise,
those of a one-process run resumed by hand from the same state."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detector.train import checkpoint
from tests.conftest import ROOT, TINY, _free_port, assert_same_weights, data_overrides, epoch_records, launch, tool_env

# 16 images, batch 2 on each of 2 processes: 4 steps per epoch, a state after each step (all kept),
# so the newest state when the node is lost is mid-epoch whenever the kill lands.
RECIPE = ["train.epochs=2", "train.checkpoint_every_steps=1", "train.keep_checkpoints=50", "logging.plots=false",
          "data.num_workers=0", "train.resume=auto", "train.dist_timeout_minutes=1"]  # fmt: skip


def agent_cmd(port: int, host: bool, args: list[str]) -> list[str]:
    """One node's torchrun agent: one process, 1 to 2 nodes, one restart, c10d rendezvous at port.
    One agent hosts the rendezvous store. A rendezvous closes at once when both nodes have
    joined, else 3 s after the first (last_call_timeout; 30 s by default): what the restart with
    the one node left waits."""
    conf = f"is_host={int(host)},last_call_timeout=3,join_timeout=300"
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
            "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "elastic-test", "--rdzv-conf", conf, "--monitor-interval", "0.5",
            str(ROOT / "tools" / "train.py"), *args]  # fmt: skip


def _lose_node(agent: subprocess.Popen) -> None:
    """A node lost: its agent and everything under it SIGKILLed, the agent first (else it would
    restart its training process)."""
    import psutil

    below = psutil.Process(agent.pid).children(recursive=True)
    agent.kill()
    for p in below:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.mark.slow
def test_a_node_lost_mid_epoch_restarts_with_the_survivor_and_resumes_at_the_same_sample(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = ["--config", str(TINY), f"output_dir={run}", *data_overrides(tiny_dataset), *RECIPE]
    port = _free_port()
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": tool_env(), "cwd": ROOT,
             "start_new_session": True}  # fmt: skip
    # the node to lose starts first: it imports torch and then waits for the store, so it joins
    # the moment the other agent (the store's host) has started it, well within last_call_timeout
    lost = subprocess.Popen(agent_cmd(port, False, args), **popen)
    survivor = None
    try:
        time.sleep(1.0)
        survivor = subprocess.Popen(agent_cmd(port, True, args), **popen)
        deadline = time.time() + 300
        while time.time() < deadline and not checkpoint.list_states(run) and survivor.poll() is None:
            time.sleep(0.02)
        if not checkpoint.list_states(run):
            _lose_node(lost)
            raise AssertionError("no state was saved: " + "".join(survivor.communicate(timeout=60))[-4000:])
        _lose_node(lost)
        out, err = survivor.communicate(timeout=600)
    finally:
        for agent in (survivor, lost):
            if agent is not None:
                with contextlib.suppress(Exception):
                    _lose_node(agent)
    assert survivor.returncode == 0, out[-3000:] + err[-4000:]
    assert "2 process(es) on cpu" in out and "1 process(es) on cpu" in out, out[-3000:]  # before and after

    found = re.search(r"resumed from (\S+): epoch (\d+), batch (\d+), step (\d+)", out)
    assert found, out[-3000:]
    state, epoch, batch = Path(found[1]), int(found[2]), int(found[3])
    assert epoch == 1 and 0 < batch < 4, found[0]  # mid-epoch, saved by the 2 processes
    assert f"world_size 2 -> 1): continuing epoch 1 after {2 * batch} global batches" in out, out[-3000:]
    records = epoch_records(run)
    assert [r["epoch"] for r in records][-2:] == [1, 2], records
    assert not (run / "PREEMPTED").exists()

    # The same state resumed by hand by one process: the elastic restart trained exactly that.
    by_hand = tmp_path / "by_hand"
    res = launch("train.py", ["--config", str(TINY), f"output_dir={by_hand}", *data_overrides(tiny_dataset),
                              *(a for a in RECIPE if not a.startswith("train.resume")), f"train.resume={state}"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(by_hand / "last.pt", run / "last.pt")
    assert epoch_records(by_hand)[-1]["val/loss"] == records[-1]["val/loss"]
