"""The user-facing interface stays as it is: every tool's --help and the config schema (keys and
defaults) against tests/golden/interface.json, taken before the package moved into stages
(issue 23; only the module paths its texts name changed). A deliberate change regenerates it:

    python tests/scripts/interface.py > tests/golden/interface.json
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "interface.json").read_text())


def _snapshot():
    import importlib.util

    spec = importlib.util.spec_from_file_location("interface", ROOT / "tests" / "scripts" / "interface.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_schema_keys_and_defaults_are_unchanged():
    assert _snapshot().schema() == GOLDEN["schema"]


@pytest.mark.parametrize("tool", sorted(GOLDEN["help"]))
def test_tool_help_is_unchanged(tool):
    snap = _snapshot()
    assert snap.help_text(ROOT / tool) == GOLDEN["help"][tool]


def test_every_tool_is_in_the_golden_file():
    assert sorted(t.relative_to(ROOT).as_posix() for t in _snapshot().tools()) == sorted(GOLDEN["help"])
