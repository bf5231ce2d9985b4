"""A warm interpreter for the tests' one-process tool runs.

A tool run costs a fresh interpreter ~7 s of imports (torch, torchvision and the torch._dynamo it
pulls in, accelerate, albumentations, matplotlib) before it does anything; the suite starts dozens.
Here one server process per pytest worker imports them once, single-threaded, and forks a child per
run: the child is a new process (its own pid, session, environment, working directory and standard
streams) that runs the tool's file as ``__main__``, as ``python tools/<tool>.py`` does, and exits
with its code. A one-process ``accelerate launch`` run gets the environment accelerate's own simple
launcher computes for that command line (its ``prepare_simple_launcher_cmd_env``); what is skipped is
the launcher process that waits for it. The handle answers like ``subprocess.Popen`` (pid,
``poll``, ``wait``, ``communicate``, ``send_signal``, ``returncode``: the exit code, or -N for
signal N), so tests kill, signal and wait for these runs as for a subprocess.

Tests of the launcher itself (torchrun, several processes, its exit codes) start real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# imported once by the server: what the tools import before they do anything
PRELOAD = (
    "torch", "torchvision", "torchvision.models.detection", "accelerate", "albumentations", "pycocotools.cocoeval",
    "faster_coco_eval", "PIL.Image", "omegaconf", "psutil", "detector.config", "detector.data", "detector.train.job",
    "detector.train.loop", "detector.train.engine", "detector.evaluation.cocoeval", "detector.runs.report",
    "detector.inference.predictor",
)  # fmt: skip


# -- the server: python -m tests.warm ----------------------------------------------------------------


def _child(request: dict[str, Any], ready: int) -> None:
    """In the forked child: become the requested process, say so on ``ready``, run the script,
    exit with its code."""
    code = 1
    try:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
        if request["new_session"]:
            os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        # appended to (the ranks of one group share them, as torchrun's processes share its streams)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.write(ready, b"1")
        os.close(ready)
        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path[0] = str(Path(script).resolve().parent)
        import runpy

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int | None):
                print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve() -> None:
    """Read one JSON request per line on stdin, fork a child for each, answer its pid, and report
    each child's exit ("pid status" lines, status as Popen.returncode) on stdout."""
    import importlib
    import select

    for name in PRELOAD:
        importlib.import_module(name)
    assert threading.active_count() == 1, "a preloaded module started a thread: fork would be unsafe"
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    replies.write(b"ready\n")
    replies.flush()
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([requests], [], [], 0.02)
        if readable:
            chunk = os.read(requests.fileno(), 65536)
            if not chunk:  # the client is gone: so are its runs
                for pid in children:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                ready_r, ready_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(ready_r)
                    _child(request, ready_w)
                os.close(ready_w)
                os.read(ready_r, 1)  # as Popen returns: the child is in its session, its streams set
                os.close(ready_r)
                children.add(pid)
                replies.write(f"started {request['id']} {pid}\n".encode())
                replies.flush()
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            replies.write(f"exited {pid} {code}\n".encode())
            replies.flush()


# -- the client -----------------------------------------------------------------------------------


class _Server:
    """The server of this pytest worker, and a thread that hands its replies to the handles."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.warm"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the warm server did not start (exit code {self.proc.wait()})")
        self.lock = threading.Condition()
        self.pids: dict[int, int] = {}  # request id -> pid
        self.exits: dict[int, int] = {}  # pid -> returncode
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, a, b = line.decode().split()
            with self.lock:
                if kind == "started":
                    self.pids[int(a)] = int(b)
                else:
                    self.exits[int(a)] = int(b)
                self.lock.notify_all()

    def start(self, request: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        with self.lock:
            self.next_id += 1
            rid = request["id"] = self.next_id
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            if not self.lock.wait_for(lambda: rid in self.pids, timeout=60):
                raise RuntimeError("the warm server did not start the run")
            return self.pids.pop(rid)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self.lock:
            self.lock.wait_for(lambda: pid in self.exits or self.proc.poll() is not None, timeout=timeout)
            if pid not in self.exits and self.proc.poll() is not None:
                raise RuntimeError("the warm server died")
            return self.exits.get(pid)


_server: _Server | None = None
_server_lock = threading.Lock()


def _get_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        return _server


class WarmProcess:
    """A run forked by the warm server, with the parts of subprocess.Popen's interface tests use."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, new_session: bool, capture: bool) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="warm_"))
        self._capture = capture
        out = str(self._dir / "stdout") if capture else os.devnull
        err = str(self._dir / "stderr") if capture else os.devnull
        self.args = argv
        self.returncode: int | None = None
        self._server = _get_server()
        self.pid = self._server.start({"argv": [str(a) for a in argv], "env": env, "cwd": str(cwd),
                                       "new_session": new_session, "stdout": out, "stderr": err})  # fmt: skip

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.wait(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.wait(self.pid, timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if not self._capture:
            return "", ""
        return tuple((self._dir / n).read_text(errors="replace") for n in ("stdout", "stderr"))  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmRanks:
    """The processes of one torchrun-style run (one per rank, sharing the standard streams), with
    the Popen interface of its launcher: when a process fails, the others get SIGTERM, then SIGKILL
    after ``grace`` seconds, and the return code is 1, as `accelerate launch` over torchrun gives."""

    def __init__(self, argv: list[str], envs: list[dict[str, str]], cwd: Path, capture: bool, grace: float = 30):
        self._dir = Path(tempfile.mkdtemp(prefix="warm_"))
        out = str(self._dir / "stdout") if capture else os.devnull
        err = str(self._dir / "stderr") if capture else os.devnull
        self.args, self._capture, self._grace = argv, capture, grace
        self.returncode: int | None = None
        server = _get_server()
        self.ranks = [_Forked(server, argv, env, cwd, False, out, err) for env in envs]
        self.pid = self.ranks[0].pid

    def poll(self) -> int | None:
        if self.returncode is None:
            codes = [r.poll() for r in self.ranks]
            if any(c not in (None, 0) for c in codes):
                for r in self.ranks:
                    r.send_signal(signal.SIGTERM)
                deadline = time.time() + self._grace
                for r in self.ranks:
                    if r.wait_for(max(0.0, deadline - time.time())) is None:
                        r.send_signal(signal.SIGKILL)
                        r.wait_for(None)
                self.returncode = 1
            elif all(c == 0 for c in codes):
                self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if not self._capture:
            return "", ""
        return tuple((self._dir / n).read_text(errors="replace") for n in ("stdout", "stderr"))  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        for r in self.ranks:
            r.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Forked:
    """One forked process of the server."""

    def __init__(self, server: _Server, argv: list[str], env: dict[str, str], cwd: Path, new_session: bool,
                 out: str, err: str) -> None:  # fmt: skip
        self._server = server
        self.returncode: int | None = None
        self.pid = server.start({"argv": [str(a) for a in argv], "env": env, "cwd": str(cwd),
                                 "new_session": new_session, "stdout": out, "stderr": err})  # fmt: skip

    def poll(self) -> int | None:
        return self.wait_for(0)

    def wait_for(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.wait(self.pid, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def popen(argv: list[str], env: dict[str, str], cwd: Path = ROOT, new_session: bool = False,
          capture: bool = True) -> WarmProcess:  # fmt: skip
    """Start ``python argv[0] argv[1:]`` (a script path and its arguments) as a warm fork."""
    return WarmProcess(argv, env, cwd, new_session, capture)


def torchrun_envs(base: dict[str, str], nproc: int, port: int) -> list[dict[str, str]]:
    """The environment of each process torchrun starts on one machine (rank, world size, the
    rendezvous address; each process makes the store itself rather than use the agent's)."""
    envs = []
    for rank in range(nproc):
        envs.append({**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                     "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
                     "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nproc), "ROLE_NAME": "default",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0",
                     "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "none",
                     "OMP_NUM_THREADS": base.get("OMP_NUM_THREADS", "1")})  # fmt: skip
    return envs


def accelerate_env(launch_args: list[str], env: dict[str, str]) -> dict[str, str]:
    """The environment `accelerate launch <launch_args> script` gives its process (one: accelerate's
    simple launcher computes it) or hands torchrun for its processes (several: its multi-GPU
    launcher's), starting from ``env``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    key = json.dumps([launch_args, sorted(env.items())])
    if key not in _ENV_CACHE:
        args = launch_command_parser().parse_args([*launch_args, "script.py"])
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(env)
            args, _, _ = _validate_launch_command(args)
            if args.multi_gpu:
                child_env = prepare_multi_gpu_env(args)
            else:
                _, child_env = prepare_simple_launcher_cmd_env(args)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _ENV_CACHE[key] = child_env
    return dict(_ENV_CACHE[key])


_ENV_CACHE: dict[str, dict[str, str]] = {}


if __name__ == "__main__":
    serve()
