"""Known answers for the numbers: COCO result rows, per-class AP, and boxes mapped back to the
original image by the Predictor. Every expected value here is worked out by hand (or by running
pycocotools on its own), never by calling the code under test."""

from __future__ import annotations

import contextlib
import io
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detector.core.labels import LabelMap
from detector.evaluation.cocoeval import detections_to_coco, evaluate_coco

# -- detections -> COCO result rows ---------------------------------------------------------------


def _det(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


def test_detections_to_coco_by_hand():
    # Dataset category ids 5, 11, 40 (not contiguous) are model labels 1, 2, 3.
    label_map = LabelMap((5, 11, 40), ("ant", "bee", "cow"))
    detections = [
        # image 1001 was decoded at reduced scale: x by 1/2, y by 1/4 (scale = decoded / json size)
        _det([[10, 20, 30, 60], [0.5, 0.25, 1.5, 1.0]], [3, 1], [0.9, 0.123456789]),
        # image 7 was decoded at full size (no "scale")
        _det([[4, 8, 16, 32]], [2], [0.5]),
        # image 8: nothing found, no rows
        _det([], [], []),
    ]
    targets: list[dict[str, Any]] = [
        {"image_id": torch.tensor(1001), "scale": (0.5, 0.25)},
        {"image_id": 7},
        {"image_id": 8, "scale": (0.5, 0.5)},
    ]
    rows = detections_to_coco(detections, targets, label_map)
    assert rows == [
        # [10, 20, 30, 60] / (0.5, 0.25) = [20, 80, 60, 240] xyxy -> [20, 80, 40, 160] xywh; label 3 -> id 40
        {"image_id": 1001, "category_id": 40, "bbox": [20.0, 80.0, 40.0, 160.0], "score": 0.9},
        # [0.5, 0.25, 1.5, 1.0] / (0.5, 0.25) = [1, 1, 3, 4] -> [1, 1, 2, 3]; label 1 -> id 5; score to 5 places
        {"image_id": 1001, "category_id": 5, "bbox": [1.0, 1.0, 2.0, 3.0], "score": 0.12346},
        # full size: [4, 8, 16, 32] -> [4, 8, 12, 24]; label 2 -> id 11
        {"image_id": 7, "category_id": 11, "bbox": [4.0, 8.0, 12.0, 24.0], "score": 0.5},
    ]


# -- per-class AP ------------------------------------------------------------------------------------

CATS = [{"id": 4, "name": "ant"}, {"id": 9, "name": "bee"}, {"id": 15, "name": "cow"}]


def _ann(i: int, image_id: int, cat: int, bbox: list[float], crowd: int = 0) -> dict[str, Any]:
    return {
        "id": i,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": crowd,
    }


def _hand_gt() -> dict[str, Any]:
    """ant: 3 objects; bee: 1 object; cow: none (its only detections are false positives)."""
    return {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [
            _ann(1, 1, 4, [0, 0, 20, 20]),
            _ann(2, 1, 4, [50, 50, 20, 20]),
            _ann(3, 2, 4, [10, 60, 20, 20]),
            _ann(4, 2, 9, [60, 10, 30, 30]),
        ],
        "categories": CATS,
    }


def _row(image_id: int, cat: int, bbox: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


HAND_DT = [
    _row(1, 4, [0, 0, 20, 20], 0.9),  # ant: exact hit (IoU 1 at every threshold)
    _row(1, 4, [30, 30, 10, 10], 0.8),  # ant: touches nothing (IoU 0)
    _row(2, 4, [10, 60, 20, 20], 0.7),  # ant: exact hit
    _row(2, 9, [0, 0, 10, 10], 0.6),  # bee: miss, ranked first
    _row(2, 9, [60, 10, 30, 30], 0.5),  # bee: exact hit
    _row(1, 15, [0, 0, 10, 10], 0.5),  # cow: no ground truth at all
]


def _ap101(precisions: list[float], recalls: list[float]) -> float:
    """101-point interpolated AP (COCO): the mean over recall thresholds r = 0, 0.01, ..., 1 of
    the best precision reached at a recall >= r (0 where no recall that high is reached)."""
    total = 0.0
    for k in range(101):
        r = k / 100
        reached = [p for p, rc in zip(precisions, recalls) if rc >= r - 1e-12]
        total += max(reached) if reached else 0.0
    return total / 101


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_per_class_ap_by_hand(backend):
    res = evaluate_coco(_hand_gt(), HAND_DT, backend)
    # Every detection has IoU 1 or 0, so AP is the same at each of the 10 IoU thresholds.
    # ant, 3 objects, ranked TP FP TP: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3
    #   -> 34 thresholds (0..0.33) at 1, 33 (0.34..0.66) at 2/3, 34 (0.67..1) at 0: 56/101
    ant = (34 * 1 + 33 * 2 / 3) / 101
    assert ant == pytest.approx(_ap101([1, 1 / 2, 2 / 3], [1 / 3, 1 / 3, 2 / 3]), abs=1e-12)
    # bee, 1 object, ranked FP TP: precision 0, 1/2 at recall 0, 1 -> 1/2 at every threshold
    bee = 0.5
    assert res.per_class_ap["ant"] == pytest.approx(ant, abs=1e-12)
    assert res.per_class_ap["bee"] == pytest.approx(bee, abs=1e-12)
    assert res.per_class_ap50["ant"] == pytest.approx(ant, abs=1e-12)
    assert res.per_class_ap50["bee"] == pytest.approx(bee, abs=1e-12)
    # a class without ground truth has no AP: -1 (as COCOeval marks it), not 0 and not left out
    assert res.per_class_ap["cow"] == -1.0 and res.per_class_ap50["cow"] == -1.0
    # the overall mAP is the mean over the classes that have ground truth
    assert res.stats["mAP"] == pytest.approx((ant + bee) / 2, abs=1e-12)
    # the PR curve at IoU 0.5 is the interpolated precision at each recall threshold
    assert res.pr50 is not None
    np.testing.assert_allclose(res.pr50[0], [1.0] * 34 + [2 / 3] * 33 + [0.0] * 34, atol=1e-12)
    np.testing.assert_allclose(res.pr50[1], [0.5] * 101, atol=1e-12)


def _random_case(seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth written as a COCO dict, and jittered detections (IoUs spread over 0.3-1, so
    AP differs between IoU thresholds), false positives and a crowd region."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": 200, "height": 150} for i in range(1, 7)]
    anns, rows, n = [], [], 0
    for im in images:
        for _ in range(int(rng.integers(1, 5))):
            n += 1
            cat = int(rng.choice([4, 9, 15]))
            w, h = rng.uniform(12, 60, 2)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 150 - h)
            anns.append(_ann(n, im["id"], cat, [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]))
            if rng.random() < 0.85:  # found, with some error in position and size
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                rows.append(_row(im["id"], cat, [x + j[0], y + j[1], w + j[2], h + j[3]], float(rng.uniform(0.2, 1))))
        for _ in range(2):  # false positives
            rows.append(_row(im["id"], int(rng.choice([4, 9, 15])), [5, 5, 20, 20], float(rng.uniform(0, 0.6))))
    anns.append(_ann(n + 1, 1, 4, [150, 100, 40, 40], crowd=1))  # detections inside are ignored, not FPs
    rows.append(_row(1, 4, [155, 105, 20, 20], 0.95))
    return {"images": images, "annotations": anns, "categories": CATS}, rows


def _cocoeval_one_class(gt: dict[str, Any], rows: list[dict[str, Any]], cat: int) -> tuple[float, float]:
    """pycocotools on its own, restricted to one category: (AP@[.5:.95], AP@.5)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(rows), "bbox")
        ev.params.catIds = [cat]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_class_ap_matches_cocoeval_per_category(seed, backend):
    gt, rows = _random_case(seed)
    assert {a["category_id"] for a in gt["annotations"]} == {4, 9, 15}  # every class has ground truth
    res = evaluate_coco(gt, rows, backend)
    for c in CATS:
        ap, ap50 = _cocoeval_one_class(gt, rows, c["id"])
        assert 0 < ap < ap50 < 1 or ap50 == 1  # a case where the IoU thresholds matter
        assert res.per_class_ap[c["name"]] == pytest.approx(ap, abs=1e-9), c["name"]
        assert res.per_class_ap50[c["name"]] == pytest.approx(ap50, abs=1e-9), c["name"]
    # with ground truth in every class, the mean of the per-class APs is the overall mAP
    assert np.mean(list(res.per_class_ap.values())) == pytest.approx(res.stats["mAP"], abs=1e-12)
    assert np.mean(list(res.per_class_ap50.values())) == pytest.approx(res.stats["mAP50"], abs=1e-12)


def test_no_detections_class_without_ground_truth_is_minus_one():
    res = evaluate_coco(_hand_gt(), [])
    assert res.per_class_ap["ant"] == 0.0 and res.per_class_ap["bee"] == 0.0  # ground truth, nothing found
    assert res.per_class_ap["cow"] == -1.0  # no ground truth: no AP, as with detections


# -- the Predictor maps boxes back to the original image ---------------------------------------


class _Spy(nn.Module):
    """Wraps the backbone and keeps the (resized, normalised, padded) batch the model saw."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone
        self.out_channels = backbone.out_channels
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> OrderedDict:
        self.seen = x
        return self.inner(x)


class _FindBrightObject(nn.Module):
    """Box head stand-in: one detection per image, the box around the bright pixels of the image
    as the model saw it (its resized frame), label 1, score 0.9."""

    def __init__(self, spy: _Spy) -> None:
        super().__init__()
        self.spy = spy

    def forward(self, features, proposals, image_sizes):
        assert self.spy.seen is not None
        out = []
        for i, (h, w) in enumerate(image_sizes):
            bright = self.spy.seen[i, 0, :h, :w] > 0  # normalised: white ~ +2.2, black ~ -2.1
            ys, xs = torch.nonzero(bright, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            out.append({"boxes": box[None], "labels": torch.tensor([1]), "scores": torch.tensor([0.9])})
        return out, {}


def _image_with_object(w: int, h: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return img


def _bright_object_predictor() -> tuple[Any, _Spy]:
    """A Predictor around a real Faster R-CNN (its transform resizes to a shorter side of 75 px)
    whose box head reports the bright object it is shown, as label 1 = category id 40."""
    from detector.config import ModelConfig
    from detector.inference.predictor import Predictor
    from detector.models.build import build_model

    cfg = ModelConfig(name="fasterrcnn_resnet18_fpn", weights=None, weights_backbone=None, min_size=75, max_size=1000,
                      returned_layers=[3, 4], fpn_channels=16, representation_size=32)  # fmt: skip
    model = build_model(cfg, 1)
    spy = _Spy(model.backbone)
    model.backbone = spy
    model.roi_heads = _FindBrightObject(spy)
    return Predictor(model, LabelMap((40,), ("box",)), batch_size=2), spy


def test_predictor_boxes_in_original_pixels(tmp_path):
    predictor, spy = _bright_object_predictor()
    # 400x300 is seen at 100x75 (x1/4), 150x300 at 75x150 (x1/2); both in one padded batch.
    a = _image_with_object(400, 300, (100, 60, 220, 180))
    b = _image_with_object(150, 300, (40, 120, 100, 200))
    da, db = predictor.predict([a, b])
    assert spy.seen is not None and spy.seen.shape[-2:] != (300, 400)  # the model did resize
    np.testing.assert_allclose(da.boxes, [[100, 60, 220, 180]], atol=0.5)
    np.testing.assert_allclose(db.boxes, [[40, 120, 100, 200]], atol=0.5)
    assert da.category_ids.tolist() == [40] and da.names == ["box"] and da.labels.tolist() == [1]
    # the same image alone (no padding partner) gives the same box
    np.testing.assert_allclose(predictor.predict(a)[0].boxes, da.boxes, atol=1e-4)
    # from a file (a JPEG larger than the model's input may be decoded at reduced scale first):
    # still the original pixels, within the JPEG's blur of the edges
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    np.testing.assert_allclose(predictor.predict(tmp_path / "a.jpg")[0].boxes, [[100, 60, 220, 180]], atol=2.0)


def test_predictor_rgba_array_is_its_rgb():
    predictor, _ = _bright_object_predictor()
    rgb = _image_with_object(400, 300, (100, 60, 220, 180))
    rgba = np.concatenate([rgb, np.full((300, 400, 1), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(predictor.predict(rgba)[0].boxes, predictor.predict(rgb)[0].boxes)
