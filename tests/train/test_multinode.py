"""Several machines, on one host: two `accelerate launch` commands, each one machine of a 2-machine
job (launch/cpu2.yaml with --num_machines 2 and a machine rank each, one CPU process per machine,
gloo over 127.0.0.1), as launch/slurm.sh starts one launcher per node. The job must train what one
launcher with two processes trains (the session's shared two_process_run)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import (
    ROOT,
    TINY,
    TWO_PROCESS_RUN,
    _free_port,
    assert_same_weights,
    data_overrides,
    epoch_records,
    tool_env,
)


def machine_cmd(rank: int, port: int, args: list[str]) -> list[str]:
    """The launcher of one machine of two (one process each), its main process at 127.0.0.1:port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu2.yaml"),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            str(ROOT / "tools" / "train.py"), *args]  # fmt: skip


@pytest.mark.slow
def test_two_machines_train_like_one_machine_with_two_processes(two_process_run, tiny_dataset, tmp_path):
    out = tmp_path / "run"  # one folder for both machines, as a cluster's shared file system
    args = ["--config", str(TINY), f"output_dir={out}", *data_overrides(tiny_dataset), *TWO_PROCESS_RUN]
    port = _free_port()
    machines = [subprocess.Popen(machine_cmd(rank, port, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=tool_env(), cwd=ROOT, start_new_session=True)
                for rank in (0, 1)]  # fmt: skip
    try:
        printed = [m.communicate(timeout=600) for m in machines]
    finally:
        for m in machines:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.pid, signal.SIGKILL)
    for m, (stdout, stderr) in zip(machines, printed):
        assert m.returncode == 0, stdout[-3000:] + stderr[-3000:]
    for stdout, _ in printed:  # each machine's first process prints (accelerate's print), as on a cluster's nodes
        assert "2 process(es) on cpu" in stdout and "global batch 4" in stdout, stdout[-2000:]

    reference = two_process_run["run"]
    got, want = epoch_records(out), epoch_records(reference)
    assert len(got) == len(want) == 1
    val = {k: v for k, v in got[-1].items() if k.startswith("val/")}
    assert val == {k: v for k, v in want[-1].items() if k.startswith("val/")}  # the 12 stats, the loss, counts
    assert got[-1]["train/loss"] == want[-1]["train/loss"]
    for name in ("best.pt", "last.pt"):
        assert_same_weights(out / name, reference / name)
