"""Instance masks in evaluation: predicted masks -> compressed RLE at the json's image size,
and COCOeval ``segm`` beside ``bbox``.

Only the RLE (a few hundred bytes an object) travels between processes, never a full mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from detector.core.masks import CHUNK, encode, to_original_size

SEGM_PREFIX = "val/segm/"


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
    from detector.core.errors import MAX_LISTED, DatasetError

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


def class_index_map(masks: Any, labels: Any, size: tuple[int, int]) -> np.ndarray:
    """Binary masks (n, H, W) and their labels -> one (H, W) map of labels (0: background), for
    W&B's mask overlays; later masks are drawn over earlier ones."""
    out = np.zeros(tuple(int(v) for v in size), np.int64)
    for m, lab in zip(np.asarray(masks, dtype=bool), np.asarray(labels).reshape(-1)):
        out[m[: out.shape[0], : out.shape[1]]] = int(lab)
    return out
