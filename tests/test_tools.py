"""The after-training tools on a tiny trained checkpoint: Predictor, evaluate, infer, export,
check_dataset, plot_runs."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from detector.data.coco import CocoIndex
from detector.inference import Predictor

from .conftest import launch, run_tool, run_tool_in_process


def test_evaluate_predictions_file(tiny_dataset, tmp_path, capsys):
    idx = CocoIndex(tiny_dataset["val"])
    rows = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in idx.to_coco_gt()["annotations"]]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(rows))
    code = run_tool_in_process("evaluate.py", "--predictions", tmp_path / "r.json", "--annotations",
                               tiny_dataset["val"], "--output", tmp_path / "m.json", "--plots", tmp_path / "plots")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mAP"] == pytest.approx(1.0) and "AP/circle" in metrics
    assert (tmp_path / "plots" / "pr_curves.png").is_file()
    (tmp_path / "bad.json").write_text(json.dumps([{**rows[0], "image_id": 999}]))
    capsys.readouterr()
    code = run_tool_in_process(
        "evaluate.py", "--predictions", tmp_path / "bad.json", "--annotations", tiny_dataset["val"]
    )
    assert code == 2 and "1 result(s) name images that are not in" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_checkpoint_writes_results(trained_run, tiny_dataset, tmp_path):
    res = launch("evaluate.py", ["--checkpoint", str(trained_run / "best.pt"), "--annotations", str(tiny_dataset["val"]),
                 "--images", str(tiny_dataset["root"] / "val"), "--results", str(tmp_path / "res.json"),
                 "--output", str(tmp_path / "m.json"), "--num-workers", "0"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mAP50" in res.stdout and "triangle" in res.stdout
    rows = json.loads((tmp_path / "res.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= {3, 7, 12}


@pytest.mark.slow
def test_infer_tool(trained_run, tiny_dataset, tmp_path):
    out = tmp_path / "pred"
    res = run_tool("infer.py", "--checkpoint", trained_run / "best.pt", "--score-threshold", "0.01",
                   "--output", out, tiny_dataset["root"] / "val", str(tiny_dataset["root"] / "train" / "train_0000*.jpg"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    listing = json.loads((out / "images.json").read_text())
    images = listing["images"]
    assert len(images) == 7 + 10
    assert len(list(out.glob("*.png"))) == 17
    assert listing["categories"] == [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"},
                                     {"id": 12, "name": "triangle"}]  # fmt: skip
    # image ids index images.json, whose sizes are the files' own
    assert [im["id"] for im in images] == list(range(len(images)))
    for im in images:
        with Image.open(im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
    results = json.loads((out / "results.json").read_text())
    assert results, "no detection at all: the comparison below would be empty"
    assert {r["category_id"] for r in results} <= {3, 7, 12}  # the dataset's ids, not labels 1..3
    assert {r["image_id"] for r in results} <= set(range(len(images)))
    # the same detections from the Predictor (same threshold and batches), bbox xyxy -> xywh by hand
    p = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", score_threshold=0.01, batch_size=4)
    dets = p.predict([im["file_name"] for im in images])
    expected = []
    for image_id, det in enumerate(dets):
        for (x1, y1, x2, y2), c, s in zip(det.boxes.tolist(), det.category_ids.tolist(), det.scores.tolist()):
            expected.append((image_id, c, [x1, y1, x2 - x1, y2 - y1], s))
    assert len(results) == len(expected)
    for r, (image_id, c, bbox, s) in zip(results, expected):
        assert (r["image_id"], r["category_id"]) == (image_id, c)
        assert r["bbox"] == pytest.approx(bbox, abs=1e-4) and r["score"] == pytest.approx(s, abs=1e-6)
    res = run_tool("infer.py", "--checkpoint", trained_run / "best.pt", tmp_path / "nothing_here")
    assert res.returncode == 2 and "no such file, folder or glob match" in res.stderr


def test_check_dataset_tool(tiny_dataset, tmp_path, capsys):
    code = run_tool_in_process(
        "check_dataset.py", tiny_dataset["train"], tiny_dataset["root"] / "train", "--draw", "3", "--output", tmp_path
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "class histogram" in out and "problems: 0" in out
    assert len(list(tmp_path.glob("*.png"))) == 3
    bad = json.loads(tiny_dataset["train"].read_text())
    bad["annotations"][0]["bbox"] = [0, 0, -5, 5]
    bad["images"][1]["file_name"] = "missing.jpg"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code = run_tool_in_process("check_dataset.py", tmp_path / "bad.json", tiny_dataset["root"] / "train")
    out = capsys.readouterr().out
    assert code == 1
    assert "bbox width and height must be > 0" in out and "missing.jpg" in out


@pytest.mark.slow
def test_plot_runs_tool(trained_run, tmp_path):
    res = run_tool("plot_runs.py", trained_run, trained_run, "--output", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "compare_loss.png").is_file() and (tmp_path / "compare_map.png").is_file()


def test_check_dataset_decode_finds_truncated_images(tiny_dataset, tmp_path, capsys):
    """A JPEG cut short keeps a readable header: the header pass sees nothing, --decode names it."""
    import shutil

    root = tmp_path / "train"
    shutil.copytree(tiny_dataset["root"] / "train", root)
    name = json.loads(tiny_dataset["train"].read_text())["images"][3]["file_name"]
    raw = (root / name).read_bytes()
    (root / name).write_bytes(raw[: len(raw) // 2])
    assert run_tool_in_process("check_dataset.py", tiny_dataset["train"], root) == 0
    assert "problems: 0" in capsys.readouterr().out
    assert run_tool_in_process("check_dataset.py", tiny_dataset["train"], root, "--decode", "--workers", "2") == 1
    out = capsys.readouterr().out
    assert "problems: 1" in out and f"undecodable image: cannot decode image {root / name}" in out, out
    assert "decoded 15 of 16 image(s)" in out
