"""The built-in demo dataset generator."""

from __future__ import annotations

import hashlib
import json

from PIL import Image

from detector.data.coco import CocoIndex
from detector.data.synthetic import ensure_dataset, make_dataset
from tests.conftest import run_tool_in_process


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic(tmp_path):
    make_dataset(tmp_path / "a", 10, 4, seed=3)
    make_dataset(tmp_path / "b", 10, 4, seed=3)
    make_dataset(tmp_path / "c", 10, 4, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_quirks_of_real_exports(tmp_path):
    paths = make_dataset(tmp_path, 40, 8, seed=0)
    data = json.loads(paths["train"].read_text())
    ids = sorted(c["id"] for c in data["categories"])
    assert ids == [0, 3, 7, 12]  # non-contiguous, with an unused placeholder
    used = {a["category_id"] for a in data["annotations"]}
    assert used == {3, 7, 12}
    with_objects = {a["image_id"] for a in data["annotations"]}
    assert len(with_objects) < len(data["images"])  # some images have no objects
    sizes = {(im["width"], im["height"]) for im in data["images"]}
    assert len(sizes) >= 3 and any(w < h for w, h in sizes) and any(w > h for w, h in sizes)
    for im in data["images"][:5]:
        with Image.open(tmp_path / "train" / im["file_name"]) as f:
            assert f.format == "JPEG" and f.size == (im["width"], im["height"])
    index = CocoIndex(paths["train"])  # valid under the strict loader
    assert index.label_map.names == ("circle", "square", "triangle")


def test_ensure_generates_once(tmp_path):
    ensure_dataset(tmp_path, 4, 2, 0)
    stamp = (tmp_path / "train.json").stat().st_mtime_ns
    ensure_dataset(tmp_path, 4, 2, 0)
    assert (tmp_path / "train.json").stat().st_mtime_ns == stamp
    ensure_dataset(tmp_path, 5, 2, 0)  # other settings: regenerated
    assert len(json.loads((tmp_path / "train.json").read_text())["images"]) == 5


def test_tool(tmp_path):
    assert run_tool_in_process("make_synthetic_dataset.py", tmp_path, "--train", 3, "--val", 2) == 0
    assert len(list((tmp_path / "val").glob("*.jpg"))) == 2
