"""COCOeval through the project's path: reference fixtures, backends, empty predictions."""

from __future__ import annotations

import json

import pytest

from detector.evaluation.cocoeval import STAT_NAMES, evaluate_coco
from tests.conftest import shared_data

CASES = {
    "cocoapi_val2014_100": ("instances_val2014_100.json", "instances_val2014_fakebbox100_results.json", 1e-9),
    "rafaelpadilla_val2014_100_nocrowd_boxarea": ("sampled_gts_bbox_area.json", "sampled_bbox_results.json", 1e-6),
    "detectron2_val2017_2img": ("gt.json", "dt.json", 1e-9),
    "mmdet_catid0_perfect": ("gt.json", "dt.json", 1e-4),
    "torchmetrics_4img_converted": ("gt.json", "dt.json", 1e-3),
}


def _load(folder, gt_name, dt_name):
    fixtures = shared_data("cocoeval_fixtures", folder)
    gt = json.loads((fixtures / gt_name).read_text())
    dt = json.loads((fixtures / dt_name).read_text())
    if isinstance(dt, dict):
        dt = dt["annotations"]
    dt = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dt]
    expected = json.loads((fixtures / "expected_bbox.json").read_text())
    return gt, dt, expected


def _expected_stats(expected: dict) -> dict[str, float]:
    """The fixture's stats under our names (AP -> mAP, AP50 -> mAP50, ...; AR names agree)."""
    stats = expected.get("stats_full_precision") or expected.get("stats") or expected.get("stats_0_to_5")
    return {("m" + k if k.startswith("AP") else k): v for k, v in stats.items()}


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("folder", sorted(CASES))
def test_fixture_stats(folder, backend):
    gt_name, dt_name, tol = CASES[folder]
    gt, dt, expected = _load(folder, gt_name, dt_name)
    stats = _expected_stats(expected)
    assert set(stats) <= set(STAT_NAMES) and len(stats) >= 6
    res = evaluate_coco(gt, dt, backend)
    for name, value in stats.items():
        assert res.stats[name] == pytest.approx(value, abs=tol), name


def test_backends_agree_per_class():
    gt, dt, _ = _load("cocoapi_val2014_100", *CASES["cocoapi_val2014_100"][:2])
    a = evaluate_coco(gt, dt, "pycocotools")
    b = evaluate_coco(gt, dt, "faster_coco_eval")
    assert a.per_class_ap.keys() == b.per_class_ap.keys()
    for k in a.per_class_ap:
        assert a.per_class_ap[k] == pytest.approx(b.per_class_ap[k], abs=1e-9)


def test_empty_predictions_give_zero_not_crash():
    gt = {
        "images": [{"id": 1, "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}],
    }
    for backend in ("pycocotools", "faster_coco_eval"):
        res = evaluate_coco(gt, [], backend)
        assert res.stats["mAP"] == 0.0 and res.per_class_ap == {"a": 0.0}
