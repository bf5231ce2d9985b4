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
    # the golden help (tests/golden/interface.json) is compared in other checkouts: no path of this one
    assert "".join(str(ROOT).split()) not in "".join(res.stdout.split()), f"{tool} --help shows this checkout's path"
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
    for tool in ("check_dataset.py", "evaluate.py"):
        assert "--annotations JSON" in helps[tool] and "--images DIR" in helps[tool], tool
    assert "--annotations JSON" in helps["infer.py"]  # its images are its inputs
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
    formats = next(a.choices for a in _parser("convert_dataset")._actions if a.dest == "format")
    assert tuple(formats) == FORMATS


def _parser(tool: str):
    spec = importlib.util.spec_from_file_location(f"tool_{tool}", ROOT / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_earlier_spellings_are_still_accepted():
    evaluate = _parser("evaluate")
    assert evaluate.parse_args(["--predictions", "r.json", "--annotations", "a.json"]).workers == 2
    assert evaluate.parse_args(["--predictions", "r", "--annotations", "a", "--num-workers", "3"]).workers == 3
    assert _parser("infer").parse_args(["--checkpoint", "b.pt", "--output", "out", "x.jpg"]).output_dir == "out"
    check = _parser("check_dataset")
    args = check.parse_args(["a.json", "imgs", "--output", "d"])
    assert (args.annotations_arg, args.images_arg, args.output_dir) == ("a.json", "imgs", "d")
