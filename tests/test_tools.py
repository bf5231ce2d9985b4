"""The after-training tools on a tiny trained checkpoint: Predictor, evaluate, infer, export,
check_dataset, plot_runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from detector.data.coco import CocoIndex
from detector.inference.predictor import Predictor

from .conftest import ROOT, TINY, data_overrides, run_tool_in_process


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
def test_evaluate_checkpoint_writes_results(trained_run, tiny_dataset, tmp_path, capsys):
    capsys.readouterr()
    code = run_tool_in_process("evaluate.py", "--checkpoint", trained_run / "best.pt", "--annotations",
                               tiny_dataset["val"], "--images", tiny_dataset["root"] / "val", "--results",
                               tmp_path / "res.json", "--output", tmp_path / "m.json", "--workers", "0")  # fmt: skip
    said = capsys.readouterr()
    assert code == 0, said.err[-2000:]
    assert "mAP50" in said.out and "triangle" in said.out
    rows = json.loads((tmp_path / "res.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= {3, 7, 12}


@pytest.mark.slow
def test_infer_tool(trained_run, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "pred"
    # in this process (infer.py decodes in its own process by default: --workers 0)
    code = run_tool_in_process("infer.py", "--checkpoint", trained_run / "best.pt", "--score-threshold", "0.01",
                               "--output", out, tiny_dataset["root"] / "val",
                               str(tiny_dataset["root"] / "train" / "train_0000*.jpg"))  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
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
    capsys.readouterr()
    code = run_tool_in_process("infer.py", "--checkpoint", trained_run / "best.pt", tmp_path / "nothing_here")
    assert code == 2 and "no such file, folder or glob match" in capsys.readouterr().err


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
def test_plot_runs_tool(trained_run, tmp_path, capsys):
    code = run_tool_in_process("plot_runs.py", trained_run, trained_run, "--output", tmp_path)
    assert code == 0, capsys.readouterr().err
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


# -- results' image ids: infer.py --annotations, evaluate.py --predictions --------------------------


def test_ids_by_file_name_matches_the_longest_trailing_path():
    from detector.inference.folders import ids_by_file_name

    images = [{"id": 5, "file_name": "a.jpg"}, {"id": 6, "file_name": "val/a.jpg"}, {"id": 7, "file_name": "b.jpg"}]
    files = ["/x/val/a.jpg", "/y/a.jpg", "c.jpg", "s3://bucket/b.jpg", "val\\a.jpg"]
    assert ids_by_file_name(files, images) == [6, 5, None, 7, 6]


def _listing(folder, names_ids: list[tuple[str, int]], rows: list[dict]):
    """A results.json and the images.json beside it, as tools/infer.py writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"/somewhere/{n}", "height": 1, "width": 1} for n, i in names_ids]
    (folder / "images.json").write_text(json.dumps({"images": images, "categories": []}))
    (folder / "results.json").write_text(json.dumps(rows))
    return folder / "results.json"


def test_evaluate_refuses_results_keyed_by_position(tiny_dataset, tmp_path, capsys):
    """Results whose images.json gives their ids other files than the ground truth does (infer.py's
    positions) are refused, naming the fix; the same rows keyed by the dataset's ids are scored."""
    gt = json.loads(tiny_dataset["val"].read_text())
    shifted = {**gt, "images": [{**im, "id": im["id"] + 1} for im in gt["images"]],
               "annotations": [{**a, "image_id": a["image_id"] + 1} for a in gt["annotations"]]}  # fmt: skip
    ann = tmp_path / "val_1based.json"
    ann.write_text(json.dumps(shifted))
    by_name = {im["file_name"]: im["id"] for im in shifted["images"]}
    rows = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in shifted["annotations"]]  # fmt: skip
    names = sorted(by_name)
    position = {by_name[n]: k for k, n in enumerate(names)}  # what infer.py wrote without --annotations
    bad = _listing(tmp_path / "positions", [(n, k) for k, n in enumerate(names)],
                   [{**r, "image_id": position[r["image_id"]]} for r in rows])  # fmt: skip
    code = run_tool_in_process("evaluate.py", "--predictions", bad, "--annotations", ann)
    err = capsys.readouterr().err
    assert code == 2 and f"for {len(names)} of {len(names)} images" in err and "infer.py --annotations" in err, err
    good = _listing(tmp_path / "ids", [(n, by_name[n]) for n in names], rows)
    assert run_tool_in_process("evaluate.py", "--predictions", good, "--annotations", ann,
                               "--output", tmp_path / "m.json") == 0  # fmt: skip
    assert json.loads((tmp_path / "m.json").read_text())["mAP"] == pytest.approx(1.0)
    stranger = _listing(tmp_path / "stranger", [(n, by_name[n]) for n in names] + [("other.jpg", 999)],
                        rows + [{**rows[0], "image_id": 999}])  # fmt: skip
    code = run_tool_in_process("evaluate.py", "--predictions", stranger, "--annotations", ann)
    err = capsys.readouterr().err
    assert code == 2 and "1 image(s) with results are not in" in err and "other.jpg" in err, err


def test_evaluate_output_in_a_missing_folder_is_made(tiny_dataset, tmp_path):
    idx = CocoIndex(tiny_dataset["val"])
    rows = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in idx.to_coco_gt()["annotations"]]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(rows))
    out = tmp_path / "not" / "yet" / "m.json"
    assert run_tool_in_process("evaluate.py", "--predictions", tmp_path / "r.json", "--annotations",
                               tiny_dataset["val"], "--output", out) == 0  # fmt: skip
    assert json.loads(out.read_text())["mAP"] == pytest.approx(1.0)


@pytest.mark.parametrize("tool", ["infer.py", "evaluate.py"])
def test_score_threshold_outside_0_1_is_a_usage_error(tool, tiny_dataset, tmp_path, capsys):
    args = ["--checkpoint", tmp_path / "no.pt", "--score-threshold", 5]
    args += [tiny_dataset["root"] / "val"] if tool == "infer.py" else ["--annotations", tiny_dataset["val"]]
    with pytest.raises(SystemExit) as exc:  # before the checkpoint is read
        run_tool_in_process(tool, *args)
    assert exc.value.code == 2 and "--score-threshold 5.0 is not in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["infer.py", "evaluate.py"])
def test_slice_without_supervision_names_the_extra_before_any_work(tool, tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "supervision", None)  # import supervision raises ImportError
    args = ["--checkpoint", tmp_path / "no.pt", "--slice", 128]  # a missing checkpoint: no work was done
    args += [tiny_dataset["root"] / "val"] if tool == "infer.py" else ["--annotations", tiny_dataset["val"],
                                                                        "--images", tiny_dataset["root"] / "val"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_tool_in_process(tool, *args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pip install 'detector[slicing]'" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_infer_writes_the_datasets_ids_for_evaluate(trained_run, tiny_dataset, tmp_path, capsys):
    """infer.py --annotations writes the dataset's ids (1-based here, files in another order than
    the ids, a blank image first): evaluate.py --predictions scores them as evaluate.py
    --checkpoint scores the same detections; without --annotations evaluate refuses them."""
    gt = json.loads(tiny_dataset["val"].read_text())
    src = tiny_dataset["root"] / "val"
    folder = tmp_path / "images"
    folder.mkdir()
    images = []
    for k, im in enumerate(sorted(gt["images"], key=lambda im: im["file_name"], reverse=True)):
        (folder / im["file_name"]).write_bytes((src / im["file_name"]).read_bytes())
        images.append({**im, "id": k + 1})
    Image.new("RGB", (64, 48)).save(folder / "0000_blank.jpg")  # sorted first, no objects
    images.append({"id": len(images) + 1, "file_name": "0000_blank.jpg", "width": 64, "height": 48})
    new_id = {im["file_name"]: im["id"] for im in images}
    old_name = {im["id"]: im["file_name"] for im in gt["images"]}
    anns = [{**a, "image_id": new_id[old_name[a["image_id"]]]} for a in gt["annotations"]]
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({**gt, "images": images, "annotations": anns}))
    ckpt = trained_run / "best.pt"
    common = ["--checkpoint", ckpt, "--no-draw", "--score-threshold", 0.01]
    assert run_tool_in_process("infer.py", *common, "--annotations", ann, "--output", tmp_path / "ids", folder) == 0
    listed = json.loads((tmp_path / "ids" / "images.json").read_text())["images"]
    assert {Path(im["file_name"]).name: im["id"] for im in listed} == new_id
    rows = json.loads((tmp_path / "ids" / "results.json").read_text())
    assert rows and {r["image_id"] for r in rows} <= set(new_id.values())
    assert run_tool_in_process("evaluate.py", "--predictions", tmp_path / "ids" / "results.json",
                               "--annotations", ann, "--output", tmp_path / "m.json") == 0  # fmt: skip
    scored = json.loads((tmp_path / "m.json").read_text())
    assert run_tool_in_process("evaluate.py", "--checkpoint", ckpt, "--annotations", ann, "--images", folder,
                               "--score-threshold", 0.01, "--num-workers", 0, "--output", tmp_path / "c.json") == 0  # fmt: skip
    assert scored["mAP"] > 0 and scored["mAP"] == pytest.approx(
        json.loads((tmp_path / "c.json").read_text())["mAP"], abs=0.02
    )
    assert run_tool_in_process("infer.py", *common, "--output", tmp_path / "pos", folder) == 0
    capsys.readouterr()
    assert run_tool_in_process("evaluate.py", "--predictions", tmp_path / "pos" / "results.json",
                               "--annotations", ann) == 2  # fmt: skip
    assert "infer.py --annotations" in capsys.readouterr().err
    (folder / "stray.jpg").write_bytes((folder / "0000_blank.jpg").read_bytes())
    assert run_tool_in_process("infer.py", *common, "--annotations", ann, "--output", tmp_path / "x", folder) == 2
    assert "1 of 9 image(s) are not in" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_evaluate_names_its_own_on_invalid_flag(trained_run, tiny_dataset, tmp_path, capsys):
    gt = json.loads(tiny_dataset["val"].read_text())
    renamed = {**gt, "categories": [{**c, "name": c["name"] + "_x"} for c in gt["categories"]]}
    (tmp_path / "val.json").write_text(json.dumps(renamed))
    code = run_tool_in_process("evaluate.py", "--checkpoint", trained_run / "best.pt", "--annotations",
                               tmp_path / "val.json", "--images", tiny_dataset["root"] / "val", "--num-workers", 0)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "categories do not match" in err and "--on-invalid repair" in err
    assert "data.on_invalid" not in err


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_says_what_it_would_measure_and_exits_0(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_tool_in_process("bench/gpu_check.py", "--steps", "200") == 0
    out = capsys.readouterr().out
    assert "no CUDA device here" in out and "200 steps" in out
    assert all(p in out for p in ("fp32", "fp16", "bf16", "images/s", "waiting for data", "peak memory"))


def test_gpu_check_reports_a_precision_whose_loss_drifts():
    rows = [
        {"precision": "fp32", "first_loss": 2.0, "final_loss": 1.0, "finite": True},
        {"precision": "fp16", "first_loss": 2.01, "final_loss": 1.3, "finite": True},  # final 30% off
        {"precision": "bf16", "first_loss": 2.0, "final_loss": 1.0, "finite": False},
    ]
    problems = _gpu_check().agreement(rows, 0.02, 0.15)
    assert len(problems) == 2
    assert problems[0].startswith("fp16: final_loss 1.3000 is 30.0% from fp32's 1.0000")
    assert problems[1] == "bf16: a loss was not finite"
    assert _gpu_check().agreement(rows[:1], 0.02, 0.15) == []


@pytest.mark.slow
def test_gpu_check_runs_its_three_precisions_on_a_cpu(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "check.json"
    args = ["--device", "cpu", "--steps", "4", "--workers", "0", "--config", TINY, "--json", out]
    rc = run_tool_in_process("bench/gpu_check.py", *args, *data_overrides(tiny_dataset))
    report = json.loads(out.read_text())
    assert [r["precision"] for r in report["rows"]] == ["fp32", "fp16", "bf16"]
    for r in report["rows"]:
        assert r["finite"] and r["images_per_s"] > 0 and 0 <= r["data_wait_share"] < 1 and r["peak_memory_mib"] > 0
    assert rc == (1 if report["problems"] else 0)
    printed = capsys.readouterr().out
    assert printed.count("img/s") == 3 and ("the precisions agree" in printed) == (rc == 0)


def test_bench_tta_holds_the_target_only_for_evaluations_in_a_row():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tta", ROOT / "tools" / "bench" / "bench_tta.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    curve = [{"epoch": e + 1, "mAP50": v} for e, v in enumerate([0.5, 0.82, 0.79, 0.81, 0.85, 0.9, 0.7])]
    assert bench.held(curve, 0.8, 3)["epoch"] == 4  # epoch 2 reaches it but falls back at epoch 3
    assert bench.held(curve, 0.8, 4) is None
    assert bench.held(curve, 0.95, 1) is None
