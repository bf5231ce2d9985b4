"""The after-training tools on a tiny trained checkpoint: Predictor, evaluate, infer, export,
check_dataset, plot_runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detector.data.coco import CocoIndex
from detector.inference import Predictor

from .conftest import ROOT, launch

pytestmark = pytest.mark.slow


def _tool(name, *args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, **kw)  # fmt: skip


def test_predictor_inputs(trained_run, tiny_dataset):
    p = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", score_threshold=0.0)
    assert p.class_names == ["circle", "square", "triangle"]
    path = tiny_dataset["root"] / "val" / "val_00000.jpg"
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    outs = p.predict([path, pil, arr, tensor])
    assert len(outs) == 4
    for o in outs[1:]:
        np.testing.assert_allclose(o.boxes, outs[0].boxes, atol=1e-3)
    single = p.predict(path)
    assert len(single) == 1 and set(single[0].category_ids.tolist()) <= {3, 7, 12}
    assert all(n in p.class_names for n in single[0].names)


def test_evaluate_predictions_file(tiny_dataset, tmp_path):
    idx = CocoIndex(tiny_dataset["val"])
    rows = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in idx.to_coco_gt()["annotations"]]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(rows))
    res = _tool("evaluate.py", "--predictions", tmp_path / "r.json", "--annotations", tiny_dataset["val"],
                "--output", tmp_path / "m.json", "--plots", tmp_path / "plots")  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mAP"] == pytest.approx(1.0) and "AP/circle" in metrics
    assert (tmp_path / "plots" / "pr_curves.png").is_file()
    (tmp_path / "bad.json").write_text(json.dumps([{**rows[0], "image_id": 999}]))
    res = _tool("evaluate.py", "--predictions", tmp_path / "bad.json", "--annotations", tiny_dataset["val"])
    assert res.returncode == 2 and "1 result(s) name images that are not in" in res.stderr


def test_evaluate_checkpoint_writes_results(trained_run, tiny_dataset, tmp_path):
    res = launch("evaluate.py", ["--checkpoint", str(trained_run / "best.pt"), "--annotations", str(tiny_dataset["val"]),
                 "--images", str(tiny_dataset["root"] / "val"), "--results", str(tmp_path / "res.json"),
                 "--output", str(tmp_path / "m.json"), "--num-workers", "0"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mAP50" in res.stdout and "triangle" in res.stdout
    rows = json.loads((tmp_path / "res.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= {3, 7, 12}


def test_infer_tool(trained_run, tiny_dataset, tmp_path):
    out = tmp_path / "pred"
    res = _tool("infer.py", "--checkpoint", trained_run / "best.pt", "--score-threshold", "0.01",
                "--output", out, tiny_dataset["root"] / "val", str(tiny_dataset["root"] / "train" / "train_0000*.jpg"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    images = json.loads((out / "images.json").read_text())["images"]
    assert len(images) == 7 + 10
    assert len(list(out.glob("*.png"))) == 17
    json.loads((out / "results.json").read_text())
    res = _tool("infer.py", "--checkpoint", trained_run / "best.pt", tmp_path / "nothing_here")
    assert res.returncode == 2 and "no such file, folder or glob match" in res.stderr


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_and_parity(trained_run, tmp_path, fmt):
    out = tmp_path / f"model.{fmt}"
    res = _tool("export.py", "--checkpoint", trained_run / "best.pt", "--format", fmt, "--output", out,
                "--score-threshold", "0.05")  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    meta = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle"]
    assert meta["parity"]["labels_equal"] and meta["parity"]["max_box_diff"] <= 1.0
    assert meta["parity"]["detections"] > 0  # the check compared real detections
    if fmt == "onnx":
        import onnxruntime as ort

        h, w = meta["input"]["size_hw"]
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        boxes, labels, scores = sess.run(None, {"image": np.random.rand(3, h, w).astype(np.float32)})
        assert boxes.shape[1] == 4 and len(labels) == len(scores)


def test_check_dataset_tool(tiny_dataset, tmp_path):
    res = _tool(
        "check_dataset.py", tiny_dataset["train"], tiny_dataset["root"] / "train", "--draw", "3", "--output", tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "class histogram" in res.stdout and "problems: 0" in res.stdout
    assert len(list(tmp_path.glob("*.png"))) == 3
    bad = json.loads(tiny_dataset["train"].read_text())
    bad["annotations"][0]["bbox"] = [0, 0, -5, 5]
    bad["images"][1]["file_name"] = "missing.jpg"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = _tool("check_dataset.py", tmp_path / "bad.json", tiny_dataset["root"] / "train")
    assert res.returncode == 1
    assert "bbox width and height must be > 0" in res.stdout and "missing.jpg" in res.stdout


def test_plot_runs_tool(trained_run, tmp_path):
    res = _tool("plot_runs.py", trained_run, trained_run, "--output", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "compare_loss.png").is_file() and (tmp_path / "compare_map.png").is_file()
