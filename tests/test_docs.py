"""The docs (README.md and docs/) show commands that run as written, and the generated
configuration reference lists every config key.

Each `tools/...py` command in a code block or a command-like code span is checked against the
tool itself: every long option must be one the tool's `--help` lists, every `key=value`
override of train.py a key of the schema, and every config or launch file it names must exist.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from detector import config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TOOL = re.compile(r"(?<![\w/.])(tools/(?:bench/)?\w+\.py)\b")


def _code_lines(text: str) -> list[str]:
    """The lines of fenced and indented code blocks, and the code spans that call a tool."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):  # the pages indent list items by 2, code by 4
            lines.append(line.strip())
        else:
            lines.extend(span for span in re.findall(r"`([^`]+)`", line) if TOOL.search(span) and " " in span)
    return lines


def _commands(text: str) -> list[str]:
    """Code lines joined across trailing backslashes, kept when they call a tool."""
    joined, current = [], ""
    for line in _code_lines(text):
        current += line.removeprefix("$ ")
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current)
        current = ""
    return [c for c in joined if TOOL.search(c)]


def _all_commands() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in _commands(page.read_text())]


@functools.cache
def _options(tool: str) -> set[str]:
    """The long options a tool's --help lists (the tools answer before importing torch)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / tool), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, f"{tool} --help failed: {out.stderr}"
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", out.stdout))


def _leaf_keys(cls: type, prefix: str = "") -> set[str]:
    keys = set()
    for f in fields(cls):
        sub = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        keys |= _leaf_keys(type(sub), f"{prefix}{f.name}.") if is_dataclass(sub) else {f"{prefix}{f.name}"}
    return keys


def _tokens(command: str) -> list[str]:
    command = command.split(" # ")[0]
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote in prose-like spans: split on blanks
        return command.split()


COMMANDS = _all_commands()


def test_the_docs_show_commands_of_every_user_tool() -> None:
    """The extraction finds the commands (so the checks below are not vacuous)."""
    tools = {TOOL.search(c).group(1) for _, c in COMMANDS}  # type: ignore[union-attr]
    for tool in ("tools/train.py", "tools/evaluate.py", "tools/infer.py", "tools/export.py", "tools/check_dataset.py"):
        assert tool in tools
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_a_documented_command_uses_only_what_its_tool_accepts(page: str, command: str) -> None:
    tokens = _tokens(command)
    for i, token in enumerate(tokens):
        if token in ("--config_file", "--config") and i + 1 < len(tokens):
            path = tokens[i + 1]
            assert "$" in path or (ROOT / path).is_file(), f"{page}: {path} does not exist"
    at = next(i for i, t in enumerate(tokens) if TOOL.fullmatch(t) or TOOL.search(t))
    tool = TOOL.search(tokens[at]).group(1)  # type: ignore[union-attr]
    assert (ROOT / tool).is_file(), f"{page}: {tool} does not exist"
    accepted = _options(tool)
    keys = _leaf_keys(config.Config)
    for token in tokens[at + 1 :]:
        if token in ("&&", "||", ";", "|", "&") or token.startswith(">"):
            break
        end = token.endswith(";")  # `...; done`: the command ends with this token
        token = token.removesuffix(";")
        option = token.split("=", 1)[0]
        if option.startswith("--"):
            assert option in accepted, f"{page}: {tool} has no option {option} (in: {command})"
        elif tool == "tools/train.py" and "=" in token and not token.startswith(("-", "/")):
            key = token.split("=", 1)[0]
            assert key in keys or any(k.startswith(key + ".") for k in keys), f"{page}: no config key {key!r}"
        if end:
            break


def _hook():
    spec = importlib.util.spec_from_file_location("generated", ROOT / "docs" / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_configuration_reference_lists_every_key_with_its_default() -> None:
    tables = _hook()._tables(config)
    for key in _leaf_keys(config.Config):
        assert f"| `{key}` |" in tables, f"{key} missing from the configuration reference"
    # a default and a comment come from the source, not from a copy
    assert "| `train.dist_timeout_minutes` | float | `10.0` | How long a process waits" in tables
    assert "| `data.on_invalid` | error / clip / repair | `clip` |" in tables


def test_the_configuration_page_holds_the_marker_the_hook_replaces() -> None:
    assert _hook().MARKER in (ROOT / "docs" / "configuration.md").read_text()


def test_the_api_reference_has_every_module() -> None:
    """A module added to the package is added to its layer's API page (docs/api/<layer>.md)."""
    shown = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        shown |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    for path in (ROOT / "detector").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        assert module in shown, f"{module} is on no page of docs/api/"


def test_the_generated_architecture_and_api_tables_follow_the_code() -> None:
    import detector

    hook = _hook()
    order, rules = hook._layers(str(ROOT))
    arch = importlib.util.spec_from_file_location("arch", ROOT / "tests" / "test_architecture.py")
    module = importlib.util.module_from_spec(arch)  # type: ignore[arg-type]
    arch.loader.exec_module(module)  # type: ignore[union-attr]
    assert order.startswith(" < ".join(f"**{name}**" for name in module.LAYERS) + "\n")
    for stage in module.FORBIDDEN:
        assert f"| `{stage}` |" in rules
    pytest.importorskip("griffe")  # mkdocstrings' code reader, in the dev extra
    api = hook._public_api(str(ROOT))
    for name in detector.__all__:
        assert f"| `detector.{name}` |" in api


def test_every_file_the_docs_name_exists() -> None:
    """Modules, tests, configs and tools named in the pages (the move renamed many)."""
    named = re.compile(r"(?<![\w/.])((?:detector|tests|tools|configs|launch)/[\w/]*\w(?:\.(?:py|yaml|sh|json))?/?)")
    found = [(page, path) for page in PAGES for path in named.findall(page.read_text())]
    assert len(found) > 100  # the pattern finds them (not a vacuous pass)
    assert [f"{page.relative_to(ROOT)}: {path}" for page, path in found if not (ROOT / path).exists()] == []
