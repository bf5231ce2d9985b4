"""MkDocs hook: the configuration reference's key tables, generated from detector/config.py.

The page holds a marker; at build time it is replaced by one table per config section, read
from the schema's dataclasses (key, type, default) and the comments beside and above each field
in the source. Nothing is written by hand, so the page cannot drift from the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
from pathlib import Path
from typing import Any

import yaml

MARKER = "<!-- config-keys -->"


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line number, and the lines that hold nothing but a comment."""
    by_line: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    return by_line, set(by_line) - code_lines


def _field_lines(tree: ast.Module) -> dict[tuple[str, str], int]:
    """(class name, field name) -> the line its annotation starts on."""
    lines = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    lines[(node.name, item.target.id)] = item.lineno
    return lines


def _field_comment(line: int, comments: dict[int, str], comment_only: set[int]) -> str:
    # The block of whole-line comments right above the field, then the one after it on its line:
    # the source puts a long explanation above and a short one beside.
    above = []
    n = line - 1
    while n in comment_only:
        above.insert(0, comments[n])
        n -= 1
    parts = above + ([comments[line]] if line in comments and line not in comment_only else [])
    return " ".join(parts)


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()


def _type(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    literal = re.fullmatch(r"Literal\[(.*)\](.*)", text)
    if literal:  # the values a Literal allows, as they are written in YAML
        values = [v.strip().strip("'\"") for v in literal.group(1).split(",")]
        text = " / ".join(values) + literal.group(2)
    return text.replace(" | None", ", or null").replace("None", "null")


def _cell(text: str) -> str:
    # Plain text in a table cell; inside a code span a pipe needs no escape (Python-Markdown)
    return text.replace("|", "\\|").replace("\n", " ")


def _tables(config_module: Any) -> str:
    source = inspect.getsource(config_module)
    comments, comment_only = _comments(source)
    lines = _field_lines(ast.parse(source))
    out: list[str] = []

    def section(cls: type, prefix: str) -> None:
        leaves, nested = [], []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                nested.append((f.name, type(default)))
                continue
            note = _field_comment(lines[(cls.__name__, f.name)], comments, comment_only)
            leaves.append(f"| `{prefix}{f.name}` | {_cell(_type(f.type))} | `{_value(default)}` | {_cell(note)} |")
        if leaves:
            title = prefix.rstrip(".") or "top level"
            out.append(f"### `{title}`\n")
            doc = inspect.getdoc(cls)
            if doc and not doc.startswith(f"{cls.__name__}("):  # a dataclass without a docstring gets its signature
                out.append(" ".join(doc.split()) + "\n")
            out.append("| key | type | default | note (from `detector/config.py`) |")
            out.append("|---|---|---|---|")
            out.extend(leaves)
            out.append("")
        for name, sub in nested:
            section(sub, f"{prefix}{name}.")

    section(config_module.Config, "")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker on the configuration page with the generated tables."""
    if MARKER not in markdown:
        return markdown
    import sys

    root = str(Path(config["config_file_path"]).resolve().parent)
    if root not in sys.path:  # build from a checkout without `pip install -e .`
        sys.path.insert(0, root)
    from detector import config as config_module

    return markdown.replace(MARKER, _tables(config_module))
