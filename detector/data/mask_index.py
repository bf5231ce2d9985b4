"""The masks of a CocoIndex: parsing at start-up, rasterising and augmenting per item.

Only families that train on masks (Mask R-CNN) ask for them; box families never read the
``segmentation`` of a json, so their start-up time and memory stay as they were.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from detector.core.masks import (
    NO_MASKS_IMAGES,
    NONE,
    REPAIRED,
    MaskBuilder,
    MaskStore,
    check_segmentation,
    has_mask,
    rasterize,
)

if TYPE_CHECKING:
    from detector.data.coco import CocoIndex


def parse_masks(
    index: CocoIndex, items: list, rows: tuple, widths: np.ndarray, heights: np.ndarray, names: list[str], repair: bool
) -> tuple[tuple, MaskStore]:
    """Validate the segmentations of the annotations the box parser kept; build the MaskStore.

    Every bad mask (a polygon with fewer than 3 points, an odd or non-finite coordinate, an RLE
    whose size disagrees with the image or whose counts do not cover it) is reported by file,
    json location and id; repair mode drops the annotation instead, counted. Annotations
    without a mask keep kind NONE: their images are dropped, named and counted, once the index
    is complete (``drop_maskless``).

    Returns:
        the rows (as the box parsers return them) without the dropped annotations, and the store.
    """
    from detector.core.errors import DatasetError

    img, *_, src = rows
    builder = MaskBuilder()
    keep = np.ones(len(src), bool)
    missing = np.zeros(len(src), bool)
    for k, (j, im) in enumerate(zip(src.tolist(), img.tolist())):
        a = items[j]
        seg = a.get("segmentation")
        h, w = int(heights[im]), int(widths[im])
        if not has_mask(seg):
            missing[k] = True
            builder.add(None, h, w)
            continue
        problem = check_segmentation(seg, h, w)
        if problem is not None:
            keep[k] = False
            builder.add(None, h, w)
            if repair:
                index.repairs[REPAIRED] += 1
            else:
                kind, message = problem
                index.report.add(kind, f"annotations[{j}] (id {a.get('id')}, image '{names[im]}')", message)
            continue
        builder.add(seg, h, w)
    if len(src) and missing.all():
        raise DatasetError(
            f"{index.path}: no annotation has a 'segmentation' (instance mask), so a Mask R-CNN model can neither "
            "train on it nor be scored on it (segm). Export the dataset with its polygons or RLE masks, or use a "
            "box model (e.g. model.name=fasterrcnn_resnet50_fpn)."
        )
    store = builder.build()
    if not keep.all():
        rows = tuple(r[keep] for r in rows)
        store.select(np.flatnonzero(keep))
    return rows, store


def drop_maskless(index: CocoIndex) -> None:
    """Drop the images some of whose annotations have no mask (named in the summary, counted).

    Training an image with an unmasked object would teach the mask head that the object is
    background; scoring it would count a correct mask as a miss.
    """
    assert index.masks is not None
    # the annotations still there (those of classes the model lacks are gone) that have no mask
    image_of = np.repeat(np.arange(len(index)), np.diff(index.ann_start))
    positions = np.unique(image_of[index.masks.kind == NONE]).tolist()
    if not positions:
        return
    index.maskless_names = [index.file_name(i) for i in positions]
    index.drop_images(positions, NO_MASKS_IMAGES)


def item_masks(
    index: CocoIndex, i: int, decoded_size: tuple[int, int], scale: tuple[float, float] | None = None
) -> np.ndarray:
    """The non-crowd masks of image i at the decoded image's (width, height), uint8 (n, H, W);
    ``scale`` is the decoded content's (sx, sy), as the boxes are scaled (see ``rasterize``)."""
    s, e = int(index.ann_start[i]), int(index.ann_start[i + 1])
    rows = np.arange(s, e)[~index.iscrowd[s:e]]
    assert index.masks is not None
    return rasterize(index.masks, rows, int(index.heights[i]), int(index.widths[i]), decoded_size, scale)


def apply_with_masks(
    pipeline: Any, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, masks: np.ndarray, seed: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the Albumentations pipeline on an image, its boxes and their masks together.

    The boxes carry their own positions as the label field, so the masks of the boxes the
    pipeline drops (cropped away, too small) are dropped with them.
    """
    if pipeline is None:
        return image, boxes, labels, masks
    from detector.data.transforms import reseed

    if seed is not None:
        reseed(pipeline, seed)
    n = len(boxes)
    if n == 0:
        out = pipeline(image=image, bboxes=boxes, labels=np.zeros(0, np.int64))
        h, w = out["image"].shape[:2]
        return out["image"], np.zeros((0, 4), np.float32), labels, np.zeros((0, h, w), np.uint8)
    out = pipeline(image=image, bboxes=boxes, labels=np.arange(n), masks=list(masks))
    idx = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
    h, w = out["image"].shape[:2]
    all_masks = np.stack([np.asarray(m) for m in out["masks"]]) if len(out["masks"]) else np.zeros((0, h, w))
    return (
        out["image"],
        np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4),
        labels[idx],
        all_masks[idx].astype(np.uint8).reshape(-1, h, w),
    )


def gt_segmentations(index: CocoIndex) -> list[Any]:
    """Every annotation's segmentation as COCO json (for the evaluation ground truth)."""
    store = index.masks
    assert store is not None
    counts = np.diff(index.ann_start)
    hs, ws = np.repeat(index.heights, counts), np.repeat(index.widths, counts)
    out = []
    for k in range(len(store.kind)):
        if store.kind[k] == NONE:  # only in an index whose maskless images were kept
            x, y, w, h = index.gt_xywh[k]
            out.append([[x, y, x + w, y, x + w, y + h, x, y + h]])
        else:
            out.append(store.to_coco(k, int(hs[k]), int(ws[k])))
    return out
