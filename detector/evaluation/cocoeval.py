"""COCO evaluation with COCOeval: detections -> COCO results (dataset ids, xywh) -> the 12 stats, for boxes and masks.

pycocotools is the reference; faster-coco-eval is an opt-in backend with the same numbers.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from detector.config import COCO_STATS
from detector.core.labels import LabelMap
from detector.evaluation.segm import SEGM_PREFIX, has_masks, mask_rles, segm_rows

STAT_NAMES = COCO_STATS  # the 12 COCOeval stats, in its order


@dataclass
class CocoResult:
    """What COCOeval gave: the 12 stats by name, per-class AP and the PR curves at IoU 0.5."""

    stats: dict[str, float]
    per_class_ap: dict[str, float] = field(default_factory=dict)  # AP@[.5:.95] by class name, -1 if no GT
    per_class_ap50: dict[str, float] = field(default_factory=dict)
    pr50: np.ndarray | None = None  # (K, 101) precision at the 101 recall thresholds, IoU 0.5
    recall_thresholds: np.ndarray | None = None
    num_detections: int = 0


def detections_to_coco(
    detections: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]], label_map: LabelMap
) -> list[dict[str, Any]]:
    """Model outputs -> COCO result rows with the dataset's image and category ids.

    Args:
        detections: per image, ``boxes`` (xyxy, in the decoded image's pixels), ``labels``
            (1..K), ``scores``.
        targets: the matching targets: ``image_id``, and ``scale`` (decoded content / json
            size) and ``size`` (json width, height) to map boxes back and clip them to the image.
        label_map: labels -> category ids.
    """
    rows: list[dict[str, Any]] = []
    for det, tgt in zip(detections, targets):
        boxes = det["boxes"].detach().float().cpu().numpy().astype(np.float64)
        if not len(boxes):
            continue
        sx, sy = tgt.get("scale", (1.0, 1.0))
        boxes = boxes / np.array([sx, sy, sx, sy])
        if "size" in tgt:  # a reduced-scale decode covers up to one block past the edge
            w, h = tgt["size"]
            boxes = np.clip(boxes, 0, [w, h, w, h])
        boxes[:, 2:] -= boxes[:, :2]
        cats = label_map.to_category_ids(det["labels"].cpu().numpy())
        scores = det["scores"].detach().float().cpu().numpy()
        image_id = int(tgt["image_id"])
        new = [
            {
                "image_id": image_id,
                "category_id": int(c),
                "bbox": [round(float(v), 3) for v in b],
                "score": round(float(s), 5),
            }
            for b, c, s in zip(boxes, cats, scores)
        ]
        if "masks" in det:  # Mask R-CNN: compressed RLE at the json's image size
            size = tgt.get("size") or (det["masks"].shape[-1], det["masks"].shape[-2])
            for row, rle in zip(new, mask_rles(det["masks"], tgt.get("scale", (1.0, 1.0)), size)):
                row["segmentation"] = rle
        rows.extend(new)
    return rows


def _backend(name: str):
    if name == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:
            raise RuntimeError(
                "eval.backend=faster_coco_eval needs the faster-coco-eval package: pip install faster-coco-eval"
            ) from None
        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def coco_gt(gt: dict[str, Any], backend: str = "pycocotools") -> Any:
    """A COCO ground-truth object from a dict (quietly)."""
    COCO, _ = _backend(backend)
    obj = COCO()
    obj.dataset = {**gt, "info": gt.get("info") or {"description": "ground truth"}}
    with contextlib.redirect_stdout(io.StringIO()):
        obj.createIndex()
    return obj


def evaluate_coco(
    gt: dict[str, Any] | Any, results: list[dict[str, Any]], backend: str = "pycocotools", iou_type: str = "bbox"
) -> CocoResult:
    """Score COCO result rows against ground truth with COCOeval (bbox, or segm: see detector.evaluation.segm).

    Args:
        gt: a COCO ground-truth dict (e.g. CocoIndex.to_coco_gt()) or a COCO object.
        results: COCO result rows (image_id, category_id, bbox xywh, score).
        backend: "pycocotools" (reference) or "faster_coco_eval".
        iou_type: "bbox" or "segm" (rows with a ``segmentation``).

    Returns:
        The 12 stats; no detections at all gives zeros rather than pycocotools' IndexError.
    """
    gt_obj = coco_gt(gt, backend) if isinstance(gt, dict) else gt
    cat_ids = sorted(gt_obj.getCatIds())
    names = [gt_obj.cats[c].get("name", str(c)) for c in cat_ids]
    if not results:  # pycocotools cannot load an empty result list: what it would report
        zeros = {n: 0.0 for n in STAT_NAMES}
        has_gt = {
            c: any(not a.get("iscrowd", 0) for a in gt_obj.loadAnns(gt_obj.getAnnIds(catIds=[c]))) for c in cat_ids
        }
        per_class = {n: 0.0 if has_gt[c] else -1.0 for n, c in zip(names, cat_ids)}
        return CocoResult(
            zeros,
            per_class,
            dict(per_class),
            np.zeros((len(names), 101)),
            np.linspace(0, 1, 101),
            0,
        )
    _, COCOeval = _backend(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        dt_obj = gt_obj.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts it is given
        ev = COCOeval(gt_obj, dt_obj, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {n: float(v) for n, v in zip(STAT_NAMES, ev.stats)}
    precision = np.asarray(ev.eval["precision"])  # (T, R, K, A, M)
    eval_cats = list(ev.params.catIds)

    def ap(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else -1.0

    per_class, per_class50, pr50 = {}, {}, []
    for name, c in zip(names, cat_ids):
        k = eval_cats.index(c)
        per_class[name] = ap(precision[:, :, k, 0, -1])
        per_class50[name] = ap(precision[0, :, k, 0, -1])
        pr50.append(np.clip(precision[0, :, k, 0, -1], 0, None))
    return CocoResult(stats, per_class, per_class50, np.asarray(pr50), np.asarray(ev.params.recThrs), len(results))


def flat_metrics(result: CocoResult, prefix: str = "val/") -> dict[str, float]:
    """The stats (and per-class AP) as one flat dict, e.g. val/mAP, val/mAP50, val/AP/<class>."""
    out = {f"{prefix}{k}": v for k, v in result.stats.items()}
    out.update({f"{prefix}AP/{k}": v for k, v in result.per_class_ap.items()})
    return out


def segm_metrics(gt: Any, results: list[dict[str, Any]], backend: str = "pycocotools", prefix: str = SEGM_PREFIX):
    """COCOeval segm stats as val/segm/<stat> and val/segm/AP/<class> ({} for box ground truth).

    Returns:
        (metrics, CocoResult or None).
    """
    gt_dict = gt if isinstance(gt, dict) else getattr(gt, "dataset", {})
    if not has_masks(gt_dict):
        return {}, None
    result = evaluate_coco(gt, segm_rows(results), backend, iou_type="segm")
    return flat_metrics(result, prefix), result
