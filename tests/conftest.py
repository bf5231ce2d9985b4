"""Shared fixtures: tiny datasets written to tmp dirs, and helpers to launch the tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"

sys.path.insert(0, str(ROOT))


def write_coco(path: Path, images: list, annotations: list, categories: list, **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories, **extra}))
    return path


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


def launch(
    script: str, args: list[str], nproc: int = 1, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess:
    """Run a tool under `accelerate launch` on CPU with nproc processes."""
    launch_cfg = ROOT / "launch" / ("cpu.yaml" if nproc == 1 else "cpu2.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_cfg)]
    if nproc > 1:
        cmd += ["--num_processes", str(nproc), "--main_process_port", str(_free_port())]
    cmd += [str(ROOT / "tools" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    for k, v in kw.pop("env", {}).items():  # None unsets a variable
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def trained_run(tiny_dataset, tmp_path_factory) -> Path:
    """One tiny training run (1 process, 6 epochs: a model that finds some objects) shared by
    the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("run")
    res = launch(
        "train.py", ["--config", str(TINY), f"output_dir={out}", "train.epochs=6", *data_overrides(tiny_dataset)]
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out
