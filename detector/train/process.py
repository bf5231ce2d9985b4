"""Process-level set-up of a run: the Accelerator, the run directory, signals, progress bars."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from detector.config import Config, TrainConfig, save_yaml
from detector.core.errors import EXIT_PREEMPTED, ConfigError
from detector.train.state import RunState

PREEMPTED_MARKER = "PREEMPTED"  # written in the run directory (accelerate launch maps exit codes to 1)


def resolve_mixed_precision(configured: str | None, launcher: str | None) -> str:
    """One answer for mixed precision from the run config and the launcher.

    ``accelerate launch`` passes its setting (``--mixed_precision`` or the launch config's
    ``mixed_precision``) as ACCELERATE_MIXED_PRECISION, "no" when it was not set. A run config
    value of null defers to the launcher; a run config value wins over the launcher's "no";
    two different precisions are an error rather than one silently ignored.

    Args:
        configured: train.mixed_precision (no, fp16, bf16 or None).
        launcher: the launcher's setting (os.environ["ACCELERATE_MIXED_PRECISION"]) or None.
    """
    launcher = (launcher or "").lower() or None
    if configured is None:
        return launcher or "no"
    if launcher not in (None, "no", configured):
        raise ConfigError(
            f"train.mixed_precision={configured} but the launcher asks for {launcher} "
            "(accelerate launch --mixed_precision or the launch config): set one of them, or make them agree "
            "(train.mixed_precision=null takes the launcher's)"
        )
    return configured


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator from the config; the launch config decides processes and devices.

    Mixed precision comes from ``resolve_mixed_precision`` (no, fp16, bf16); fp16 needs a GPU,
    bf16 runs on CPU too. Each process seeds its RNGs with seed + process index.
    """
    torch.set_num_threads(cfg.threads if cfg.threads > 0 else auto_threads())
    accelerator = make_accelerator(
        resolve_mixed_precision(cfg.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION")),
        cfg.dist_timeout_minutes,
    )
    set_seed(cfg.seed + accelerator.process_index)
    return accelerator


def auto_threads() -> int:
    """The CPUs this process may use, shared among the processes of this machine.

    ``accelerate launch`` without a config pins OMP_NUM_THREADS to physical cores / processes,
    which on machines with SMT (and on most cloud vCPUs) leaves half the CPU idle.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def make_accelerator(mixed_precision: str = "no", dist_timeout_minutes: float = 10.0) -> Accelerator:
    """An Accelerator; several processes without CUDA use gloo on the CPU.

    Launched torchrun-style (LOCAL_RANK set) on a machine without CUDA, Accelerate would fall
    back to one process per launcher unless told to use the CPU: we tell it, so that
    ``launch/cpu2.yaml`` (and torchrun) give a real multi-process CPU run.

    ``dist_timeout_minutes`` bounds every collective (gloo and NCCL alike): a process whose
    peer died or hangs raises instead of waiting for torch's 30-minute default.
    """
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    if not dist_timeout_minutes > 0:
        raise ConfigError(f"train.dist_timeout_minutes={dist_timeout_minutes}: must be > 0")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=distributed and not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=dist_timeout_minutes))],
    )


LOCK_FILE = "RUNNING.lock"


def prepare_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """Create the run directory, take its lock and write the resolved config into it, unless an
    earlier run's config.yaml is there: that one stays until the run knows whether it resumes
    (``write_config`` then replaces it) or starts over (it is moved aside with the earlier run's
    other files first).

    Runs before any data is read or model built, so that an unusable run directory (not
    writable, a file in the way, another run writing into it) stops the run at once. Every
    process gets the same answer.

    Raises:
        ConfigError: naming the directory and what is wrong with it.
    """
    run_dir = Path(cfg.output_dir)
    problem = None
    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            take_lock(run_dir)
            if not (run_dir / "config.yaml").exists():
                save_yaml(cfg, run_dir / "config.yaml")
            (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        except ConfigError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"output_dir {run_dir}: cannot write there ({exc.strerror or exc}); choose a writable output_dir"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [problem]
        broadcast_object_list(box, from_process=0)
        problem = box[0]
    if problem:
        raise ConfigError(problem)
    accelerator.wait_for_everyone()
    return run_dir


def write_config(cfg: Config, run_dir: Path) -> None:
    """The resolved config as ``run_dir/config.yaml`` (main process only), once the run knows
    whether it resumes: a run that starts over moves the earlier run's config.yaml aside with its
    other files first (checkpoint.set_aside_previous_run)."""
    save_yaml(cfg, run_dir / "config.yaml")


def take_lock(run_dir: Path) -> None:
    """One run per run directory: a lock file naming the process and host that holds it.

    A lock left by a process that no longer runs on this host (killed, machine restarted), or
    by an earlier incarnation of this same SLURM job (requeued, perhaps onto another node: a
    lower SLURM_RESTART_COUNT), is stale and taken over; one held by a live process, or by
    another host (which cannot be checked from here), stops this run, also when it is of the
    same SLURM job (two runs in one allocation). The lock goes when the process exits.
    """
    import atexit
    import json
    import socket

    path = run_dir / LOCK_FILE
    job = os.environ.get("SLURM_JOB_ID")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "slurm_job": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0) if job else None}  # fmt: skip
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                raw = path.read_text()
            except FileNotFoundError:  # released meanwhile
                continue
            except OSError:
                raw = ""
            try:
                holder = json.loads(raw)
            except ValueError:
                holder = {}
            earlier = holder.get("slurm_restart")
            requeued = (me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"]
                        and isinstance(earlier, int) and earlier < me["slurm_restart"])  # fmt: skip
            if requeued or (holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)))):
                why = f"left by SLURM job {me['slurm_job']} before it was requeued" if requeued else "no longer running"
                if _take_over(path, raw):
                    print(f"warning: {path}: stale lock of pid {holder.get('pid')} ({why}); taking it over")
                continue
            raise ConfigError(
                f"output_dir {run_dir} is in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}): two runs would write states "
                f"and metrics over each other. Use another output_dir, or delete {path} if that run is gone."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(_release, path, me["pid"])
        return
    raise ConfigError(f"output_dir {run_dir}: could not take its lock {path}: other runs are starting there")


def _take_over(path: Path, stale: str) -> bool:
    """Remove the lock file if it still holds ``stale``; False if another run replaced it first.

    The file is renamed aside (atomic: of two runs taking over at once, one gets it) and put
    back when what was moved is not the stale lock but a run's fresh one.
    """
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_text() == stale:
            return True
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            os.rename(aside, path)
        return False
    finally:
        aside.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(path: Path, pid: int) -> None:
    import json

    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (preemption) or a time limit; polled by the training loop."""

    def __init__(self, time_limit_minutes: float = 0.0) -> None:
        self.signal: int | None = None
        self.deadline = time.monotonic() + time_limit_minutes * 60 if time_limit_minutes > 0 else None
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None or (self.deadline is not None and time.monotonic() > self.deadline)

    def reason(self) -> str:
        if self.signal is not None:
            return f"signal {signal.Signals(self.signal).name}"
        return "time limit"


def world_info(accelerator: Accelerator) -> str:
    return (
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"mixed precision {accelerator.mixed_precision}, {torch.get_num_threads()} thread(s) each, "
        f"pid {os.getpid()}"
    )


def preempted(run_dir: Path, accelerator: Accelerator, reason: str, log) -> int:
    """After saving the state on a stop request: leave a marker and return EXIT_PREEMPTED."""
    if accelerator.is_main_process:
        (run_dir / PREEMPTED_MARKER).write_text(reason + "\n")
    # No process exits before the marker is written: a launcher that sees one process exit
    # (srun --kill-on-bad-exit on another node, torchrun) kills the rest, and the SLURM script
    # requeues the job only when it finds the marker.
    accelerator.wait_for_everyone()
    log(f"stopped by {reason}; state saved in {run_dir / 'checkpoints'}. Resume with train.resume=auto.")
    return EXIT_PREEMPTED


def epoch_line(m: dict[str, Any]) -> str:
    parts = [f"epoch {m['epoch']}", f"train loss {m.get('train/loss', float('nan')):.4f}"]
    for key, name in (("val/loss", "val loss"), ("val/mAP", "mAP"), ("val/mAP50", "mAP50"),
                      ("val/segm/mAP", "segm mAP"), ("val/segm/mAP50", "segm mAP50")):  # fmt: skip
        if key in m:
            parts.append(f"{name} {m[key]:.4f}")
    parts.append(f"{m.get('train/images_per_s', 0):.1f} img/s")
    for key, name in (("train/skipped_images", "skipped images"), ("train/dropped_boxes", "boxes dropped by augmentation"),
                      ("train/nonfinite_steps", "non-finite steps")):  # fmt: skip
        if m.get(key):
            parts.append(f"{name} {m[key]}")
    return " | ".join(parts)


def finished_message(state: RunState, cfg: Config, run_dir: Path, early_stopped: bool) -> str:
    """What a resume of a run with nothing left to train says: that it is finished, and where its
    best weights are."""
    why, longer = [], []
    if state.epoch >= cfg.train.epochs:
        why.append(f"train.epochs={cfg.train.epochs} reached")
        longer.append("train.epochs")
    if early_stopped:  # this also holds after train.epochs was raised: the patience decides then
        why.append(f"no better {cfg.eval.best_metric} in its last {state.evals_since_best} evaluation(s) "
                   f"(eval.early_stop_patience={cfg.eval.early_stop_patience})")  # fmt: skip
        longer.append("eval.early_stop_patience (0: never stop early)")
    best_file, best = run_dir / "best.pt", state.best
    if best is not None and best_file.is_file():
        where = f"its best weights are {best_file} ({cfg.eval.best_metric} {best:.4f}, epoch {state.best_epoch})"
    else:
        where = f"it wrote no best.pt (no finite {cfg.eval.best_metric}); its last weights are {run_dir / 'last.pt'}"
    return (
        f"the run in {run_dir} is finished: {state.epoch} epoch(s) trained, {' and '.join(why)}; {where}. "
        f"Nothing to train: raise {' and '.join(longer)} to train longer, or train again from the start with "
        "another output_dir or train.resume=null"
    )


def summary_rows(m: dict[str, Any], state: RunState, cfg: Config, run_dir: Path) -> list[tuple[str, str]]:
    """The end-of-run table: last metrics, the best score and where it is, early stopping."""
    best = state.best
    rows = [("epochs", str(m.get("epoch", 0)))]
    if m.get("epoch", 0) < cfg.train.epochs and cfg.eval.early_stop_patience:
        rows.append(("stopped early", f"no better {cfg.eval.best_metric} in {state.evals_since_best} evaluations"))
    for key in ("train/loss", "val/loss", "val/mAP", "val/mAP50", "val/mAP75", "val/segm/mAP", "val/segm/mAP50",
                "val/segm/mAP75"):  # fmt: skip
        if key in m:
            rows.append((f"last {key}", f"{m[key]:.4f}"))
    if best is not None:
        rows.append((f"best {cfg.eval.best_metric}", f"{best:.4f} (epoch {state.best_epoch})"))
    best_file = run_dir / "best.pt"
    written = best_file.is_file() and best is not None
    rows.append(("best weights", str(best_file) if written else f"none written (no finite {cfg.eval.best_metric})"))
    rows.append(("metrics", str(run_dir / "metrics.jsonl")))
    return rows
