"""MkDocs hook: the tables of the docs that are read from the code when the site is built.

- The configuration reference (``<!-- config-keys -->``): one table per config section, read from
  the schema's dataclasses in detector/config.py (key, type, default) and the comments beside and
  above each field in the source.
- The layers (``<!-- layers -->``, ``<!-- import-rules -->``): the order and the rules
  tests/test_architecture.py enforces (its ``LAYERS``, ``FORBIDDEN`` and ``EXCEPTIONS``, with
  their comments).
- The public API (``<!-- public-api -->``): every name ``detector/__init__.py`` exports, the stage
  package that holds it, and a link to its API entry (a link that does not resolve fails the
  strict build).

Nothing in them is written by hand, so the pages cannot drift from the code.
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
API_MARKER = "<!-- public-api -->"
LAYERS_MARKER = "<!-- layers -->"
RULES_MARKER = "<!-- import-rules -->"


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


def _public_api(root: str) -> str:
    """The public names, from detector/__init__.py's table, found statically (griffe, as
    mkdocstrings reads the code): importing the stage packages would import torch."""
    import griffe

    import detector

    rows = ["| name | also | defined in | what |", "|---|---|---|---|"]
    for name, package in sorted(detector._PUBLIC.items(), key=lambda kv: kv[0].lower()):
        obj = griffe.load(package, search_paths=[root])[name]
        target = obj.target_path if obj.is_alias else obj.path
        value = str(obj.value) if obj.is_attribute and obj.value is not None else ""
        if value.isidentifier() and value in obj.parent.members:  # `load_config = load`: what it names
            target, obj = f"{obj.parent.path}.{value}", obj.parent[value]
        doc = obj.docstring.value.strip().splitlines()[0] if obj.docstring else ""
        rows.append(f"| `detector.{name}` | `{package}.{name}` | [`{target}`][{target}] | {_cell(doc)} |")
    return "\n".join(rows) + "\n"


def _layers(root: str) -> tuple[str, str]:
    """The architecture test's layer order and its rules, read from its source (not imported: it
    is a test module), with the comments that give each rule's reason."""
    path = Path(root) / "tests" / "test_architecture.py"
    source = path.read_text()
    comments, comment_only = _comments(source)
    values, lines = {}, {}
    for node in ast.parse(source).body:
        name = node.targets[0].id if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) else ""
        if name in ("LAYERS", "FORBIDDEN", "EXCEPTIONS"):
            values[name], lines[name] = ast.literal_eval(node.value), node
    order = " < ".join(f"**{name}**" for name in values["LAYERS"])
    head = f"{order}\n\n{_field_comment(lines['LAYERS'].lineno, comments, comment_only)}\n"
    out = [
        "| stage | must never reach, directly or through what it imports | why |",
        "|---|---|---|",
    ]
    entries = {ast.literal_eval(k): k.lineno for k in lines["FORBIDDEN"].value.keys}
    for stage, banned in values["FORBIDDEN"].items():
        why = comments.get(entries[stage], "") if entries[stage] not in comment_only else ""
        out.append(f"| `{stage}` | {', '.join(f'`{b}`' for b in banned)} | {_cell(why)} |")
    out += ["", "Exceptions:", "", "| module | may reach | why |", "|---|---|---|"]
    reason = _field_comment(lines["EXCEPTIONS"].lineno, comments, comment_only)
    for module, allowed in values["EXCEPTIONS"].items():
        out.append(f"| `{module}` | {', '.join(f'`{a}`' for a in allowed)} | {_cell(reason)} |")
    return head, "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the markers with the generated tables."""
    if not any(m in markdown for m in (MARKER, API_MARKER, LAYERS_MARKER, RULES_MARKER)):
        return markdown
    import sys

    root = str(Path(config["config_file_path"]).resolve().parent)
    if root not in sys.path:  # build from a checkout without `pip install -e .`
        sys.path.insert(0, root)
    from detector import config as config_module

    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _tables(config_module))
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, _public_api(root))
    if LAYERS_MARKER in markdown or RULES_MARKER in markdown:
        order, rules = _layers(root)
        markdown = markdown.replace(LAYERS_MARKER, order).replace(RULES_MARKER, rules)
    return markdown
