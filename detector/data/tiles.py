"""Training on tiles: overlapping crops of large images (``data.tile``), so that small objects are
seen at their real pixel size rather than shrunk by the model's resize.

The tiles are the grid sliced inference uses (detector.core.grid.tile_grid). The index stays flat
numpy arrays, one row per tile (image position, x0, y0, x1, y1), never a dict per tile. A box is
clipped to each tile it overlaps; a box that a tile's edge cuts to less than ``min_visibility``
of its area is dropped from that tile: counted at start-up for the whole grid (``summary()``) and
per item in the target's ``dropped`` (which training reports as train/dropped_boxes). Tiles
without objects stay, as negatives. Validation keeps whole images: the training run scores them
as usual, and tools/evaluate.py --slice scores the same split by sliced inference.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from detector.core.grid import tile_grid
from detector.data.coco import CocoDetection, CocoIndex
from detector.data.transforms import apply


def _visibility(boxes: np.ndarray, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(overlap area > 0, visible fraction of each box) for every (tile, box) pair."""
    x0 = np.maximum(boxes[None, :, 0], tiles[:, None, 0])
    y0 = np.maximum(boxes[None, :, 1], tiles[:, None, 1])
    x1 = np.minimum(boxes[None, :, 2], tiles[:, None, 2])
    y1 = np.minimum(boxes[None, :, 3], tiles[:, None, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter > 0, inter / np.maximum(area, 1e-9)[None, :]


class TiledDataset(torch.utils.data.Dataset):
    """The tiles of a CocoDetection's images, decoded at full resolution and augmented.

    Items are as CocoDetection's (``(image, target)``, keys ``index`` or ``(index, seed)``), for
    one tile: boxes (and masks) clipped to it, ``index`` the image's position, ``tile`` its
    (x0, y0), ``dropped`` the boxes cut below min_visibility plus those augmentation dropped.
    """

    def __init__(
        self,
        index: CocoIndex,
        images_root: Any,
        transform: Any,
        size: int,
        overlap: float = 0.2,
        min_visibility: float = 0.3,
        on_corrupt_image: str = "error",
        cache_images: int = 2,
    ) -> None:
        """Args:
        index: the validated training annotations.
        images_root: folder (or URL prefix) file names are relative to.
        transform: the training Albumentations pipeline, applied to each tile.
        size: tile side in pixels (images smaller than that are one tile, whole).
        overlap: overlap of neighbouring tiles, a fraction of size.
        min_visibility: boxes cut to less than this fraction of their area are dropped.
        on_corrupt_image: as CocoDetection's.
        cache_images: decoded whole images each process keeps (uint8, W x H x 3 bytes each), so
            the tiles of one image do not each decode it again; 0: none.
        """
        # the whole image at full resolution, untransformed, without masks (a tile rasterises only
        # the masks of its own boxes): tiles are cut from it
        plain = copy.copy(index)
        plain.masks = None
        self.base = CocoDetection(plain, images_root, None, None, on_corrupt_image)
        self.cache_images = int(cache_images)
        self._cache: dict[int, Any] = {}
        self.index, self.root, self.transform = index, self.base.root, transform
        self.size, self.overlap, self.min_visibility = int(size), float(overlap), float(min_visibility)
        image_of, rects = [], []
        self.boxes_clipped = self.boxes_dropped = 0
        for i in range(len(index)):
            tiles = tile_grid(int(index.widths[i]), int(index.heights[i]), self.size, self.overlap)
            image_of.append(np.full(len(tiles), i, np.int32))
            rects.append(tiles.astype(np.int32))
            boxes, _, crowd = index.annotations(i)
            if len(boxes):
                touches, vis = _visibility(boxes[~crowd].astype(np.float64), tiles.astype(np.float64))
                kept = touches & (vis >= self.min_visibility)
                self.boxes_clipped += int((kept & (vis < 1.0)).sum())
                self.boxes_dropped += int((touches & ~kept).sum())
        self.tile_image = np.concatenate(image_of) if image_of else np.zeros(0, np.int32)
        self.tile_xyxy = np.concatenate(rects) if rects else np.zeros((0, 4), np.int32)

    def __len__(self) -> int:
        return len(self.tile_image)

    def aspect_ratios(self) -> np.ndarray:
        """Width over height of each tile (for the aspect-ratio grouped sampler)."""
        wh = (self.tile_xyxy[:, 2:] - self.tile_xyxy[:, :2]).astype(np.float32)
        return wh[:, 0] / wh[:, 1]

    def summary(self) -> str:
        return (
            f"data.tile: {len(self.index)} training images -> {len(self)} tiles of {self.size} px "
            f"(overlap {self.overlap:g}); box-tile pairs clipped to a tile: {self.boxes_clipped}, "
            f"dropped (cut below min_visibility {self.min_visibility:g}): {self.boxes_dropped}"
        )

    def _decoded(self, i: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        """Image i decoded whole at full resolution (no masks), through a small per-process cache of
        the last ``cache_images`` images: consecutive tiles of one image decode it once."""
        if i in self._cache:
            self._cache[i] = self._cache.pop(i)  # most recently used last
            return self._cache[i]
        item = self.base[i]
        if self.cache_images > 0:
            while len(self._cache) >= self.cache_images:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = item
        return item

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]] | None:
        k, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
        i = int(self.tile_image[k])
        item = self._decoded(i)
        if item is None:  # undecodable, skipped (on_corrupt_image=skip): the collate counts it
            return None
        image, target = item
        x0, y0, x1, y1 = (int(v) for v in self.tile_xyxy[k])
        arr = np.ascontiguousarray(image.permute(1, 2, 0)[y0:y1, x0:x1].numpy())  # a copy: the cache stays
        # the index's boxes (as the start-up count): a box is counted once per tile it touches
        boxes, labels, crowd = self.index.annotations(i)
        rows = np.flatnonzero(~crowd)
        boxes, labels = boxes[rows].astype(np.float64), labels[rows]
        sx, sy = target["scale"]
        if sx != 1.0 or sy != 1.0:  # a file whose decoded size differs from the json's
            boxes = boxes * np.array([sx, sy, sx, sy])
        touches, vis = _visibility(boxes, np.array([[x0, y0, x1, y1]], np.float64))
        keep = touches[0] & (vis[0] >= self.min_visibility)
        cut = int((touches[0] & ~keep).sum())
        boxes = (np.clip(boxes[keep], [x0, y0, x0, y0], [x1, y1, x1, y1]) - [x0, y0, x0, y0]).astype(np.float32)
        labels = labels[keep]
        masks = None
        if self.index.masks is not None:  # only the kept boxes' masks, rasterised then cut to the tile
            from detector.core.masks import rasterize

            h0, w0 = image.shape[-2:]
            full = rasterize(self.index.masks, self.index.ann_start[i] + rows[keep],
                             int(self.index.heights[i]), int(self.index.widths[i]), (w0, h0), (sx, sy))  # fmt: skip
            masks = np.ascontiguousarray(full[:, y0:y1, x0:x1])
            del full
        if masks is None:
            arr, boxes, labels = apply(self.transform, arr, boxes, labels, seed)
        else:
            from detector.data.mask_index import apply_with_masks

            arr, boxes, labels, masks = apply_with_masks(self.transform, arr, boxes, labels, masks, seed)
        wh = boxes[:, 2:] - boxes[:, :2]
        ok = np.isfinite(boxes).all(1) & (wh >= 1.0).all(1)
        if masks is not None:
            ok &= masks.any(axis=(1, 2))
        h1, w1 = arr.shape[:2]
        if not arr.flags.writeable:
            arr = arr.copy()
        out = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes[ok])).reshape(-1, 4),
            "labels": torch.from_numpy(np.ascontiguousarray(labels[ok])).reshape(-1),
            "index": target["index"],
            "image_id": target["image_id"],
            "tile": (x0, y0),
            "scale": (w1 / (x1 - x0), h1 / (y1 - y0)),
            "size": (x1 - x0, y1 - y0),
            "dropped": cut + int(keep.sum() - ok.sum()),
        }
        if masks is not None:
            out["masks"] = torch.from_numpy(np.ascontiguousarray(masks[ok]))
        return torch.from_numpy(arr).permute(2, 0, 1), out
