"""Shared fixtures and helpers: tiny datasets written to tmp dirs, the commands that launch the
tools, dummy batches for the training loop, and the reference data beside the checkout."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"

sys.path.insert(0, str(ROOT))


# -- what the suite launches: a count that does not depend on the machine's speed ----------------

# Every subprocess the tests start (subprocess.Popen, under subprocess.run too) by kind and script,
# and every in-process tool call; printed in the terminal summary (under xdist each worker sends its
# counts to the controller, which sums them).
LAUNCHES: collections.Counter[str] = collections.Counter()

# the scripts that run the trainer: tools/train.py, its test wrappers, and launch/slurm.sh (which
# launches it on the processes of its launch config)
TRAINERS = ("tools/train.py", "tests/scripts/train_spy.py", "tests/scripts/vanish.py", "tests/scripts/disk_full.py",
            "launch/slurm.sh")  # fmt: skip


def _script_name(arg: str) -> str:
    """A script's path relative to the checkout (tools/train.py, tests/scripts/vanish.py)."""
    path = Path(arg)
    if not path.is_absolute():
        path = ROOT / path
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(ROOT).as_posix()
    return arg


def launch_kind(argv: list[str]) -> str:
    """What a command line starts: 'accelerate xN <script>', 'python <script>', 'bash <script>',
    'python -c' or 'other <program>'."""
    if not argv:
        return "other"
    if "accelerate.commands.launch" in argv or Path(argv[0]).name == "accelerate":
        nproc, config_file, script = None, None, "?"
        for i, arg in enumerate(argv):
            if arg == "--num_processes" and i + 1 < len(argv):
                nproc = int(argv[i + 1])
            elif arg == "--config_file" and i + 1 < len(argv):
                config_file = argv[i + 1]
            elif arg.endswith(".py") and argv[i - 1] not in ("--config_file", "--config"):
                script = _script_name(arg)
                break
        if nproc is None and config_file is not None:  # the launch config's own count
            found = re.search(r"^num_processes:\s*(\d+)", Path(config_file).read_text(), re.MULTILINE)
            nproc = int(found.group(1)) if found else 1
        return f"accelerate x{nproc or 1} {script}"
    program = Path(argv[0]).name
    if program.startswith("python") or argv[0] == sys.executable:
        if len(argv) > 1 and argv[1] == "-c":
            return "python -c"
        script = next((a for a in argv[1:] if a.endswith(".py")), None)  # after options such as -X importtime
        return f"python {_script_name(script)}" if script else "python"
    if program in ("bash", "sh") and len(argv) > 1:
        return f"bash {argv[1]}"
    return f"other {program}"


_popen_init = subprocess.Popen.__init__
_WORKER_COUNTS = pytest.StashKey[list]()  # xdist's controller: the counts each worker sent


def _counting_popen_init(self: subprocess.Popen, args: Any, *rest: Any, **kw: Any) -> None:
    argv = [str(os.fspath(a)) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    LAUNCHES[launch_kind(argv) + (" --help" if "--help" in argv else "")] += 1  # a --help trains nothing
    _popen_init(self, args, *rest, **kw)


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _counting_popen_init  # type: ignore[method-assign]
    config.stash[_WORKER_COUNTS] = []


def pytest_unconfigure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _popen_init  # type: ignore[method-assign]


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker: its counts go to the controller
        session.config.workeroutput["launch_counts"] = dict(LAUNCHES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist's controller: one worker's counts (none if it went down without finishing)."""
    node.config.stash[_WORKER_COUNTS].append(getattr(node, "workeroutput", {}).get("launch_counts"))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    workers = config.stash.get(_WORKER_COUNTS, [])
    total: collections.Counter[str] = collections.Counter()
    if workers:  # the controller of xdist workers: the tests ran there
        for counts in workers:
            total.update(counts or {})
    else:
        total.update(LAUNCHES)
    if not total:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("-", "launches (subprocesses and in-process tool calls)")
    trainings = {k: n for k, n in total.items() if k.split(" ")[-1] in TRAINERS}
    by_nproc: collections.Counter[str] = collections.Counter()
    for kind, n in trainings.items():  # "accelerate x2", "python", "warm accelerate x1", "warm python", "bash"
        by_nproc[" ".join(kind.split(" ")[:-1])] += n
    write(f"training runs: {sum(trainings.values())} (" + ", ".join(f"{k}: {n}" for k, n in sorted(by_nproc.items()))
          + ")")  # fmt: skip
    tools = sum(n for k, n in total.items() if k not in trainings and not k.startswith(("in-process", "other")))
    write(f"other subprocesses of python, accelerate or bash: {tools}; in-process tool calls: "
          f"{sum(n for k, n in total.items() if k.startswith('in-process'))}")  # fmt: skip
    for kind, n in sorted(total.items()):
        write(f"  {n:4d}  {kind}")
    missing = sum(1 for counts in workers if counts is None)
    if missing:
        write(f"({missing} xdist worker(s) went down without sending their counts)")


# -- reference data beside the checkout -----------------------------------------------------------


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data. Missing: skip locally, but fail when CI is set (CI must not
    go green by skipping the reference tests)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing (../shared/data is not beside this checkout)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI is set, so this is a failure, not a skip")
        pytest.skip(message)
    return path


# -- tiny COCO files ------------------------------------------------------------------------------


def write_coco(path: Path, images: list, annotations: list, categories: list, **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories, **extra}))
    return path


def one_image_coco(
    folder: Path,
    size: tuple[int, int],
    bboxes: list[list[float]],
    name: str = "a.jpg",
    image_bytes: bytes | None = None,
) -> Path:
    """One black JPEG of size (width, height) (or the given file content) and its COCO json with
    the given xywh boxes, all of category 1 ("x"). Returns the json path (folder/a.json)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if image_bytes is None:
        Image.new("RGB", size).save(folder / name)
    else:
        (folder / name).write_bytes(image_bytes)
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b} for i, b in enumerate(bboxes)]
    images = [{"id": 1, "file_name": name, "width": size[0], "height": size[1]}]
    return write_coco(folder / "a.json", images, anns, [{"id": 1, "name": "x"}])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict[str, Path]:
    """A small demo dataset: 16 train and 7 val images (7: not a multiple of 2 processes x 2)."""
    from detector.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("tiny")
    paths = make_dataset(root, num_train=16, num_val=7, seed=1)
    return {"root": root, "train": paths["train"], "val": paths["val"]}


def data_overrides(ds: dict[str, Path]) -> list[str]:
    return [
        f"data.train.annotations={ds['train']}",
        f"data.train.images={ds['root'] / 'train'}",
        f"data.val.annotations={ds['val']}",
        f"data.val.images={ds['root'] / 'val'}",
    ]


# -- launching the tools ------------------------------------------------------------------------


def tool_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment the tools run in: one thread, W&B off, unbuffered. None unsets a variable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def launch_cmd(script: str, args: list[str], nproc: int = 1) -> list[str]:
    """`accelerate launch` of tools/<script> on CPU with nproc processes."""
    launch_cfg = ROOT / "launch" / ("cpu.yaml" if nproc == 1 else "cpu2.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_cfg)]
    if nproc > 1:
        cmd += ["--num_processes", str(nproc), "--main_process_port", str(_free_port())]
    return [*cmd, str(ROOT / "tools" / script), *map(str, args)]


def _warm_argv(argv: list[str]) -> tuple[list[str], list[str] | None, int] | None:
    """A command line that runs a python script: (the script and its arguments, the accelerate
    launch options or None for plain python, the number of processes); None for anything else."""
    if len(argv) > 1 and argv[0] == sys.executable and argv[1].endswith(".py"):
        return argv[1:], None, 1
    if argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]:
        nproc = int(launch_kind(argv).split(" ")[1][1:])
        i = next(i for i, a in enumerate(argv) if i > 2 and a.endswith(".py") and argv[i - 1] != "--config_file")
        return argv[i:], argv[3:i], nproc
    return None


def popen(cmd: list[Any], env: dict[str, str] | None = None, cwd: Path = ROOT, start_new_session: bool = False,
          stdout: Any = None, stderr: Any = None, warm: bool | None = None, **kw: Any) -> Any:  # fmt: skip
    """subprocess.Popen(cmd, ...) for the tests' runs. A one-process run of a python script (plain
    python, or accelerate launch of one process) is forked by the warm interpreter (tests/warm.py:
    the same process without ~7 s of imports); with warm=True an accelerate launch of several
    processes too (each forked in the environment torchrun would give it, no launcher process);
    anything else, or warm=False, is a real subprocess. stdout=PIPE captures both streams (as
    text); any other value, neither."""
    from tests import warm as warm_runs

    argv = [str(os.fspath(a)) for a in cmd]
    found = _warm_argv(argv) if warm is not False else None
    if found is None or (found[2] > 1 and not warm):
        kw.setdefault("text", True)
        return subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=start_new_session, stdout=stdout,
                                stderr=stderr, **kw)  # fmt: skip
    script, launch_args, nproc = found
    env = dict(os.environ if env is None else env)
    if launch_args is not None:
        env = warm_runs.accelerate_env(launch_args, env)
    LAUNCHES["warm " + launch_kind(argv)] += 1
    capture = stdout == subprocess.PIPE
    if nproc == 1:
        return warm_runs.popen(script, env, cwd, start_new_session, capture=capture)
    assert launch_args is not None and "--main_process_port" in launch_args, "a port for the processes to meet on"
    port = int(launch_args[launch_args.index("--main_process_port") + 1])
    return warm_runs.WarmRanks(script, warm_runs.torchrun_envs(env, nproc, port), cwd, capture)


def run_cmd(cmd: list[Any], env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 600,
        warm: bool | None = None, **kw: Any) -> subprocess.CompletedProcess:  # fmt: skip
    """subprocess.run(cmd, capture_output=True, text=True, ...) through ``popen``."""
    kw.pop("capture_output", None)
    kw.pop("text", None)
    proc = popen(cmd, env, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, warm=warm, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(
    script: str, args: list[str], nproc: int = 1, timeout: float = 600, warm: bool | None = None, **kw: Any
) -> subprocess.CompletedProcess:
    """Run a tool under `accelerate launch` on CPU with nproc processes: one process is a warm
    fork in the environment accelerate gives it, several are with warm=True (see ``popen``);
    warm=False, the launcher itself."""
    env = tool_env(kw.pop("env", None))
    return run_cmd(launch_cmd(script, args, nproc), env=env, timeout=timeout, warm=warm, **kw)


def run_tool(
    name: str, *args: Any, env: dict[str, str | None] | None = None, warm: bool = True
) -> subprocess.CompletedProcess:
    """Run tools/<name> with plain `python` (no accelerate): a warm fork (see ``popen``)."""
    return run_cmd([sys.executable, str(ROOT / "tools" / name), *map(str, args)], env=tool_env(env), warm=warm)


def run_tool_in_process(name: str, *args: Any, threads: int | None = None) -> int:
    """tools/<name>'s main() in this process, with the exit code its command line would give
    (known input errors -> 2); much faster than a subprocess for the tools that need no launcher.
    threads=1: torch on one thread meanwhile, like a launched process (OMP_NUM_THREADS=1), for
    numbers compared exactly with a launched run's (the reductions' order follows the threads)."""
    import importlib.util

    from detector.core import errors

    spec = importlib.util.spec_from_file_location(f"tool_{Path(name).stem}", ROOT / "tools" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    LAUNCHES[f"in-process {name}"] += 1
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return errors.run_main(lambda: module.main([str(a) for a in args]))
    finally:
        torch.set_num_threads(before)


def train(out: Path, ds: dict[str, Path], *overrides: str, script: str = "train.py", **kw: Any) -> str:
    """A successful tiny training run into `out` (tiny.yaml + the dataset + overrides); its stdout."""
    res = launch(script, ["--config", str(TINY), f"output_dir={out}", *data_overrides(ds), *overrides], **kw)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def epoch_records(run: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]


def step_records(run: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]


def assert_same_weights(a: Path, b: Path) -> None:
    """Two weights files (best.pt / last.pt) hold bitwise equal model tensors."""
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def killed_mid_run_then_resumed(args: list, run: Path, reference: Path, kill_from: int, end: int) -> None:
    """A 1-process run of ``args`` into ``run`` SIGKILLed once a state of step ``kill_from`` or
    later exists (before the run's last state, of step ``end``), then resumed with
    train.resume=auto: its best.pt and last.pt must hold the weight average (train.ema=true) of
    the same epoch as ``reference``'s, bitwise."""
    from detector.train import checkpoint

    proc = popen(launch_cmd("train.py", [*args, f"output_dir={run}"]), env=tool_env(), start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not any(s.name >= f"step_{kill_from:08d}" for s in checkpoint.list_states(run)):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    states = checkpoint.list_states(run)
    assert states and states[-1].name < f"step_{end:08d}", "the run finished before it was killed"
    res = launch("train.py", [*args, f"output_dir={run}", "train.resume=auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("last.pt", "best.pt"):
        a = torch.load(reference / name, weights_only=True)
        b = torch.load(run / name, weights_only=True)
        assert a["ema"] is True and a["epoch"] == b["epoch"]
        assert_same_weights(reference / name, run / name)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_run(
    name: str,
    tiny_dataset: dict[str, Path],
    tmp_path_factory,
    *overrides: str,
    nproc: int = 1,
    env: dict[str, str | None] | None = None,
    warm: bool | None = None,
) -> tuple[Path, str]:
    """A tiny training run (tiny.yaml + the dataset + overrides on nproc processes, in tool_env(env))
    trained once per session: (its run directory, its stdout). Under pytest-xdist, one run shared
    by all workers: the first to need it trains it (on a copy of the dataset in the session's
    shared folder, since each worker writes its own), the others wait for it. The run directory
    holds only what training wrote; a test that changes it works on a copy."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process
        out = tmp_path_factory.mktemp(name)
        return out, train(out, tiny_dataset, *overrides, nproc=nproc, env=env, warm=warm)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    out, stdout, done = shared / name, shared / f"{name}.stdout", shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)
            stdout.write_text(
                train(out, _shared_dataset(tiny_dataset, shared), *overrides, nproc=nproc, env=env, warm=warm)
            )
            done.touch()
    return out, stdout.read_text()


def _shared_dataset(tiny_dataset: dict[str, Path], shared: Path) -> dict[str, Path]:
    """The tiny dataset copied once into the xdist session's shared folder (the same files)."""
    from filelock import FileLock

    root = shared / "trained_run_data"
    with FileLock(str(shared / "trained_run_data.lock")):
        if not (shared / "trained_run_data.done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(tiny_dataset["root"], root)
            (shared / "trained_run_data.done").touch()
    return {"root": root, "train": root / "train.json", "val": root / "val.json"}


@pytest.fixture(scope="session")
def trained_run(tiny_dataset, tmp_path_factory) -> Path:
    """One tiny training run (1 process, 6 epochs: a model that finds some objects) shared by
    the tests that need a checkpoint (once per session, see shared_run)."""
    return shared_run("trained_run", tiny_dataset, tmp_path_factory, "train.epochs=6")[0]


# One plain 2-process run of one epoch (16 images, batch 2 per process: global batch 4, 4 steps;
# plots on), shared by the tests that check such a run: its run directory (test_train), validation
# scoring the saved model (test_edges: evaluate.py --batch-size 2 must use the run's eval batches),
# and the local twin of the run that reads the dataset from S3 (test_storage: the loader in the
# main process). eval.batch_size=2 and data.num_workers=0 are tiny.yaml's own, said for the tests
# that rely on them; the plots are drawn after the epoch's metrics and weights are written. Both
# processes are warm forks in torchrun's environment (see popen); the launcher's own paths are
# tested by the fault tests, whose resumed runs must equal two_process_reference bitwise.
TWO_PROCESS_RUN = ["train.epochs=1", "eval.batch_size=2", "data.num_workers=0"]


@pytest.fixture(scope="session")
def two_process_run(tiny_dataset, tmp_path_factory) -> dict[str, Any]:
    """The 2-process run of TWO_PROCESS_RUN, trained once per session: {"run": its directory,
    "stdout": what training printed}."""
    run, stdout = shared_run("two_process_run", tiny_dataset, tmp_path_factory, *TWO_PROCESS_RUN, nproc=2, warm=True)
    return {"run": run, "stdout": stdout}


# The configuration whose 2-process runs are interrupted (SIGTERM, SLURM's SIGUSR1) and resumed
# by the tests that share ``two_process_reference``: 16 images, batch 2 per process, 4 steps per
# epoch, a state every 2 steps.
TWO_PROCESS_RESUME = ["train.epochs=2", "train.checkpoint_every_steps=2", "logging.plots=false"]


@pytest.fixture(scope="session")
def two_process_reference(tiny_dataset, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of TWO_PROCESS_RESUME: the weights an interrupted and
    resumed run of it must end with, bitwise (trained once per session, see shared_run)."""
    return shared_run("two_process_reference", tiny_dataset, tmp_path_factory, *TWO_PROCESS_RESUME, nproc=2, warm=True)[
        0
    ]


# The configuration whose 1-process runs are killed (SIGKILL: test_resume) or preempted (SIGTERM to
# the process group, DataLoader workers included: test_faults) and resumed: 16 images, batch 2,
# 8 steps per epoch, a state every 3 steps (3, 6, 8 at the end of epoch 1, then 9, 12 and 15 in
# epoch 2), all of them kept, two DataLoader workers.
ONE_PROCESS_RESUME = ["train.epochs=2", "train.checkpoint_every_steps=3", "train.keep_checkpoints=10",
                      "logging.plots=false", "data.num_workers=2"]  # fmt: skip


@pytest.fixture(scope="session")
def one_process_reference(tiny_dataset, tmp_path_factory) -> Path:
    """An uninterrupted 1-process run of ONE_PROCESS_RESUME (under accelerate launch): the
    weights an interrupted and resumed run of it must end with, bitwise, whether that run is
    launched by accelerate or by plain python (trained once per session, see shared_run)."""
    return shared_run("one_process_reference", tiny_dataset, tmp_path_factory, *ONE_PROCESS_RESUME)[0]


# W&B's API key in the environment of the W&B runs (a fake one): it must appear in no output or file.
WANDB_TEST_KEY = "local-0123456789abcdef0123456789abcdef01234567"

# One 1-epoch run logging to W&B offline (plots on: the image panel and tables), with the checkpoint
# and the dataset as artifacts, shared by test_tracking (which resumes a copy of it) and test_lineage.
WANDB_RUN = ["train.epochs=1", "logging.wandb.enabled=true", "logging.wandb.mode=offline", "logging.wandb.tags=[test]",
             "logging.wandb.log_checkpoint=true", "logging.wandb.dataset_artifact=tiny-shapes"]  # fmt: skip


@pytest.fixture(scope="session")
def wandb_offline_run(tiny_dataset, tmp_path_factory) -> dict[str, Any]:
    """The run of WANDB_RUN (W&B's own WANDB_MODE unset, WANDB_TEST_KEY set), trained once per
    session: {"run": its directory, untouched: copy it to resume or evaluate into it, "stdout"}."""
    run, stdout = shared_run("wandb_offline_run", tiny_dataset, tmp_path_factory, *WANDB_RUN,
                             env={"WANDB_MODE": None, "WANDB_API_KEY": WANDB_TEST_KEY})  # fmt: skip
    return {"run": run, "stdout": stdout}


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a shared run directory, for a test that resumes it or adds to it."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("RUNNING.lock"))
    return dest


# -- the training loop without a detector -------------------------------------------------------


def dummy_batches(n: int, images: int = 1, pixels: list[list[int]] | None = None) -> list[tuple[list, list, int]]:
    """n loader batches of `images` empty-target uint8 images, as the real loader yields them
    (images, targets, skipped). With `pixels`, image k of the whole sequence is a (3, 1, 1) image
    holding pixels[k]."""
    batches = []
    for b in range(n):
        imgs, tgts = [], []
        for i in range(images):
            k = b * images + i
            if pixels is None:
                imgs.append(torch.zeros(3, 4, 4, dtype=torch.uint8))
            else:
                imgs.append(torch.tensor(pixels[k], dtype=torch.uint8).view(3, 1, 1))
            tgts.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "dropped": 0})
        batches.append((imgs, tgts, 0))
    return batches


@pytest.fixture
def cpu_accelerator():
    """An Accelerator on the CPU for calling the engine directly (one process)."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@contextlib.contextmanager
def http_server(root: Path):
    """A quiet web server on 127.0.0.1 serving `root` (a remote image store that cannot list
    folders); yields its base URL and stops with the block."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


def vanishing_dataset(tiny_dataset: dict[str, Path], tmp_path: Path, split: str) -> tuple[dict, list[str], Path, dict]:
    """A copy of the tiny dataset whose first two images of ``split`` tests/scripts/vanish.py moves
    away after the first state: (dataset paths, those file names, where they go, the env that
    tells vanish.py)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset["root"], root)
    ds = {"root": root, "train": root / "train.json", "val": root / "val.json"}
    names = [im["file_name"] for im in json.loads(ds[split].read_text())["images"][:2]]
    gone = tmp_path / "gone"
    gone.mkdir()
    env = {"VANISH": os.pathsep.join(str(root / split / n) for n in names), "VANISH_TO": str(gone)}
    return ds, names, gone, env


def in_subprocess(
    target: str, *args: Any, env: dict[str, str | None] | None = None, timeout: float = 600
) -> tuple[Any, str]:
    """Call ``module:function(*args)`` in a python process of its own: (its json result, what the
    process printed). For tests that run the real wandb library, which keeps its service process and
    stream capture out of the pytest-xdist worker (a worker once died there; the cause turned out to
    be OpenVINO's signal stack, see detector.deploy.runtimes.keeping_signal_stack), and for a test
    whose failure would kill the process it runs in."""
    module, _, func = target.partition(":")
    code = (
        "import json, sys; from importlib import import_module; "
        f"print('\\n@@result ' + json.dumps(getattr(import_module({module!r}), {func!r})(*json.loads(sys.argv[1]))))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps([str(a) if isinstance(a, Path) else a for a in args])],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=tool_env(env),
    )
    LAUNCHES[f"subprocess {target}"] += 1
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    printed, _, rest = res.stdout.rpartition("\n@@result ")
    result, _, after = rest.partition("\n")  # wandb may still print as the process exits
    return json.loads(result), printed + after + res.stderr
