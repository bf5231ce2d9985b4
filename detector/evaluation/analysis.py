"""Error analysis of COCO detections: what the model gets wrong, not only how much.

From a COCO ground truth and COCO result rows (what evaluation already produces, gathered on the
main process, so every number here is the same for 1 and N processes):

- a confusion matrix at one IoU and one score threshold, with a background row (false alarms)
  and a background column (missed objects), in counts and normalised by row;
- per class: precision, recall and F1 at the score threshold that maximises F1 (and that threshold);
- per class: AP@[.5:.95] for COCO's small, medium and large objects;
- the worst images (most false positives, most missed objects), drawn with their boxes.

Matching. Same-class matches come from pycocotools' own ``evalImgs`` (COCOeval.evaluateImg: greedy
by score, crowd regions ignored, at most ``maxDets`` per image and class), so the diagonal of the
confusion matrix is exactly COCOeval's true positives at that IoU and score. COCOeval matches per
category and cannot say that a "dog" box sits on a cat: the class-agnostic second pass below does
that, for what COCOeval left unmatched only (see ``_cross_class``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

AREAS = ("small", "medium", "large")  # COCOeval's areaRng labels after "all"
# What happened to each detection (score at or above the threshold unless "below_threshold").
TP, CONFUSED, FALSE_ALARM, ON_CROWD, BELOW, BEYOND_MAX = (
    "tp",
    "confused",
    "false_alarm",
    "on_crowd",
    "below_threshold",
    "beyond_max_dets",
)
# ... and to each ground-truth object that is not a crowd region.
FOUND, FOUND_AS_OTHER, MISSED = "found", "found_as_other_class", "missed"


@dataclass
class Analysis:
    """The numbers of one analysis (``to_json`` for the file) and what the drawings need."""

    iou_threshold: float
    score_threshold: float
    class_names: list[str]
    category_ids: list[int]
    confusion: np.ndarray  # (K+1, K+1) counts: rows ground truth, columns prediction; index K = background
    per_class: dict[str, dict[str, Any]]
    ap_by_size: dict[str, dict[str, float]]
    counts: dict[str, int]
    image_counts: dict[int, dict[str, int]]  # image id -> tp, fp, fn, false_alarms, confused, missed
    det_status: list[str] = field(default_factory=list)  # per result row
    gt_status: dict[int, str] = field(default_factory=dict)  # annotation position -> FOUND/...
    gt: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [*self.class_names, "background"]

    def normalized(self) -> np.ndarray:
        """Each row divided by its sum: for a class, where its objects went (the last column is
        the fraction missed); for the background row, which classes the false alarms claimed."""
        sums = self.confusion.sum(axis=1, keepdims=True)
        return np.divide(self.confusion, sums, out=np.zeros(self.confusion.shape), where=sums > 0)

    def worst_images(self, key: str, n: int) -> list[int]:
        """Image ids with the most ``key`` (``fp`` or ``fn``), most first, ties in dataset order;
        only images with at least one."""
        order = {img["id"]: k for k, img in enumerate(self.gt.get("images", []))}
        ids = [i for i, c in self.image_counts.items() if c[key] > 0]
        return sorted(ids, key=lambda i: (-self.image_counts[i][key], order.get(i, 0)))[:n]

    def to_json(self, num_worst: int = 16) -> dict[str, Any]:
        names = {img["id"]: img.get("file_name", "") for img in self.gt.get("images", [])}

        def listing(key: str) -> list[dict[str, Any]]:
            return [
                {"image_id": i, "file_name": names.get(i, ""), **self.image_counts[i]}
                for i in self.worst_images(key, num_worst)
            ]

        return {
            "iou_threshold": self.iou_threshold,
            "score_threshold": self.score_threshold,
            "classes": self.class_names,
            "confusion_matrix": {
                "rows": "ground truth: the classes, then background (false alarms)",
                "columns": "prediction: the classes, then background (missed objects)",
                "labels": self.labels,
                "counts": self.confusion.astype(int).tolist(),
                "normalized": [[round(float(v), 6) for v in row] for row in self.normalized()],
            },
            "per_class": self.per_class,
            "ap_by_size": self.ap_by_size,
            "counts": self.counts,
            "worst_images": {"false_positives": listing("fp"), "missed": listing("fn")},
        }


def _quiet(fn: Callable[[], Any]) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def _run_cocoeval(gt_obj: Any, results: list[dict[str, Any]], iou_thrs: np.ndarray) -> Any:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if results:
        dt_obj = _quiet(lambda: gt_obj.loadRes([dict(r) for r in results]))  # result k gets id k + 1
    else:  # loadRes cannot take an empty list: an empty result set, as COCOeval sees it
        dt_obj = COCO()
        dt_obj.dataset = {"images": gt_obj.dataset["images"], "categories": gt_obj.dataset["categories"],
                          "annotations": []}  # fmt: skip
        _quiet(dt_obj.createIndex)
    ev = COCOeval(gt_obj, dt_obj, "bbox")
    ev.params.iouThrs = iou_thrs
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    return ev


def _xyxy(xywh: Sequence[Sequence[float]]) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(xywh, dtype=np.float64).reshape(-1, 4))
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def _cross_class(
    dets: list[int], gts: list[int], results: list[dict[str, Any]], anns: list[dict[str, Any]], iou_threshold: float
) -> dict[int, int]:
    """Class-agnostic matching of one image's leftovers: detections that COCOeval left unmatched
    in their own class, against objects no detection of their own class found.

    Why a second matcher: COCOeval's matching is per category, so it cannot tell a detection of
    the wrong class on an object (a confusion) from one on empty background (a false alarm).
    Greedy by score like COCOeval (highest score first, each detection takes the free object it
    overlaps most, at IoU >= the threshold), with torchvision's box IoU; only objects of another
    class are candidates (the same-class ones were COCOeval's to match).

    Returns: detection position -> annotation position.
    """
    if not dets or not gts:
        return {}
    from torchvision.ops import box_iou

    order = sorted(dets, key=lambda d: (-results[d]["score"], d))
    iou = box_iou(_xyxy([results[d]["bbox"] for d in order]), _xyxy([anns[g]["bbox"] for g in gts])).numpy()
    free = np.ones(len(gts), dtype=bool)
    out: dict[int, int] = {}
    for i, d in enumerate(order):
        other = np.array([anns[g]["category_id"] != results[d]["category_id"] for g in gts])
        cand = np.where(free & other & (iou[i] >= iou_threshold), iou[i], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= 0:
            free[j] = False
            out[d] = gts[j]
    return out


def _best_f1(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> dict[str, Any]:
    """Precision, recall and F1 at the score threshold that maximises F1 for one class, from its
    detections' scores and COCOeval's match flags (ignored detections already removed)."""
    out: dict[str, Any] = {"num_gt": num_gt, "num_detections": int(len(scores))}
    if num_gt == 0:  # recall is undefined without objects
        return {**out, "threshold": None, "precision": None, "recall": None, "f1": None, "tp": 0,
                "fp": int(len(scores)), "fn": 0}  # fmt: skip
    if len(scores) == 0:
        return {**out, "threshold": None, "precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": num_gt}
    order = np.argsort(-scores, kind="mergesort")  # as COCOeval.accumulate
    s, t = scores[order], tp[order].astype(np.int64)
    ctp = np.cumsum(t)
    cfp = np.cumsum(1 - t)
    # A threshold keeps every detection scoring at least it: only the last of equal scores is a cut.
    cut = np.append(s[1:] != s[:-1], True)
    precision = ctp / (ctp + cfp)
    recall = ctp / num_gt
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=ctp > 0)
    f1 = np.where(cut, f1, -1.0)
    k = int(np.argmax(f1))  # the first maximum: the highest threshold reaching it
    return {
        **out,
        "threshold": float(s[k]),
        "precision": float(precision[k]),
        "recall": float(recall[k]),
        "f1": float(f1[k]),
        "tp": int(ctp[k]),
        "fp": int(cfp[k]),
        "fn": int(num_gt - ctp[k]),
    }


def analyze(
    gt: dict[str, Any], results: list[dict[str, Any]], iou_threshold: float = 0.5, score_threshold: float = 0.25
) -> Analysis:
    """Confusion matrix, per-class best-F1 precision/recall, AP by size, per-image error counts.

    Args:
        gt: a COCO ground-truth dict (CocoIndex.to_coco_gt()).
        results: COCO result rows (image_id, category_id, bbox xywh, score), e.g. what
            ``engine.evaluate`` returns, in the dataset's category ids.
        iou_threshold: the IoU a detection needs to match an object (confusion matrix and P/R/F1).
        score_threshold: detections below it are left out of the confusion matrix.

    Raises:
        ValueError: results naming images that are not in the ground truth.
    """
    from pycocotools import mask as mask_utils

    from detector.evaluation.cocoeval import coco_gt

    if not 0 < iou_threshold <= 1:
        raise ValueError(f"IoU threshold {iou_threshold} is not in (0, 1]")
    # pycocotools reads a match to annotation id 0 as "unmatched": number them 1..n here.
    anns = [{**a, "id": k + 1} for k, a in enumerate(gt.get("annotations", []))]
    gt = {**gt, "annotations": anns}
    image_ids = [int(im["id"]) for im in gt.get("images", [])]
    known = set(image_ids)
    unknown_images = sorted({r["image_id"] for r in results} - known)
    if unknown_images:
        raise ValueError(f"{len(unknown_images)} image id(s) in the results are not in the ground truth, "
                         f"e.g. {unknown_images[:5]}")  # fmt: skip
    cats = sorted(int(c["id"]) for c in gt.get("categories", []))
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt.get("categories", [])}
    class_names = [names[c] for c in cats]
    col = {c: k for k, c in enumerate(cats)}
    K = len(cats)
    gt_obj = coco_gt(gt)
    iou_thrs = np.linspace(0.5, 0.95, 10)  # COCO's, for AP by size
    t_chosen = np.flatnonzero(np.isclose(iou_thrs, iou_threshold))
    if not len(t_chosen):
        iou_thrs = np.sort(np.append(iou_thrs, iou_threshold))
        t_chosen = np.flatnonzero(np.isclose(iou_thrs, iou_threshold))
    t = int(t_chosen[0])
    coco_t = [k for k, v in enumerate(iou_thrs) if np.isclose(v, np.linspace(0.5, 0.95, 10)).any()]
    ev = _run_cocoeval(gt_obj, results, iou_thrs)
    p = ev.params
    n_img, n_area = len(p.imgIds), len(p.areaRng)

    # -- pass 1: COCOeval's own same-class matches (area "all", maxDets[-1]) ---------------------------
    det_status = [BEYOND_MAX] * len(results)  # evaluateImg keeps the top maxDets per image and class
    det_gt: dict[int, int] = {}  # detection position -> annotation position
    per_class_dets: dict[int, list[tuple[float, bool]]] = {c: [] for c in cats}
    num_gt = dict.fromkeys(cats, 0)
    for k, c in enumerate(p.catIds):
        for i in range(n_img):
            e = ev.evalImgs[k * n_area * n_img + i]  # areaRng index 0 is "all"
            if e is None:
                continue
            num_gt[c] += int((np.asarray(e["gtIgnore"]) == 0).sum())
            for j, (dt_id, score) in enumerate(zip(e["dtIds"], e["dtScores"])):
                d = int(dt_id) - 1
                ignored = bool(e["dtIgnore"][t, j])
                matched = int(e["dtMatches"][t, j])
                if not ignored:
                    per_class_dets[c].append((float(score), matched > 0))
                if float(score) < score_threshold:
                    det_status[d] = BELOW
                elif ignored:
                    det_status[d] = ON_CROWD  # matched a crowd region of its class: neither right nor wrong
                elif matched > 0:
                    det_status[d], det_gt[d] = TP, matched - 1
                else:
                    det_status[d] = FALSE_ALARM  # for now: pass 2 may make it a confusion
    unknown_category = [d for d, r in enumerate(results) if r["category_id"] not in col]
    for d in unknown_category:
        det_status[d] = "unknown_category"

    # -- pass 2: class-agnostic, for the leftovers ----------------------------------------------------
    gt_status: dict[int, str] = {}
    by_image_gt: dict[int, list[int]] = {i: [] for i in image_ids}
    by_image_crowd: dict[int, list[int]] = {i: [] for i in image_ids}
    for a, ann in enumerate(anns):
        if ann.get("iscrowd", 0):
            by_image_crowd[int(ann["image_id"])].append(a)
        elif ann["category_id"] in col:
            by_image_gt[int(ann["image_id"])].append(a)
            gt_status[a] = MISSED
    for a in det_gt.values():
        gt_status[a] = FOUND
    by_image_det: dict[int, list[int]] = {i: [] for i in image_ids}
    for d, s in enumerate(det_status):
        if s == FALSE_ALARM:
            by_image_det[int(results[d]["image_id"])].append(d)
    for img in image_ids:
        leftovers = [a for a in by_image_gt[img] if gt_status[a] == MISSED]
        for d, a in _cross_class(by_image_det[img], leftovers, results, anns, iou_threshold).items():
            det_status[d], det_gt[d], gt_status[a] = CONFUSED, a, FOUND_AS_OTHER
        alarms = [d for d in by_image_det[img] if det_status[d] == FALSE_ALARM]
        crowd = by_image_crowd[img]
        if alarms and crowd:  # on a crowd region of another class: COCO's "ignore" measure (overlap / det area)
            ioa = mask_utils.iou([results[d]["bbox"] for d in alarms], [anns[a]["bbox"] for a in crowd],
                                 [1] * len(crowd))  # fmt: skip
            for d, row in zip(alarms, np.atleast_2d(ioa)):
                if (row >= iou_threshold).any():
                    det_status[d] = ON_CROWD

    # -- the confusion matrix and per-image counts ----------------------------------------------------
    confusion = np.zeros((K + 1, K + 1), dtype=np.int64)
    image_counts = {i: {"tp": 0, "fp": 0, "fn": 0, "false_alarms": 0, "confused": 0, "missed": 0} for i in image_ids}
    for d, s in enumerate(det_status):
        img = image_counts[int(results[d]["image_id"])]
        if s == TP:
            confusion[col[results[d]["category_id"]], col[results[d]["category_id"]]] += 1
            img["tp"] += 1
        elif s == CONFUSED:
            confusion[col[anns[det_gt[d]]["category_id"]], col[results[d]["category_id"]]] += 1
            img["fp"] += 1
            img["confused"] += 1
        elif s == FALSE_ALARM:
            confusion[K, col[results[d]["category_id"]]] += 1
            img["fp"] += 1
            img["false_alarms"] += 1
    for a, s in gt_status.items():
        img = image_counts[int(anns[a]["image_id"])]
        if s != FOUND:
            img["fn"] += 1
        if s == MISSED:
            confusion[col[anns[a]["category_id"]], K] += 1
            img["missed"] += 1

    # -- per class: best-F1 operating point (COCOeval's matches) and AP by size (COCOeval's precision) --
    per_class = {}
    for c in cats:
        rows = per_class_dets[c]
        scores = np.array([s for s, _ in rows], dtype=np.float64)
        tps = np.array([m for _, m in rows], dtype=bool)
        per_class[names[c]] = _best_f1(scores, tps, num_gt[c])
    precision = np.asarray(ev.eval["precision"])  # (T, R, K, A, M)
    ap_by_size: dict[str, dict[str, float]] = {}
    for c in cats:
        k = list(p.catIds).index(c)
        sizes = {}
        for a, area in enumerate(AREAS, start=1):
            pr = precision[coco_t, :, k, a, -1]
            pr = pr[pr > -1]
            sizes[area] = float(pr.mean()) if pr.size else -1.0  # -1: no object of that size, as COCOeval
        ap_by_size[names[c]] = sizes

    counts = {
        "images": len(image_ids),
        "objects": len(gt_status),
        "crowd_regions": sum(len(v) for v in by_image_crowd.values()),
        "detections": len(results),
        **{s: det_status.count(s) for s in (TP, CONFUSED, FALSE_ALARM, ON_CROWD, BELOW, BEYOND_MAX)},
        "unknown_category": len(unknown_category),
        "missed": sum(1 for s in gt_status.values() if s == MISSED),
    }
    return Analysis(
        iou_threshold=float(iou_threshold),
        score_threshold=float(score_threshold),
        class_names=class_names,
        category_ids=cats,
        confusion=confusion,
        per_class=per_class,
        ap_by_size=ap_by_size,
        counts=counts,
        image_counts=image_counts,
        det_status=det_status,
        gt_status=gt_status,
        gt=gt,
        results=results,
    )


# -- files: JSON and PNGs ----------------------------------------------------------------------------


def write_json(analysis: Analysis, path: Path) -> Path:
    """The numbers as one JSON file (written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(analysis.to_json(), indent=1))
    os.replace(tmp, path)
    return path


def plot_confusion(analysis: Analysis, path: Path) -> Path:
    """Counts and row-normalised confusion matrix side by side."""
    from detector.core.drawing import pyplot, save_figure

    plt = pyplot()

    labels = analysis.labels
    n = len(labels)
    size = max(4.0, 0.55 * n + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 2, size))
    fig.subplots_adjust(wspace=0.5)
    for ax, data, title, fmt in (
        (axes[0], analysis.confusion.astype(float), "counts", "{:.0f}"),
        (axes[1], analysis.normalized(), "normalised by row (ground truth)", "{:.2f}"),
    ):
        im = ax.imshow(data, cmap="Blues", vmin=0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(f"{title}\nIoU {analysis.iou_threshold:g}, score >= {analysis.score_threshold:g}")
        if n <= 30:  # the numbers, while they fit
            top = data.max() if data.size else 0
            for i in range(n):
                for j in range(n):
                    if data[i, j]:
                        ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if data[i, j] > top / 2 else "black")  # fmt: skip
    return save_figure(fig, path)


def plot_per_class_prf(analysis: Analysis, path: Path) -> Path:
    """Precision, recall and F1 per class at each class's best-F1 threshold (written beside the bars)."""
    from detector.core.drawing import pyplot, save_figure

    plt = pyplot()

    names = analysis.class_names
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    y = np.arange(len(names))
    for off, key in ((-0.27, "precision"), (0.0, "recall"), (0.27, "f1")):
        ax.barh(y + off, [analysis.per_class[n][key] or 0.0 for n in names], 0.27, label=key)
    for k, n in enumerate(names):
        thr = analysis.per_class[n]["threshold"]
        ax.text(1.01, k, "no objects" if analysis.per_class[n]["num_gt"] == 0 else
                (f"score >= {thr:.3f}" if thr is not None else "no detections"), va="center", fontsize=8)  # fmt: skip
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title(f"best-F1 operating point per class (IoU {analysis.iou_threshold:g})")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def plot_ap_by_size(analysis: Analysis, path: Path) -> Path:
    """AP@[.5:.95] per class for small, medium and large objects (no bar: no object of that size)."""
    from detector.core.drawing import pyplot, save_figure

    plt = pyplot()

    names = analysis.class_names
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4))
    x = np.arange(len(names))
    for off, area in zip((-0.27, 0.0, 0.27), AREAS):
        vals = [analysis.ap_by_size[n][area] for n in names]
        ax.bar(x + off, [v if v >= 0 else np.nan for v in vals], 0.27, label=area)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP@[.5:.95]")
    ax.set_title("AP by object size (COCO: small < 32², medium < 96² px area)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


CAPTION_PX = 14  # the strip under each gallery tile: file name and counts
# Outcome colours in the gallery.
COLORS = {TP: "#3cb44b", CONFUSED: "#f58231", FALSE_ALARM: "#e6194b", MISSED: "#ffe119", "gt": "#ffffff"}


def draw_image(analysis: Analysis, image_id: int, images_root: str | Path, tile: int = 320) -> torch.Tensor:
    """One image with its objects and detections (score >= threshold), coloured by outcome:
    found objects white, missed yellow; detections right green, wrong class orange, false alarm red.

    Raises:
        ImageDecodeError: naming the file when it cannot be read.
    """
    from torchvision.transforms.v2.functional import resize
    from torchvision.utils import draw_bounding_boxes

    from detector.core import storage
    from detector.core.images import load_image

    info = next(im for im in analysis.gt["images"] if im["id"] == image_id)
    # as the dataset decodes it (EXIF orientation applied, maybe at reduced scale: content scale cx, cy)
    arr, cx, cy = load_image(storage.join(images_root, info["file_name"]), (tile, tile))  # a URL root stays one
    image = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # load_image's array may be read-only
    h0, w0 = image.shape[1:]
    scale = tile / max(h0, w0)
    image = resize(image, [max(1, round(h0 * scale)), max(1, round(w0 * scale))], antialias=True)
    sx, sy = cx * image.shape[2] / w0, cy * image.shape[1] / h0  # json pixels -> tile pixels
    boxes, colors, texts = [], [], []
    names = dict(zip(analysis.category_ids, analysis.class_names))
    for a, s in analysis.gt_status.items():
        ann = analysis.gt["annotations"][a]
        if ann["image_id"] == image_id:
            boxes.append(ann["bbox"])
            colors.append(COLORS[MISSED] if s == MISSED else COLORS["gt"])
            texts.append(names[ann["category_id"]] if s != FOUND else "")
    for d, s in enumerate(analysis.det_status):
        r = analysis.results[d]
        if r["image_id"] == image_id and s in (TP, CONFUSED, FALSE_ALARM):
            boxes.append(r["bbox"])
            colors.append(COLORS[s])
            texts.append(f"{names[r['category_id']]} {r['score']:.2f}")
    if boxes:
        xyxy = _xyxy(boxes).float() * torch.tensor([sx, sy, sx, sy])
        image = draw_bounding_boxes(image, xyxy, labels=texts, colors=colors, width=2)
    return image


def gallery(analysis: Analysis, key: str, images_root: str | Path, path: Path, n: int = 8,
            warn: Callable[[str], None] = print) -> Path | None:  # fmt: skip
    """A grid of the n images with the most false positives (key "fp") or missed objects ("fn").
    None when no image has any; unreadable images are left out with a warning."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    from detector.core.images import ImageDecodeError

    tiles, captions = [], []
    names = {img["id"]: img.get("file_name", "") for img in analysis.gt.get("images", [])}
    for image_id in analysis.worst_images(key, n):
        try:
            tiles.append(draw_image(analysis, image_id, images_root))
        except ImageDecodeError as exc:
            warn(f"warning: gallery: {exc}")
            continue
        c = analysis.image_counts[image_id]
        captions.append(f"{names.get(image_id, image_id)}: {c['fp']} false pos., {c['fn']} missed")
    if not tiles:
        return None
    size = max(max(t.shape[1:]) for t in tiles)
    padded = []
    for t, caption in zip(tiles, captions):  # each tile with a caption strip below it
        canvas = Image.new("RGB", (size, size + CAPTION_PX))
        canvas.paste(Image.fromarray(t.permute(1, 2, 0).numpy()), (0, 0))
        ImageDraw.Draw(canvas).text((3, size + 2), caption, fill=(255, 255, 255))
        padded.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1))
    grid = make_grid(padded, nrow=min(4, len(padded)), padding=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, compress_level=1)  # level 6 takes 5x longer
    os.replace(tmp, path)
    return path


def write_plots(analysis: Analysis, out_dir: str | Path, images_root: str | Path | None, gallery_size: int = 8,
                warn: Callable[[str], None] = print) -> dict[str, Path]:  # fmt: skip
    """The PNGs: confusion_matrix, per_class_prf, ap_by_size, and (with images_root) the galleries
    worst_false_positives and worst_missed (when some image has one)."""
    out = Path(out_dir)
    paths = {
        "confusion_matrix": plot_confusion(analysis, out / "confusion_matrix.png"),
        "per_class_prf": plot_per_class_prf(analysis, out / "per_class_prf.png"),
        "ap_by_size": plot_ap_by_size(analysis, out / "ap_by_size.png"),
    }
    if images_root is not None and gallery_size > 0:
        for key, name in (("fp", "worst_false_positives"), ("fn", "worst_missed")):
            g = gallery(analysis, key, images_root, out / f"{name}.png", gallery_size, warn)
            if g is not None:
                paths[name] = g
    return paths


def log_wandb(logger: Any, analysis: Analysis, plots: dict[str, Path], step: int) -> None:
    """The confusion matrix and the per-class numbers as W&B tables, and the PNGs as images
    (through RunLogger: main process only, nothing when W&B is off)."""
    if getattr(logger, "wandb_run", None) is None:
        return
    import wandb

    labels = analysis.labels
    logger.log_table("val/confusion_matrix", ["ground truth", *labels],
                     [[g, *map(int, row)] for g, row in zip(labels, analysis.confusion)], step)  # fmt: skip
    cols = ["class", "num_gt", "threshold", "precision", "recall", "f1", *(f"AP_{a}" for a in AREAS)]
    rows = [
        [n, pc["num_gt"], pc["threshold"], pc["precision"], pc["recall"], pc["f1"],
         *(analysis.ap_by_size[n][a] for a in AREAS)]
        for n, pc in analysis.per_class.items()
    ]  # fmt: skip
    logger.log_table("val/per_class_prf", cols, rows, step)
    images = [wandb.Image(str(p), caption=name) for name, p in plots.items()]
    logger.log_images("val/analysis", images, step)  # nothing when no PNG was drawn


def epoch_analysis(
    run_dir: Path,
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    images_root: str | Path | None,
    cfg: Any,
    logger: Any,
    step: int,
    *,
    best: bool,
    last: bool,
    plots: bool,
    warn: Callable[[str], None] = print,
) -> Analysis:
    """The analysis of one evaluation during training (main process, from the gathered detections).

    ``analysis.json`` in the run directory at every evaluation (about 0.05 s for the tiny test
    set), copied to ``analysis_best.json`` when this evaluation chose best.pt. With ``plots``, the
    PNGs in ``plots/analysis/`` (about a second each time): drawn at the run's last evaluation
    (``eval.analysis_plots=last``, the default), also whenever best.pt changes (``best``), or at
    every evaluation (``every``). W&B gets the tables at every evaluation and the PNGs whenever
    they are drawn.

    Args:
        cfg: the EvalConfig (analysis_iou, analysis_score, analysis_gallery, analysis_plots).
    """
    found = analyze(gt, results, cfg.analysis_iou, cfg.analysis_score)
    write_json(found, run_dir / "analysis.json")
    if best:
        write_json(found, run_dir / "analysis_best.json")
    paths: dict[str, Path] = {}
    draw = last or cfg.analysis_plots == "every" or (best and cfg.analysis_plots == "best")
    if plots and draw:
        paths = write_plots(found, run_dir / "plots" / "analysis", images_root, cfg.analysis_gallery, warn)
    log_wandb(logger, found, paths, step)
    return found


def report(analysis: Analysis) -> str:
    """A few console lines: the per-class operating points and the error counts."""
    c = analysis.counts
    lines = [
        f"error analysis at IoU {analysis.iou_threshold:g}, score >= {analysis.score_threshold:g}: "
        f"{c['tp']} right, {c['confused']} wrong class, {c['false_alarm']} false alarms, {c['missed']} missed "
        f"(of {c['objects']} objects)",
        f"{'class':>20}  {'thresh':>7}  {'P':>6}  {'R':>6}  {'F1':>6}  {'AP_S':>6}  {'AP_M':>6}  {'AP_L':>6}",
    ]
    if c["unknown_category"]:
        lines.insert(1, f"  {c['unknown_category']} detection(s) of categories not in the ground truth left out")
    if c["beyond_max_dets"]:
        lines.insert(1, f"  {c['beyond_max_dets']} detection(s) beyond COCOeval's 100 per image and class left out")
    for n, pc in analysis.per_class.items():
        thr = "-" if pc["threshold"] is None else f"{pc['threshold']:.3f}"
        nums = [pc[k] for k in ("precision", "recall", "f1")] + [analysis.ap_by_size[n][a] for a in AREAS]
        lines.append(f"{n:>20}  {thr:>7}  " + "  ".join("     -" if v is None else f"{v:6.3f}" for v in nums))
    return "\n".join(lines)
