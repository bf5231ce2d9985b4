"""The typed errors of every stage, and ``run_main``: the one place a tool turns them into one line and an exit code."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving a resumable state
EXIT_NONFINITE = 3  # stopped after too many non-finite losses in a row
EXIT_WORKER_DIED = 76  # a DataLoader worker was killed (usually out of memory)
EXIT_PEER_LOST = 77  # a collective failed: another training process died or hangs
EXIT_WRITE_FAILED = 74  # EX_IOERR: a checkpoint or weights file could not be written (disk full...)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used, with the key at fault."""


MAX_LISTED = 20  # problems spelled out in an error message; all are counted


class DatasetError(ValueError):
    """Bad dataset input, with the file and the json location or image at fault."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be had, read or fitted to the model."""


class WriteError(RuntimeError):
    """A file of the run could not be written (disk full, quota, I/O error, read-only)."""


def free_space(folder: str | Path) -> str:
    """The free space of the file system holding ``folder``, for error messages."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown free space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""


def write_error(path: str | Path, exc: BaseException) -> WriteError:
    """A WriteError naming the file, the reason and the free space where it was written."""
    path = Path(path)
    text = str(exc).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    return WriteError(f"cannot write {path}: {reason} ({free_space(folder)} on {folder}); the file it would have "
                      "replaced and the saved states are intact")  # fmt: skip


class CheckpointError(RuntimeError):
    """A resumable state that cannot be used."""


def run_main(main) -> int:
    """Run a tool's main(); known input errors become one clear message (no stack trace)."""
    try:
        return main()
    except (ConfigError, DatasetError, WeightsError, CheckpointError) as exc:
        if os.environ.get("RANK", "0") == "0" or _from_worker(exc):  # a worker's error is its process's alone
            print(f"error: {error_text(exc)}", file=sys.stderr)
        return 2
    except (WriteError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _WRITE_ERRNOS:
            raise
        # every process raises the same WriteError (checkpoint.agree); a raw OSError is this process's alone
        if os.environ.get("RANK", "0") == "0" or not isinstance(exc, WriteError):
            error = exc if isinstance(exc, WriteError) else write_error(exc.filename or "a file of the run", exc)
            print(f"error: {error}. Free some space (or choose another output_dir) and resume with "
                  "train.resume=auto.", file=sys.stderr)  # fmt: skip
        return EXIT_WRITE_FAILED
    except RuntimeError as exc:
        text = str(exc)
        if _peer_lost(exc):
            print(
                f"error: a collective operation with the other processes failed ({_first_line(text)}). Another "
                "process died or hangs (its own log says why: out of memory, a data error, a lost node); a process "
                "waits train.dist_timeout_minutes for its peers. Fix the cause and resume with train.resume=auto.",
                file=sys.stderr,
            )
            return EXIT_PEER_LOST
        if "DataLoader worker (pid" not in text:
            raise
        print(
            f"error: {text.splitlines()[0].rstrip('. ')}. A DataLoader worker is usually killed by the out-of-memory killer: "
            "lower data.num_workers or train.batch_size, or give the job more memory; then resume with "
            "train.resume=auto (the last saved state is intact).",
            file=sys.stderr,
        )
        return EXIT_WORKER_DIED


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
# gloo raises a plain RuntimeError for these (NCCL's are DistErrors); "pair closure" is gloo's wording when
# its own timeout closed the connection to a hung peer
_PEER_SIGNS = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
               "Application timeout caused pair closure", "collective operation timeout",
               "NCCL communicator was aborted")  # fmt: skip


def _peer_lost(exc: BaseException) -> bool:
    """Did a collective fail because another process died or hangs (gloo or NCCL)?"""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(exc, getattr(dist, "DistError", ())) or any(s in str(exc) for s in _PEER_SIGNS)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no message"
    return line.split("] ", 1)[-1] if line.startswith("[") else line  # gloo prefixes its source location


def _from_worker(exc: BaseException) -> bool:
    return str(exc).startswith("Caught ") and "Original Traceback" in str(exc)


def error_text(exc: BaseException) -> str:
    """The error's own message; an error raised in a DataLoader worker arrives wrapped in the
    worker's whole traceback, of which only its last line says anything to a user."""
    text = str(exc)
    if not _from_worker(exc):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    _, sep, rest = last.partition(": ")
    return rest if sep and "." in last.split(":")[0] else last
