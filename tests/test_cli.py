"""The tools' shared command-line grammar: fast --help, defaults shown, the same flags for the same things."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from .conftest import ROOT

TOOLS = sorted(p.relative_to(ROOT / "tools").as_posix() for p in (ROOT / "tools").rglob("*.py"))


def _imported(stderr: str) -> set[str]:
    """Module names that ``python -X importtime`` reports."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize("tool", TOOLS)
def test_help_answers_without_importing_torch_and_shows_defaults(tool):
    res = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "tools" / tool), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    heavy = {"torch", "torchvision", "numpy", "accelerate", "albumentations", "cv2"} & _imported(res.stderr)
    assert not heavy, f"{tool} --help imports {sorted(heavy)}"
    assert "usage:" in res.stdout
    if tool != "train.py":  # train.py's only option is the required --config
        assert "(default:" in res.stdout, f"{tool} --help shows no defaults"


def test_the_same_thing_has_the_same_flag_in_every_tool():
    helps = {}
    for tool in TOOLS:
        res = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True, cwd=ROOT
        )
        helps[tool] = res.stdout
    for tool, text in helps.items():
        assert "--num-workers" not in text, f"{tool}: loader workers are --workers"
    for tool in ("check_dataset.py", "evaluate.py", "convert_dataset.py"):
        assert "--annotations" in helps[tool] and "--images" in helps[tool], tool
    for tool in ("infer.py", "check_dataset.py", "plot_runs.py", "split_dataset.py"):
        assert "--output-dir DIR" in helps[tool], f"{tool}: a folder of outputs is --output-dir"


def test_the_parsers_choices_are_the_packages():
    """The tools' parsers name choices without importing the package's heavy modules: they must
    stay the choices the package takes."""
    import typing

    from detector import cli
    from detector.config import DataConfig
    from detector.data.convert import FORMATS

    assert typing.get_args(typing.get_type_hints(DataConfig)["on_invalid"]) == cli.ON_INVALID
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools" / "convert_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    formats = next(a.choices for a in tool.build_parser()._actions if a.dest == "format")
    assert tuple(formats) == FORMATS
