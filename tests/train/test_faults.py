"""Faults as they happen on real machines: preemption with DataLoader workers, a worker killed,
a run directory in use or unusable, broken images in the workers, hostile json."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from detector.config import load
from detector.core import errors
from detector.core.errors import ConfigError, DatasetError
from detector.data.coco import CocoIndex
from detector.models import weights
from detector.train import checkpoint
from detector.train import process as runtime
from tests.conftest import (
    ONE_PROCESS_RESUME,
    ROOT,
    TINY,
    TWO_PROCESS_RESUME,
    assert_same_weights,
    data_overrides,
    epoch_records,
    launch,
    launch_cmd,
    popen,
    run_cmd,
    tool_env,
    vanishing_dataset,
    write_coco,
)


def _train_cmd(run: Path, ds, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(TINY), f"output_dir={run}",
            "logging.plots=false", *data_overrides(ds), *extra]  # fmt: skip


def _wait_for_state(run: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not checkpoint.list_states(run):
        time.sleep(0.05)
    assert checkpoint.list_states(run), "no state was saved"


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(
    tiny_dataset, tmp_path, one_process_reference
):
    """SLURM signals every process of the job, DataLoader workers included: the workers must not
    die of it before the training process has finished its step and saved. Plain python (the
    process group is the trainer's); the uninterrupted reference is shared with test_resume."""
    common = ONE_PROCESS_RESUME  # two DataLoader workers, a state every 3 steps
    run = tmp_path / "run"
    proc = popen(_train_cmd(run, tiny_dataset, *common), env=tool_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    _wait_for_state(run)
    os.killpg(proc.pid, signal.SIGTERM)  # the process and its workers, as a scheduler does
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == errors.EXIT_PREEMPTED, err[-3000:]
    assert (run / "PREEMPTED").is_file() and "killed by signal" not in err
    res = run_cmd(_train_cmd(run, tiny_dataset, *common, "train.resume=auto"), env=tool_env(),
                         capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(one_process_reference / "last.pt", run / "last.pt")


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_with_its_own_message_and_code(tiny_dataset, tmp_path):
    import psutil

    run = tmp_path / "run"
    proc = popen(_train_cmd(run, tiny_dataset, "train.epochs=50", "data.num_workers=2"), env=tool_env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    _wait_for_state(run)
    workers = psutil.Process(proc.pid).children()
    assert workers, "no DataLoader workers found"
    os.kill(workers[0].pid, signal.SIGKILL)  # as the out-of-memory killer does
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == errors.EXIT_WORKER_DIED, err[-3000:]
    assert "out-of-memory" in err and "data.num_workers" in err and "Traceback" not in err
    res = run_cmd(_train_cmd(run, tiny_dataset, "train.epochs=2", "train.resume=auto"), env=tool_env(),
                         capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]


@pytest.mark.slow
def test_truncated_jpeg_in_a_worker_is_one_clean_line(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "train"
    shutil.copytree(tiny_dataset["root"] / "train", root)
    name = json.loads(Path(tiny_dataset["train"]).read_text())["images"][0]["file_name"]
    raw = (root / name).read_bytes()
    (root / name).write_bytes(raw[: len(raw) * 6 // 10])  # its header still reads: training finds it
    res = run_cmd(_train_cmd(tmp_path / "run", tiny_dataset, "data.num_workers=1", f"data.train.images={root}"),
                         env=tool_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in res.stderr


def test_two_runs_on_one_output_dir(tmp_path, cpu_accelerator):
    cfg = load(TINY, [f"output_dir={tmp_path / 'run'}", "data.synthetic.enabled=true"])
    runtime.prepare_run_dir(cfg, cpu_accelerator)  # this test process holds the lock now
    lock = json.loads((tmp_path / "run" / runtime.LOCK_FILE).read_text())
    assert lock["pid"] == os.getpid()
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from detector.train import process as runtime; from detector.config import load; "
         "from accelerate import Accelerator; "
         f"runtime.prepare_run_dir(load({str(TINY)!r}, sys.argv[1:]), Accelerator(cpu=True))",
         f"output_dir={tmp_path / 'run'}", "data.synthetic.enabled=true"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert other.returncode != 0 and f"in use by another run (pid {os.getpid()}" in other.stderr
    # a stale lock (its process is gone) is taken over
    (tmp_path / "run" / runtime.LOCK_FILE).write_text(json.dumps({**lock, "pid": 2**22 + 12345}))
    runtime.prepare_run_dir(cfg, cpu_accelerator)
    assert json.loads((tmp_path / "run" / runtime.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_unusable_run_directory_stops_before_anything_is_read(tmp_path, cpu_accelerator):
    (tmp_path / "a_file").write_text("x")
    cfg = load(TINY, [f"output_dir={tmp_path / 'a_file' / 'run'}", "data.synthetic.enabled=true"])
    with pytest.raises(ConfigError, match="cannot write there"):
        runtime.prepare_run_dir(cfg, cpu_accelerator)


def test_hostile_json(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="nested too deeply"):
        CocoIndex(deep)
    cats = [{"id": 1, "name": "a"}]
    surrogate = tmp_path / "s.json"
    surrogate.write_text('{"images": [{"id": 1, "file_name": "\\ud800.jpg", "width": 9, "height": 9}], '
                         '"annotations": [], "categories": [{"id": 1, "name": "a"}]}')  # fmt: skip
    with pytest.raises(DatasetError, match="lone surrogate"):
        CocoIndex(surrogate)
    with pytest.raises(DatasetError, match="'images' is empty"):
        CocoIndex(write_coco(tmp_path / "e.json", [], [], cats))
    images = [{"id": i, "file_name": "same.jpg", "width": 9, "height": 9} for i in (1, 2)]
    anns = [{"id": k, "image_id": 2, "category_id": 1, "bbox": [1, 1, 3, 3], "area": 9} for k in (1, 2, 3)]
    with pytest.raises(DatasetError) as err:
        CocoIndex(write_coco(tmp_path / "d.json", images, anns, cats))
    text = str(err.value)
    assert "file_name 'same.jpg' is also image id 1" in text
    assert text.count("image_id") == 0 and "its 3 annotation(s) are not used" in text  # reported once
    idx = CocoIndex(tmp_path / "d.json", on_invalid="repair")
    assert len(idx) == 1 and idx.repairs["annotations of rejected images dropped"] == 3


@pytest.mark.slow
def test_negatives_only_validation_cannot_choose_best_by_map(tiny_dataset, tmp_path):
    data = json.loads(Path(tiny_dataset["val"]).read_text())
    data["annotations"] = []
    val = write_coco(tmp_path / "neg.json", data["images"], [], data["categories"])
    res = run_cmd(_train_cmd(tmp_path / "run", tiny_dataset, f"data.val.annotations={val}"), env=tool_env(),
                         capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert res.returncode == 2 and "has no objects" in res.stderr and "eval.best_metric=val/loss" in res.stderr
    assert not (tmp_path / "run" / "best.pt").exists()


def _png_header(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes whose header declares width x height pixels (an image bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("side", [12_000, 40_000])
def test_image_bombs_stop_at_start_up_from_the_header(tmp_path, side):
    from detector.config import DataConfig
    from detector.data import check_files

    (tmp_path / "img").mkdir()
    _png_header(tmp_path / "img" / "bomb.png", side, side)
    images = [{"id": 1, "file_name": "bomb.png", "width": side, "height": side}]
    ann = write_coco(tmp_path / "a.json", images, [], [{"id": 1, "name": "a"}])
    idx = CocoIndex(ann, images_root=tmp_path / "img", max_pixels=DataConfig().max_image_pixels)
    with pytest.raises(DatasetError, match="bomb.png") as err:
        check_files(idx, tmp_path / "img", DataConfig())
    assert "too large" in str(err.value) and "data.max_image_pixels" in str(err.value)
    idx = CocoIndex(ann, images_root=tmp_path / "img", on_invalid="repair", max_pixels=DataConfig().max_image_pixels)
    check_files(idx, tmp_path / "img", DataConfig(on_invalid="repair"))
    assert len(idx) == 0  # dropped, and counted
    assert sum(n for k, n in idx.repairs.items() if "dropped" in k) == 1


# -- one of several training processes dies or hangs ------------------------------------------------


def _training_processes(launcher: subprocess.Popen, n: int, timeout: float = 600) -> dict[int, Any]:
    """The launcher's training processes by rank (psutil; torchrun gives them their own sessions)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = {}
        for p in psutil.Process(launcher.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "train.py" in " ".join(p.cmdline()) and "RANK" in (env := p.environ()):
                    ranks[int(env["RANK"])] = p
        if len(ranks) == n:
            return ranks
        time.sleep(0.2)
    raise AssertionError(f"did not find {n} training processes")


def _two_process_run(run: Path, ds, *extra: str) -> subprocess.Popen:
    args = [f"output_dir={run}", "logging.plots=false", "train.checkpoint_every_steps=2", *data_overrides(ds), *extra]
    return subprocess.Popen(launch_cmd("train.py", ["--config", TINY, *args], nproc=2), env=tool_env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_one_of_two_training_processes_dies_or_hangs(tiny_dataset, tmp_path, fault):
    """A peer killed (the OOM killer, a node lost) or hung (stuck file system, a stopped
    process): the survivor must not wait out torch's 30-minute collective timeout. A killed
    peer is seen by the launcher at once; a hung one by the survivor's collective, after
    train.dist_timeout_minutes. Either way the launcher exits non-zero in bounded time and the
    run resumes from its last state."""
    run = tmp_path / "run"
    proc = _two_process_run(run, tiny_dataset, "train.epochs=30", "train.dist_timeout_minutes=0.1")
    try:
        ranks = _training_processes(proc, 2)
        _wait_for_state(run)
        if fault == "killed":
            ranks[1].send_signal(signal.SIGKILL)
        else:
            ranks[1].suspend()  # SIGSTOP: alive, holding its sockets open, never answering
            # the survivor gives up after train.dist_timeout_minutes (6 s), not torch's 30 minutes
            # (a bound far from both, so a slow machine's start-up and teardown do not count)
            ranks[0].wait(timeout=600)
            ranks[1].resume()  # the hung node comes back (else torchrun waits 30 s before SIGKILL)
        out, err = proc.communicate(timeout=600)  # the launcher exits once a process is gone
    finally:
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            ranks[1].kill()
    assert proc.returncode != 0, err[-3000:]
    if fault == "hung":  # the survivor's own words: what happened and the key that bounds it
        assert "error: a collective operation with the other processes failed" in err, err[-3000:]
        assert "train.dist_timeout_minutes" in err and "[rank0]: Traceback" not in err, err[-3000:]
    if fault == "hung":
        return  # the resume after a lost peer is the same either way: shown once, below
    steps = json.loads((checkpoint.list_states(run)[-1] / checkpoint.COMPLETE).read_text())["step"]
    res = launch("train.py", ["--config", TINY, f"output_dir={run}", "logging.plots=false", "train.epochs=2",
                              "train.resume=auto", *data_overrides(tiny_dataset)], nproc=2, warm=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {run / checkpoint.STATE_DIR}" in res.stdout and f"step {steps}" in res.stdout, res.stdout


# -- the disk fills up while saving -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("full_at", "nproc"), [("best.pt", 1), ("state.pt", 2)])
def test_disk_full_while_saving_keeps_the_previous_files(tiny_dataset, tmp_path, full_at, nproc):
    """The second save of best.pt (or of a state, whose writer is the main process of two) hits a
    full disk: the run stops at once with the path and the free space, on every process (no
    process left waiting at a barrier), and what the first epoch saved stays valid."""
    run = tmp_path / "run"
    args = ["--config", TINY, f"output_dir={run}", "logging.plots=false", "train.epochs=3",
            "eval.best_metric=val/loss", *data_overrides(tiny_dataset)]  # fmt: skip
    res = launch("../tests/scripts/disk_full.py", args, nproc=nproc, timeout=300,
                 env={"FULL_AT": full_at, "FULL_AFTER": "1"})  # fmt: skip
    assert res.returncode != 0, res.stdout[-2000:]
    assert "error: cannot write" in res.stderr and "free on" in res.stderr, res.stderr[-3000:]
    assert f"{full_at}: No space left on device" in res.stderr, res.stderr[-3000:]
    assert str(ROOT / "detector") not in res.stderr and "[rank" not in res.stderr, "a traceback of ours"
    assert not list(run.rglob(".*tmp*")), "a temporary file was left behind"
    states = checkpoint.list_states(run)
    assert states, "the first epoch's state is gone"
    state, _ = checkpoint.load_state_files(states[-1], 0)
    assert state["position"]["epoch"] >= 1
    best = weights.read(run / "best.pt")
    assert best["epoch"] == 1  # the first best.pt, whole: the second was never moved over it
    res = launch("train.py", [*args, "train.resume=auto"], nproc=nproc, warm=True)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]


# -- images vanish mid-run ----------------------------------------------------------------------------


@pytest.fixture
def vanishing_copy(tiny_dataset, tmp_path):
    """A copy of the tiny dataset whose two first training images vanish after the first state."""
    return vanishing_dataset(tiny_dataset, tmp_path, "train")


@pytest.mark.slow
def test_images_vanishing_mid_run_stop_with_a_saved_state(vanishing_copy, tmp_path):
    """data.on_corrupt_image=error, 2 processes with workers: the process that meets the missing
    file stops every process before the batch changes anything, a state is saved, the message
    names the file; with the file back, the run resumes."""
    ds, names, gone, env = vanishing_copy
    run = tmp_path / "run"
    args = ["--config", TINY, f"output_dir={run}", "logging.plots=false", "train.epochs=2", "data.num_workers=2",
            *data_overrides(ds)]  # fmt: skip
    res = launch("../tests/scripts/vanish.py", args, nproc=2, timeout=300, env=env)
    assert res.returncode != 0, res.stdout[-2000:]
    assert any(f"cannot decode image {ds['root'] / 'train' / n}" in res.stderr for n in names), res.stderr[-3000:]
    assert "A state was saved at step" in res.stderr and str(ROOT / "detector") not in res.stderr, res.stderr[-3000:]
    state, _ = checkpoint.load_state_files(checkpoint.list_states(run)[-1], 0)
    assert state["position"]["epoch"] == 1, "the state saved at the failure is inside epoch 2"
    for n in names:  # the file system has them back
        (gone / n).rename(ds["root"] / "train" / n)
    res = launch("train.py", [*args, "train.resume=auto"], nproc=2, warm=True)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]


@pytest.mark.slow
def test_images_vanishing_mid_run_are_skipped_and_counted(vanishing_copy, tmp_path):
    ds, names, gone, env = vanishing_copy
    run = tmp_path / "run"
    res = launch("../tests/scripts/vanish.py", ["--config", TINY, f"output_dir={run}", "logging.plots=false",
                 "train.epochs=2", "data.on_corrupt_image=skip", *data_overrides(ds)], env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    skipped = [r["train/skipped_images"] for r in epoch_records(run)]
    assert skipped == [0, len(names)], skipped


# -- launch/slurm.sh: preemption, requeue, resume -----------------------------------------------------

FAKE_SRUN = """#!{python}
# srun as far as launch/slurm.sh needs it: run the task (the last argument, `bash -c CMD`) on this
# node, and deliver the signals srun receives to every process of the step, as SLURM's process
# tracking does (torchrun's training processes live in sessions of their own).
import os, signal, subprocess, sys
import psutil
task = subprocess.Popen(sys.argv[sys.argv.index("bash"):], env={{**os.environ, "SLURM_NODEID": "0"}})
def relay(signum, frame):
    for p in [psutil.Process(task.pid), *psutil.Process(task.pid).children(recursive=True)]:
        try:
            p.send_signal(signum)
        except psutil.Error:
            pass
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, relay)
sys.exit(task.wait())
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol: 'show hostnames LIST' prints this machine; anything else is recorded.
if [ "$1" = show ]; then echo 127.0.0.1; else echo "$*" >> "{log}"; fi
"""


@pytest.mark.slow
def test_slurm_script_requeues_a_preempted_job_which_then_resumes(tiny_dataset, tmp_path, two_process_reference):
    """launch/slurm.sh with fake srun and scontrol on PATH, 2 processes: SIGUSR1 to the batch
    script (SLURM's early warning) saves a state, the script requeues the job and exits 0; the
    requeued job resumes and finishes without asking for another requeue, with the weights of
    a run that was never stopped."""
    from tests.conftest import _free_port

    bin_dir, log, run = tmp_path / "bin", tmp_path / "scontrol.log", tmp_path / "run"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format(log=log))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = tool_env({
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NAME": "detector", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1]", "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "2", "RUN_DIR": str(run), "LAUNCH_CONFIG": "launch/cpu2.yaml",
    })  # fmt: skip
    cmd = ["bash", "launch/slurm.sh", str(TINY), *TWO_PROCESS_RESUME, *data_overrides(tiny_dataset)]
    job = subprocess.Popen(cmd, env={**env, "MAIN_PORT": str(_free_port())}, cwd=ROOT, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for_state(run)  # at step 2 of 8: six steps and a validation to receive the signal in
        job.send_signal(signal.SIGUSR1)  # to the batch script, as `--signal=B:USR1@120` or scancel -s USR1 -b do
        out, err = job.communicate(timeout=600)
    finally:
        with contextlib.suppress(Exception):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-2000:] + err[-3000:]
    assert "requeueing job 4242" in out and log.read_text().split("\n")[0] == "requeue 4242", out[-2000:]
    assert (run / "PREEMPTED").is_file()
    res = subprocess.run(cmd, env={**env, "MAIN_PORT": str(_free_port())}, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout and "requeueing job" not in res.stdout, res.stdout[-2000:]
    assert log.read_text().count("requeue") == 1 and not (run / "PREEMPTED").exists()
    assert [r["epoch"] for r in epoch_records(run)][-1] == 2
    assert_same_weights(two_process_reference / "last.pt", run / "last.pt")


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch, capsys):
    """A job killed at its time limit leaves its lock; requeued (maybe onto another node) it must
    start, while a different job on another host is still refused."""
    run = tmp_path / "run"
    run.mkdir()
    lock = run / runtime.LOCK_FILE
    theirs = {"pid": 1, "host": "node-17", "started": "2026-11-24 10:00:00", "slurm_job": "4242", "slurm_restart": 0}
    monkeypatch.setenv("SLURM_JOB_ID", "5151")
    lock.write_text(json.dumps(theirs))
    with pytest.raises(ConfigError, match="in use by another run .pid 1 on host node-17"):
        runtime.take_lock(run)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM counts the requeues
    runtime.take_lock(run)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "left by SLURM job 4242 before it was requeued" in capsys.readouterr().out
    runtime._release(lock, os.getpid())
