"""Instance masks in flat buffers: parsed and validated once, rasterised per item in the worker.

A COCO ``segmentation`` is a polygon (a list of parts, each a flat ``[x1, y1, x2, y2, ...]``),
an uncompressed RLE (``{"size": [h, w], "counts": [ints]}``, what crowd regions usually are) or
a compressed RLE (``counts`` a string). ``MaskStore`` keeps every polygon coordinate in one
float32 array (with part offsets) and every RLE as compressed bytes in one uint8 buffer (with
offsets); per annotation it keeps only a kind and an index range. Nothing is decoded to pixels
at start-up: ``rasterize`` draws the masks of one image with pycocotools when the item is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

NONE, POLYGON, RLE = 0, 1, 2  # kind of an annotation's mask

# Problem kinds (the report's names) and what repair mode counts when it drops the annotation.
BAD_POLYGON = "bad polygon"
BAD_RLE = "bad RLE"
REPAIRED = "annotations with an unusable mask dropped"
NO_MASKS_IMAGES = "images with annotations without a mask dropped (Mask R-CNN trains on masks)"


@dataclass
class MaskStore:
    """The masks of an index's annotations.

    Attributes:
        kind: (n_ann,) uint8: NONE, POLYGON or RLE.
        start, stop: (n_ann,) int64: polygon parts [start, stop) of ``part_off``, or the RLE
            entry ``start`` of ``rle_off``.
        coords: float32, every polygon coordinate (x, y interleaved).
        part_off: int64 (n_parts + 1,): coordinates of part j are coords[part_off[j]:part_off[j+1]].
        rle_buf: uint8, compressed RLE counts back to back; rle_off: int64 (n_rle + 1,).
    """

    kind: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    coords: np.ndarray
    part_off: np.ndarray
    rle_buf: np.ndarray
    rle_off: np.ndarray

    def select(self, rows: np.ndarray) -> None:
        """Keep (and reorder) the per-annotation entries; the buffers they point into stay."""
        self.kind, self.start, self.stop = self.kind[rows], self.start[rows], self.stop[rows]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.kind, self.start, self.stop, self.coords, self.part_off, self.rle_buf,
                                      self.rle_off))  # fmt: skip

    def polygon(self, a: int) -> list[np.ndarray]:
        """The parts of annotation a as float64, rounded to 3 decimals: the coordinates the json
        wrote (float32 alone moves a vertex at a 0.1 px tie to the other side of pycocotools'
        rounding), as the evaluation ground truth (``to_coco``) gives them."""
        return [
            np.round(self.coords[self.part_off[j] : self.part_off[j + 1]].astype(np.float64), 3)
            for j in range(self.start[a], self.stop[a])
        ]

    def rle_counts(self, a: int) -> bytes:
        j = self.start[a]
        return bytes(self.rle_buf[self.rle_off[j] : self.rle_off[j + 1]])

    def to_coco(self, a: int, height: int, width: int) -> Any:
        """The annotation's segmentation as COCO json (polygons, or a compressed RLE dict)."""
        if self.kind[a] == POLYGON:
            return [part.tolist() for part in self.polygon(a)]
        if self.kind[a] == RLE:
            return {"size": [int(height), int(width)], "counts": self.rle_counts(a).decode("ascii")}
        return []


def _finite_numbers(part: Any) -> bool:
    return isinstance(part, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in part
    )


def check_segmentation(seg: Any, height: int, width: int) -> tuple[str, str] | None:
    """Why a segmentation cannot be used as written, as (kind, message), or None when it can.

    An empty or missing segmentation is not checked here (the annotation has no mask).
    """
    if isinstance(seg, list):
        for j, part in enumerate(seg):
            if not _finite_numbers(part):
                return BAD_POLYGON, f"polygon part {j} must be a list of finite numbers [x1, y1, x2, y2, ...]"
            if len(part) % 2:
                return BAD_POLYGON, f"polygon part {j} has an odd number of coordinates ({len(part)})"
            if len(part) < 6:
                return BAD_POLYGON, f"polygon part {j} has {len(part) // 2} point(s); a polygon needs at least 3"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            return BAD_RLE, f"RLE 'size' must be [height, width], got {size!r}"
        if list(size) != [int(height), int(width)]:
            return BAD_RLE, f"RLE size {size} (height, width) disagrees with the {width}x{height} image"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                return BAD_RLE, "uncompressed RLE 'counts' must be non-negative integers"
            if sum(counts) != height * width:
                return BAD_RLE, f"RLE counts cover {sum(counts)} pixels, the image has {height * width}"
            return None
        if isinstance(counts, (str, bytes)):
            total = compressed_rle_total(counts)
            if total is None:
                return BAD_RLE, "compressed RLE 'counts' is not a pycocotools run-length string"
            if total != height * width:
                return BAD_RLE, f"RLE counts cover {total} pixels, the image has {height * width}"
            return None
        return BAD_RLE, f"RLE 'counts' must be a list of integers or a string, got {type(counts).__name__}"
    return BAD_POLYGON, f"segmentation must be a list of polygons or an RLE object, got {type(seg).__name__}"


def compressed_rle_total(counts: str | bytes) -> int | None:
    """The pixels the runs of a compressed RLE cover, or None when ``counts`` is not in
    pycocotools' string format (or a run is negative).

    pycocotools checks this only when it decodes (in the worker, with a bare ValueError), and its
    area/toBbox/merge do not check it at all. The format: each run is written in 5-bit groups
    (character - 48), 0x20 marking that a group follows and 0x10 of the last group the sign; from
    the fourth run on, a run is written as its difference to the run two before. Counted here
    vectorised, without decoding any pixel.
    """
    try:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError:
        return None
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if not len(c):
        return 0
    if ((c < 0) | (c > 63)).any():
        return None
    last = (c & 0x20) == 0  # the last group of a run
    if not last[-1]:
        return None  # cut short inside a run
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    groups = np.diff(np.append(starts, len(c)))
    if groups.max() > 12:  # more than 60 bits: no image has such a run
        return None
    shift = 5 * (np.arange(len(c)) - np.repeat(starts, groups))
    runs = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[last] & 0x10) != 0
    runs = np.where(negative, runs - (np.int64(1) << (5 * groups)), runs)
    # runs 0, 1 and 2 are as written; run i > 2 adds run i - 2
    full = np.concatenate([runs[:1], np.cumsum(runs[1::2]), np.cumsum(runs[2::2])])
    if (full < 0).any():
        return None
    return int(full.sum())


def has_mask(seg: Any) -> bool:
    """Whether an annotation gives a mask at all (anything but a missing, null or empty one)."""
    return not (seg is None or (isinstance(seg, (list, dict)) and len(seg) == 0))


class MaskBuilder:
    """Collects validated segmentations into a MaskStore, one annotation at a time."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.start: list[int] = []
        self.stop: list[int] = []
        self.coords: list[Any] = []
        self.part_len: list[int] = []
        self.rle: list[bytes] = []

    def add(self, seg: Any, height: int, width: int) -> None:
        """Add a segmentation that ``check_segmentation`` accepted (or none)."""
        if isinstance(seg, list) and seg:
            first = len(self.part_len)
            for part in seg:
                self.coords.append(part)
                self.part_len.append(len(part))
            self.kind.append(POLYGON)
            self.start.append(first)
            self.stop.append(len(self.part_len))
        elif isinstance(seg, dict):
            counts = seg["counts"]
            if isinstance(counts, list):  # uncompressed -> compressed (no pixels are decoded)
                counts = mask_utils.frPyObjects(seg, int(height), int(width))["counts"]
            self.kind.append(RLE)
            self.start.append(len(self.rle))
            self.stop.append(len(self.rle) + 1)
            self.rle.append(counts.encode("ascii") if isinstance(counts, str) else bytes(counts))
        else:
            self.kind.append(NONE)
            self.start.append(0)
            self.stop.append(0)

    def build(self) -> MaskStore:
        coords = (
            np.fromiter((v for part in self.coords for v in part), np.float32, sum(self.part_len))
            if self.part_len
            else np.zeros(0, np.float32)
        )
        rle_len = [len(r) for r in self.rle]
        return MaskStore(
            kind=np.asarray(self.kind, np.uint8),
            start=np.asarray(self.start, np.int64),
            stop=np.asarray(self.stop, np.int64),
            coords=coords,
            part_off=np.concatenate([[0], np.cumsum(self.part_len, dtype=np.int64)]).astype(np.int64),
            rle_buf=np.frombuffer(b"".join(self.rle), np.uint8).copy() if self.rle else np.zeros(0, np.uint8),
            rle_off=np.concatenate([[0], np.cumsum(rle_len, dtype=np.int64)]).astype(np.int64),
        )


def rasterize(
    store: MaskStore,
    rows: np.ndarray,
    height: int,
    width: int,
    out_size: tuple[int, int] | None = None,
    scale: tuple[float, float] | None = None,
) -> np.ndarray:
    """The masks of annotations ``rows`` as uint8 (n, H, W) arrays.

    Args:
        store: the index's masks.
        rows: annotation rows (of the index's order).
        height, width: the image size the json describes (what RLEs and polygons are in).
        out_size: (width, height) of the decoded image when it differs (reduced-scale JPEG
            decoding): polygons are drawn scaled, RLEs decoded and sampled (nearest).
        scale: (sx, sy) of the decoded content relative to the json size, as ``load_image``
            returns it (exactly 1/s for a 1/s JPEG decode, whose ceil'd size is not width / s);
            None takes out_size / size.
    """
    ow, oh = out_size if out_size is not None else (width, height)
    out = np.zeros((len(rows), oh, ow), np.uint8)
    sx, sy = scale if scale is not None else (ow / width, oh / height)
    for k, a in enumerate(rows):
        kind = store.kind[a]
        if kind == POLYGON:
            parts = store.polygon(a)
            if (sx, sy) != (1.0, 1.0):
                parts = [(p.reshape(-1, 2) * np.asarray([sx, sy])).reshape(-1) for p in parts]
            rles = mask_utils.frPyObjects([p.tolist() for p in parts], oh, ow)
            out[k] = mask_utils.decode(mask_utils.merge(rles))
        elif kind == RLE:
            m = mask_utils.decode({"size": [int(height), int(width)], "counts": store.rle_counts(a)})
            if (ow, oh, sx, sy) != (width, height, 1.0, 1.0):  # each output pixel takes the pixel under its centre
                ys = np.minimum(((np.arange(oh) + 0.5) / sy).astype(np.int64), int(height) - 1)
                xs = np.minimum(((np.arange(ow) + 0.5) / sx).astype(np.int64), int(width) - 1)
                m = m[np.ix_(ys, xs)]
            out[k] = m
    return out


def encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """Binary (n, H, W) masks -> compressed RLE dicts with str counts (json-ready)."""
    if not len(masks):
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


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
