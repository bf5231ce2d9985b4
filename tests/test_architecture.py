"""The package's layers: every import of every module (those inside functions too) parsed, and
checked against the layers the docs' architecture page states. Zero cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "detector"

# Lowest first: a module may import its own package and the packages of lower layers only.
LAYERS = ["core", "cli", "config", "models", "data", "evaluation", "runs", "inference", "deploy", "train"]
# What a stage must never reach, directly or through what it imports.
FORBIDDEN = {
    "detector.inference": ("detector.train", "detector.runs", "detector.data.transforms"),
    "detector.deploy": ("detector.train", "detector.runs", "detector.data.transforms"),
    "detector.deploy.exported": ("detector.models",),  # the exported-model predictor: no torchvision zoo
    "detector.evaluation": ("detector.models",),
    "detector.models": ("detector.data",),
}
# The one stated exception: int8's accuracy cost is measured on the val json, whose images are read
# exactly as evaluation reads them (CocoDetection, without augmentation: the same pixels).
EXCEPTIONS = {"detector.deploy.quantize": ("detector.data",)}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The detector modules ``name`` imports, wherever the import statement is (module level,
    functions, methods); imports under ``if TYPE_CHECKING:`` never run and are left out. An import
    of a package names its __init__; ``from pkg import mod`` names the module."""

    def resolve(dotted: str) -> str:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names if a.name.split(".")[0] == "detector")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            if base.split(".")[0] == "detector":
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.add(sub if sub in known else resolve(base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    found.discard("")
    return found


def graph(with_packages: bool = False) -> dict[str, set[str]]:
    """Module -> the detector modules it imports. ``with_packages``: also the packages an import
    runs first (importing detector.a.b runs detector/a/__init__.py), for what a stage reaches. A
    package's own __init__ importing its modules is no cycle; a module importing its package is."""
    known = modules()
    edges = {m: imports_of(m, p, known) for m, p in known.items()}
    if with_packages:
        for m, targets in list(edges.items()):
            extra = set()
            for t in [m, *targets]:
                parts = t.split(".")
                extra |= {".".join(parts[:i]) for i in range(2, len(parts))}
            edges[m] = (targets | extra) - {m}
    return edges


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # detector/__init__.py: the public API, above everything
        return len(LAYERS)
    return LAYERS.index(parts[1])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def reach(edges: dict[str, set[str]], start: str, skip: tuple[str, ...] = ()) -> set[str]:
    """Every module ``start`` imports, directly or through others (not through ``skip``)."""
    seen, todo = set(), [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen and not (skip and w.startswith(skip)):
                seen.add(w)
                todo.append(w)
    return seen


def test_every_module_is_in_a_layer_and_says_what_it_holds():
    for name, path in modules().items():
        assert name == "detector" or name.split(".")[1] in LAYERS, f"{name}: not in a layer of LAYERS"
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{path}: no docstring saying what it holds"


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_imports_go_down_the_layers_only():
    edges = graph()
    upward = [
        f"{m} imports {w}"
        for m, targets in sorted(edges.items())
        for w in sorted(targets)
        if w != "detector" and layer(w) > layer(m)
    ]
    assert upward == []


def test_stages_do_not_reach_what_they_must_not():
    edges = graph(with_packages=True)
    bad = []
    for stage, banned in FORBIDDEN.items():
        for m in edges:
            if m == stage or m.startswith(stage + "."):
                closure = reach(edges, m, EXCEPTIONS.get(m, ()))
                bad += [f"{m} reaches {w}" for w in sorted(closure) if w.startswith(banned)]
    assert bad == []


def test_the_checker_sees_cycles_function_level_imports_and_type_checking_blocks(tmp_path):
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import detector.b\n"
    src += "def f():\n    from detector import c\n"
    (tmp_path / "a.py").write_text(src)
    known = {"detector.a": tmp_path / "a.py", "detector.b": tmp_path / "b.py", "detector.c": tmp_path / "c.py"}
    assert imports_of("detector.a", tmp_path / "a.py", known) == {"detector.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_public_api_is_importable_from_the_top_and_from_each_stage():
    import importlib
    import subprocess
    import sys

    import detector

    expected = {
        "Predictor",
        "ExportedPredictor",
        "load_config",
        "Config",
        "build_model",
        "load_model",
        "Detections",
        "SliceSpec",
        "exported_predictor",
        "make_accelerator",
        "run_main",
    }
    assert set(detector.__all__) == expected
    for name in detector.__all__:
        stage = importlib.import_module(detector._PUBLIC[name])
        assert getattr(detector, name) is getattr(stage, name), name
        assert getattr(stage, name).__doc__, f"{name}: no docstring for the API reference"
    from detector.config import load

    assert detector.load_config is load
    # `import detector` (and so every tool's --help) does not import torch
    code = "import sys, detector; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "False"
    )


def test_no_two_modules_have_names_a_letter_apart():
    """runtime.py beside runtimes.py was one letter from the other module; a name used in two
    packages (data/coco.py, evaluation/coco.py) is as easy to confuse."""
    names = sorted({n.rpartition(".")[2] for n in modules() if n.count(".") >= 1 and not n.endswith("__init__")})

    def near(a: str, b: str) -> bool:  # edit distance <= 1
        if abs(len(a) - len(b)) > 1:
            return False
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        return a[i + 1 :] == b[i + 1 :] or a[i:] == b[i + 1 :] or a[i + 1 :] == b[i:]

    stems = [n.rpartition(".")[2] for n in modules() if n != "detector"]
    twice = sorted({s for s in stems if stems.count(s) > 1} - set(LAYERS))
    assert twice == [], f"module names used in two packages: {twice}"
    assert [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if near(a, b)] == []


def test_the_training_script_shows_the_run_on_one_screen():
    """tools/train.py's main reads top to bottom as the run (issue 23): at most 60 lines and no
    lines kept past the formatter."""
    source = (ROOT / "tools" / "train.py").read_text()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 60, f"tools/train.py main is {main.end_lineno - main.lineno + 1} lines"
    assert "fmt: skip" not in source and "fmt: off" not in source
