"""Instance masks in evaluation: predicted masks -> compressed RLE at the json's image size,
and COCOeval ``segm`` beside ``bbox``.

Only the RLE (a few hundred bytes an object) travels between processes, never a full mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detector.core.masks import encode

SEGM_PREFIX = "val/segm/"
MASK_THRESHOLD = 0.5  # torchvision's own threshold for its mask probabilities
CHUNK = 4  # masks brought to the full image size at a time


def to_original_size(
    masks: torch.Tensor, scale: tuple[float, float], size: tuple[int, int], threshold: float = MASK_THRESHOLD
) -> np.ndarray:
    """Mask probabilities in the decoded image's pixels -> binary masks at the json's image size.

    Args:
        masks: (n, 1, H, W) (or (n, H, W)) probabilities, as Mask R-CNN pastes them into the
            image it was given.
        scale: (sx, sy) the decoded content over the json size (reduced-scale decoding, a resize).
        size: (width, height) of the image the json describes.
        threshold: probability above which a pixel belongs to the object.

    Returns:
        uint8 (n, height, width). The probabilities are upsampled CHUNK masks at a time: all of
        them at once would be n full-size float images (5 GB for 100 detections on a 12 MP photo).
    """
    m = masks.detach().float().cpu()
    if m.ndim == 3:
        m = m[:, None]
    w, h = int(size[0]), int(size[1])
    sx, sy = float(scale[0]), float(scale[1])
    out = np.zeros((len(m), h, w), np.uint8)
    resize = (sx, sy) != (1.0, 1.0) or tuple(m.shape[-2:]) != (h, w)
    full = (max(1, round(m.shape[-2] / sy)), max(1, round(m.shape[-1] / sx)))
    for i in range(0, len(m), CHUNK):
        part = m[i : i + CHUNK]
        if resize:
            part = F.interpolate(part, size=full, mode="bilinear", align_corners=False)
            # a reduced-scale decode covers up to one block past the edge: crop (the rest stays 0)
            part = part[..., :h, :w]
        ph, pw = part.shape[-2:]
        out[i : i + len(part), :ph, :pw] = (part[:, 0] > threshold).numpy()
    return out


def mask_rles(masks: torch.Tensor, scale: tuple[float, float], size: tuple[int, int]) -> list[dict[str, Any]]:
    """Compressed RLEs (json-ready) of predicted masks, at the json's image size (CHUNK at a time)."""
    return [
        rle for i in range(0, len(masks), CHUNK) for rle in encode(to_original_size(masks[i : i + CHUNK], scale, size))
    ]


def has_masks(gt: dict[str, Any]) -> bool:
    """Whether a ground truth carries instance masks (a Mask R-CNN run's)."""
    return any("segmentation" in a for a in gt.get("annotations", []))


def check_result_sizes(gt: dict[str, Any], results: list[dict[str, Any]], source: str) -> None:
    """Raise DatasetError when a result's RLE is not at its image's json size (pycocotools would
    score such a mask 0 without a word), naming the images."""
    from detector.data.coco import MAX_LISTED, DatasetError

    images = {im["id"]: im for im in gt.get("images", [])}
    bad: dict[Any, Any] = {}
    for r in results:
        seg, im = r.get("segmentation"), images.get(r.get("image_id"))
        if isinstance(seg, dict) and im is not None and list(seg.get("size", [])) != [im["height"], im["width"]]:
            bad.setdefault(r["image_id"], seg.get("size"))
    if bad:
        listed = "\n".join(
            f"  - image {i} '{images[i].get('file_name')}': mask size {size}, json [height, width] "
            f"[{images[i]['height']}, {images[i]['width']}]"
            for i, size in list(bad.items())[:MAX_LISTED]
        )
        raise DatasetError(
            f"{source}: the masks of {len(bad)} image(s) are not at the json's image size:\n{listed}\n"
            "Masks are scored at the size the json gives (EXIF-rotated images whose json gives the size "
            "before rotation: pass --images so that their size is taken as rotated, as training does)."
        )


def segm_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Result rows for COCOeval segm: with their bbox left out, pycocotools takes each detection's
    area (which sets its small/medium/large range) from the mask, as it should for masks."""
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]


def segm_metrics(gt: Any, results: list[dict[str, Any]], backend: str = "pycocotools", prefix: str = SEGM_PREFIX):
    """COCOeval segm stats as val/segm/<stat> and val/segm/AP/<class> ({} for box ground truth).

    Returns:
        (metrics, CocoResult or None).
    """
    from detector.evaluation.coco import evaluate_coco, flat_metrics

    gt_dict = gt if isinstance(gt, dict) else getattr(gt, "dataset", {})
    if not has_masks(gt_dict):
        return {}, None
    result = evaluate_coco(gt, segm_rows(results), backend, iou_type="segm")
    return flat_metrics(result, prefix), result


def class_index_map(masks: Any, labels: Any, size: tuple[int, int]) -> np.ndarray:
    """Binary masks (n, H, W) and their labels -> one (H, W) map of labels (0: background), for
    W&B's mask overlays; later masks are drawn over earlier ones."""
    out = np.zeros(tuple(int(v) for v in size), np.int64)
    for m, lab in zip(np.asarray(masks, dtype=bool), np.asarray(labels).reshape(-1)):
        out[m[: out.shape[0], : out.shape[1]]] = int(lab)
    return out
