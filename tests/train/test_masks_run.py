"""Mask R-CNN through the real commands: one tiny 1-epoch run shared by the tests here (train,
evaluate on 1 and 2 processes, evaluate a results file, Predictor, infer, ONNX export)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from detector.config import COCO_STATS
from tests.conftest import ROOT, data_overrides, epoch_records, launch, run_tool_in_process
from tests.deploy.test_deploy import exif_rotated_jpeg, exported_like_predictor, shaped_images

TINY_MASK = ROOT / "tests" / "configs" / "tiny_mask.yaml"


pytestmark = [pytest.mark.xdist_group("masks_run")]  # its module fixture is built once, on one xdist worker


@pytest.fixture(scope="module")
def mask_run(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mask_run")
    args = ["--config", TINY_MASK, f"output_dir={out}", "train.epochs=1", "model.box_score_thresh=0.01",
            "model.box_detections_per_img=20",
            "eval.best_metric=val/segm/mAP50", "eval.analysis=false", *data_overrides(tiny_dataset)]  # fmt: skip
    res = launch("train.py", args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "segm mAP" in res.stdout  # the epoch line
    return out


def _evaluate(run: Path, ds: dict, out: Path, nproc: int) -> tuple[dict, list]:
    args = ["--checkpoint", run / "best.pt", "--annotations", ds["val"], "--images", ds["root"] / "val",
            "--batch-size", "2", "--num-workers", "0", "--output", out / f"{nproc}.json",
            "--results", out / f"{nproc}_rows.json"]  # fmt: skip
    if nproc == 1:  # in this process, on one thread like each launched process (OMP_NUM_THREADS=1)
        assert run_tool_in_process("evaluate.py", *args, threads=1) == 0
    else:
        res = launch("evaluate.py", args, nproc=nproc, warm=True)
        assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / f"{nproc}.json").read_text()), json.loads((out / f"{nproc}_rows.json").read_text())


@pytest.mark.slow
def test_eval_analysis_false_writes_no_analysis(mask_run):
    """eval.analysis=false (this run's): no analysis.json, analysis_best.json or plots/analysis/,
    while the other plots are written (tests/evaluation/test_analysis.py checks the default run has them)."""
    assert not (mask_run / "analysis.json").exists() and not (mask_run / "analysis_best.json").exists()
    assert not (mask_run / "plots" / "analysis").exists()
    assert (mask_run / "plots" / "val_predictions.png").is_file()


@pytest.mark.slow
def test_run_records_bbox_and_segm_stats(mask_run):
    record = epoch_records(mask_run)[-1]
    for stat in COCO_STATS:
        assert f"val/{stat}" in record and f"val/segm/{stat}" in record
    assert "val/loss_mask" in record and "train/loss_mask" in record
    assert record["val/loss_mask"] > 0
    with open(mask_run / "results.csv") as f:
        header = next(csv.reader(f))
    assert {"val/segm/mAP", "val/segm/mAP50", "val/mAP"} <= set(header)
    assert (mask_run / "best.pt").is_file()  # chosen by a segm stat
    assert (mask_run / "plots" / "val_predictions.png").is_file()


@pytest.mark.slow
def test_two_processes_evaluate_like_one_bbox_and_segm(mask_run, tiny_dataset, tmp_path):
    stats1, rows1 = _evaluate(mask_run, tiny_dataset, tmp_path, 1)
    stats2, rows2 = _evaluate(mask_run, tiny_dataset, tmp_path, 2)
    assert len(rows1) > 0 and all("segmentation" in r for r in rows1)
    sizes = {(im["height"], im["width"]) for im in json.loads(tiny_dataset["val"].read_text())["images"]}
    assert {tuple(r["segmentation"]["size"]) for r in rows1} <= sizes  # at the json's image size
    assert rows1 == rows2
    for stat in COCO_STATS:
        assert stats1[f"segm/{stat}"] == stats2[f"segm/{stat}"], stat
        assert stats1[stat] == stats2[stat], stat
    assert stats1["loss_mask"] == pytest.approx(stats2["loss_mask"], abs=1e-9)
    # the checkpoint scored in training (1 process) gives the same segm stats
    record = epoch_records(mask_run)[-1]
    assert all(record[f"val/segm/{s}"] == stats1[f"segm/{s}"] for s in COCO_STATS)
    # scoring the written results file gives the same stats again
    assert run_tool_in_process("evaluate.py", "--predictions", tmp_path / "1_rows.json", "--annotations",
                               tiny_dataset["val"], "--output", tmp_path / "file.json") == 0  # fmt: skip
    from_file = json.loads((tmp_path / "file.json").read_text())
    assert all(from_file[f"segm/{s}"] == pytest.approx(stats1[f"segm/{s}"]) for s in COCO_STATS)


@pytest.mark.slow
def test_predictor_masks_and_infer(mask_run, tiny_dataset, tmp_path):
    from detector.inference.predictor import Predictor

    image = sorted((tiny_dataset["root"] / "val").glob("*.jpg"))[1]
    w, h = Image.open(image).size
    det = Predictor.from_checkpoint(mask_run / "best.pt", "cpu", score_threshold=0.01).predict(image)[0]
    assert len(det) > 0 and det.masks is not None
    assert det.masks.shape == (len(det), h, w) and det.masks.dtype == bool
    decoded = mask_utils.decode(det.rles())
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), det.masks)
    code = run_tool_in_process("infer.py", "--checkpoint", mask_run / "best.pt", "--score-threshold", "0.01",
                               "--output", tmp_path / "pred", image)  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert rows and all(r["segmentation"]["size"] == [h, w] for r in rows)
    assert len(list((tmp_path / "pred").glob("*.png"))) == 1


@pytest.mark.slow
def test_onnx_export_includes_the_mask_head(mask_run, tiny_dataset, tmp_path):
    image = sorted((tiny_dataset["root"] / "val").glob("*.jpg"))[1]
    code = run_tool_in_process("export.py", "--checkpoint", mask_run / "best.pt", "--format", "onnx", "--output",
                               tmp_path / "m.onnx", "--score-threshold", "0.05", "--samples", image)  # fmt: skip
    info = json.loads((tmp_path / "m.onnx.json").read_text())
    assert code == 0, info["parity"]
    assert "masks" in info["outputs"]["order"]
    assert info["parity"]["mask_pairs"] > 0 and info["parity"]["min_mask_iou"] >= 0.95
    # any input size: ExportedPredictor like the Predictor (boxes and full-size masks) on three
    # aspect ratios at two sizes and on an EXIF-rotated file decoded at reduced scale
    assert info["input"]["size_hw"] == "any" and len(info["parity"]["shapes_hw"]) == 11  # 1 sample, 6 crops, 4 scales
    exif_rotated_jpeg(image, tmp_path / "rotated.jpg")
    figures = exported_like_predictor(tmp_path / "m.onnx", mask_run / "best.pt",
                                      [tmp_path / "rotated.jpg", *shaped_images(image)], 0.05)  # fmt: skip
    assert figures["min_mask_iou"] >= 0.95
    print(f"Mask R-CNN: ONNX vs eager {figures}")
