"""Sliced (tiled) inference for images much larger than the model's input.

A 3000x2000 photo given whole to a detector is resized by the model itself (torchvision's
GeneralizedRCNNTransform: shorter side to ``min_size``, longer side at most ``max_size``) to
e.g. 800x533: a 20 px object becomes 5 px and is missed. Sliced inference cuts the full-resolution
image into overlapping ``size`` x ``size`` tiles, runs batches of tiles through the model, maps
each tile's detections to full-image pixels and merges the duplicates that tiles' overlaps (and
the optional full-image pass, which keeps large objects whole) produce: by default greedy
non-maximum merging by intersection over the smaller box (as sahi does), or NMS; class-aware,
and only across tiles or passes: two boxes of one tile are two objects (the model's NMS said so).

Each tile still goes through the model's own resize: a 640 tile is seen at ``min_size/640`` of
its pixels (a model with min_size 800 enlarges it 1.25x, one with min_size 320 halves it). So a
tile size near the model's input size sees objects at about their real pixel size; the tile size
is the knob that sets the scale objects are seen at.

The slicing and merging are supervision's (``InferenceSlicer``: the tile grid, batched callback,
moving boxes and masks by the tile offset, and ``Detections.with_nms``, class-aware). supervision
was chosen over sahi because sahi requires the GUI build ``opencv-python`` (it would replace the
``opencv-python-headless`` that Albumentations uses, and needs libGL), while supervision imports
on a headless box and keeps masks compact (run-length crops, ``compact_masks``) while merging, so
a large image with many tiles never holds a full-size mask per tile detection.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detector.core.grid import EXTRA_HINT, _sv

__all__ = ["SliceSpec", "detect_sliced"]

# images -> per image boxes (xyxy in that image's pixels), labels, scores (and masks (n, 1, h, w))
DetectFn = Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class SliceSpec:
    """How to slice an image.

    Args:
        size: tile width and height in full-image pixels.
        overlap: overlap of neighbouring tiles, as a fraction of ``size`` (0 <= overlap < 1).
        full_pass: also detect on the whole image (resized by the model as usual) and merge: large
            objects that no tile holds whole are found there.
        iou: overlap above which two detections of one class are the same object.
        merge: "nmm" merges such detections into one (their boxes' union, their scores' mean
            weighted by box area; masks united), "nms" keeps the best-scored one only.
        metric: "ios" (intersection over the smaller box) or "iou". An object cut by a tile's
            edge is detected whole in one tile and in part in the next: the part lies inside the
            whole (IoS near 1) but has a small IoU with it, so only IoS finds such duplicates.
    """

    size: int = 640
    overlap: float = 0.2
    full_pass: bool = True
    iou: float = 0.5
    merge: str = "nmm"
    metric: str = "ios"

    def __post_init__(self) -> None:
        if int(self.size) < 16:
            raise ValueError(f"slice size {self.size} is too small (at least 16 px)")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"slice overlap {self.overlap} is not in [0, 1)")
        if not 0 < self.iou <= 1:
            raise ValueError(f"slice merge threshold {self.iou} is not in (0, 1]")
        if self.merge not in ("nmm", "nms") or self.metric not in ("ios", "iou"):
            raise ValueError(f"slice merge {self.merge!r}/{self.metric!r}: expected nmm or nms, and ios or iou")

    @property
    def overlap_px(self) -> int:
        return round(self.size * self.overlap)


def require_supervision() -> None:
    """For the tools, before any work: without supervision, one ``error:`` line naming the extra
    to install and exit code 2 (not a library traceback after the model is loaded)."""
    try:
        _sv()
    except RuntimeError as exc:
        print(f"error: --slice needs the optional extra supervision, which is not installed: {EXTRA_HINT}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from exc


class CompactProbabilities:
    """Merged masks (a supervision CompactMask) that look like the model's ``(n, 1, H, W)`` mask
    probabilities to detector.evaluation.segm (0/1 values): indexing materialises only the masks asked for,
    so COCO RLEs are made a few full-size masks at a time."""

    def __init__(self, compact: Any, height: int, width: int) -> None:
        self.compact, self.shape = compact, (len(compact), 1, height, width)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> torch.Tensor:
        part = self.compact[index]
        if not len(part):
            return torch.zeros((0, *self.shape[1:]))
        return torch.from_numpy(part.to_dense()[:, None]).float()

    def dense(self) -> np.ndarray:
        """All masks as bool (n, H, W)."""
        if not len(self):
            return np.zeros(self.shape[:1] + self.shape[2:], bool)
        return self.compact.to_dense()


def _to_sv(
    det: dict[str, torch.Tensor], shape: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0), source: int = 0
) -> Any:
    """A model output (boxes in an image ``scale`` = (sx, sy) times the frame's size) ->
    supervision Detections in the frame of ``shape`` (h, w), masks compact (made full size
    ``segm.CHUNK`` at a time, never all at once); ``data["source"]`` is ``source`` (the tile
    or pass the detections come from)."""
    import supervision as sv
    from supervision.detection.compact_mask import CompactMask

    sx, sy = scale
    boxes = det["boxes"].detach().float().cpu().numpy().astype(np.float32) / np.array([sx, sy, sx, sy], np.float32)
    h, w = shape
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    scores = det["scores"].detach().float().cpu().numpy().astype(np.float32)
    mask = None
    if "masks" in det:
        from detector.core.masks import CHUNK, to_original_size

        parts = [
            CompactMask.from_dense(
                to_original_size(det["masks"][i : i + CHUNK], (sx, sy), (w, h)).view(bool),
                boxes[i : i + CHUNK].astype(np.float64),
                image_shape=(h, w),
            )
            for i in range(0, len(boxes), CHUNK)
        ]
        mask = CompactMask.merge(parts) if len(parts) > 1 else parts[0] if parts else None
        if mask is None:
            mask = CompactMask.from_dense(np.zeros((0, h, w), bool), np.zeros((0, 4)), image_shape=(h, w))
    return sv.Detections(
        xyxy=boxes,
        confidence=scores,
        class_id=det["labels"].detach().cpu().numpy().astype(np.int64),
        mask=mask,
        data={"source": np.full(len(boxes), source, np.int64)},
    )


def cross_source_groups(
    overlap: np.ndarray, scores: np.ndarray, sources: np.ndarray, threshold: float, strict: bool = False
) -> list[list[int]]:
    """Greedy non-maximum grouping that never joins two detections of one source.

    The best-scored detection not yet grouped takes, from each other source, the best-scored
    free detection whose overlap with it is at least ``threshold``. Within one tile or pass the
    model's own NMS already decided which boxes are distinct objects: two boxes it kept apart
    stay apart here however much they overlap.

    Args:
        overlap: (n, n) overlap (IoU or IoS) of the detections.
        scores: (n,) their scores.
        sources: (n,) the tile or pass of each.
        threshold: overlap from which two detections of different sources are one object.
        strict: only an overlap above ``threshold`` (supervision's NMS), not at it (its NMM).

    Returns:
        Groups of indices, each led by its best-scored member; every index in exactly one group.
    """
    order = np.argsort(-scores, kind="stable")
    free = np.ones(len(scores), bool)
    groups: list[list[int]] = []
    for i in order:
        if not free[i]:
            continue
        free[i] = False
        near = overlap[i] > threshold if strict else overlap[i] >= threshold
        cand = np.flatnonzero(free & (sources != sources[i]) & near)
        cand = cand[np.argsort(-scores[cand], kind="stable")]
        _, first = np.unique(sources[cand], return_index=True)  # one per source: its best-scored
        members = cand[np.sort(first)]
        free[members] = False
        groups.append([int(i), *members.tolist()])
    return groups


def merge_across_sources(dets: Any, spec: SliceSpec) -> Any:
    """Class-aware merge of the tiles' and the full pass's duplicates (supervision Detections
    with ``data["source"]``): groups by ``cross_source_groups`` on the boxes' (with masks, the
    masks') overlap by ``spec.metric``; "nmm" merges each group by supervision's NMM rule (the
    union of boxes and masks, scores averaged weighted by box area), "nms" keeps its leader."""
    sv = _sv()
    metric = sv.OverlapMetric(spec.metric.upper())
    kept = []
    for c in np.unique(dets.class_id):
        same = dets[dets.class_id == c]
        if same.mask is not None:
            overlap = sv.mask_iou_batch(same.mask, same.mask, metric)
        else:
            overlap = sv.box_iou_batch(same.xyxy, same.xyxy, metric)
        groups = cross_source_groups(
            np.asarray(overlap), same.confidence, same.data["source"], spec.iou, spec.merge == "nms"
        )
        if spec.merge == "nms":
            kept.append(same[np.array([g[0] for g in groups])])
            continue
        # NMM's area-weighted score, not the best member's: measured on the demo_tiles set, the
        # best score gave a lower AP50 (a large box that swallows a small confident one keeps a low score).
        # threshold 0: every member of a group (all overlap its leader) merges into one detection
        kept += [same[np.array(g)].with_nmm(threshold=0.0, class_agnostic=True) if len(g) > 1 else same[[g[0]]]
                 for g in groups]  # fmt: skip
    return sv.Detections.merge(kept)


def _model_scale(height: int, width: int, input_size: tuple[int, int] | None) -> float:
    """The factor the model's own resize would apply to a height x width image (at most 1)."""
    if input_size is None:
        return 1.0
    lo, hi = input_size
    return min(1.0, lo / min(height, width), hi / max(height, width))


@torch.no_grad()
def detect_sliced(
    detect: DetectFn,
    image: torch.Tensor,
    spec: SliceSpec,
    batch_size: int = 4,
    input_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Detections of one full-resolution image by tiles (and a full-image pass), merged.

    Args:
        detect: runs the model on a list of float (3, h, w) images and returns its detections
            (e.g. ``lambda ims: loss_and_detections(model, ims, None)[1]``).
        image: float (3, H, W) in [0, 1], at full resolution (not a reduced-scale decode).
        spec: tile size, overlap, full pass, merge IoU.
        batch_size: tiles per forward pass.
        input_size: the model's (min_size, max_size): the full-image pass is given the image
            already at that scale (the model would resize it there anyway), so its masks are
            pasted at that size, not as full-size float images.

    Returns:
        ``boxes`` float32 (n, 4) xyxy in the image's pixels, ``labels`` int64, ``scores`` float32
        (tensors on the CPU); for a Mask R-CNN ``masks``, a CompactProbabilities (n, 1, H, W).
    """
    sv = _sv()
    h, w = int(image.shape[-2]), int(image.shape[-1])
    device = image.device
    hwc = image.detach().cpu().permute(1, 2, 0).numpy()  # a view: supervision crops numpy arrays

    sources = iter(range(1 << 62))  # each tile's (and the full pass's) own id: only detections of different ones merge

    def run(tiles: list[np.ndarray]) -> list[Any]:
        tensors = [torch.from_numpy(t).permute(2, 0, 1).to(device) for t in tiles]
        dets = detect(tensors)
        return [_to_sv(d, t.shape[:2], source=next(sources)) for d, t in zip(dets, tiles)]

    slicer = sv.InferenceSlicer(
        callback=run if batch_size > 1 else (lambda tile: run([tile])[0]),
        slice_wh=spec.size,
        overlap_wh=spec.overlap_px,
        overlap_filter="none",  # merged below, together with the full-image pass
        batch_size=max(1, batch_size),
        compact_masks=True,
    )
    parts = [slicer(hwc)]
    if spec.full_pass:
        s = _model_scale(h, w, input_size)
        small = image
        if s < 1.0:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            small = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        full = detect([small])[0]
        parts.append(_to_sv(full, (h, w), scale=(small.shape[-1] / w, small.shape[-2] / h), source=next(sources)))
    parts = [p for p in parts if len(p)]
    merged = sv.Detections.merge(parts) if parts else sv.Detections.empty()
    if len(merged):
        merged = merge_across_sources(merged, spec)
        order = np.argsort(-merged.confidence, kind="stable")
        merged = merged[order]
    out: dict[str, Any] = {
        "boxes": torch.from_numpy(np.asarray(merged.xyxy, np.float32).reshape(-1, 4)),
        "labels": torch.from_numpy(np.asarray(merged.class_id if len(merged) else [], np.int64)),
        "scores": torch.from_numpy(np.asarray(merged.confidence if len(merged) else [], np.float32)),
    }
    if merged.mask is not None:
        out["masks"] = CompactProbabilities(merged.mask, h, w)
    return out


def predict_sliced(predictor: Any, prepared: Sequence[tuple[torch.Tensor, float, tuple[int, int]]]) -> list[Any]:
    """``Predictor.predict_prepared`` with ``predictor.slicing`` set: each image, decoded at full
    resolution (``Predictor.prepare`` never reduces the scale then: that would defeat slicing),
    is detected by tiles.

    Returns:
        Detections (detector.inference.predictor) per image; a Mask R-CNN's masks are bool (n, H, W).
    """
    from detector.core.detections import to_detections
    from detector.models.build import model_input_size
    from detector.models.zoo import family_of_model, loss_and_detections

    model, spec = predictor.model, predictor.slicing
    has_masks = family_of_model(model).masks
    size = model_input_size(model)
    out = []
    for t, scale, full in prepared:
        if scale != 1.0:
            raise ValueError("sliced inference takes full-resolution images (decoded with model_size=None)")
        t = t.to(predictor.device)
        d = detect_sliced(lambda ims: loss_and_detections(model, ims, None)[1], t, spec, predictor.batch_size, size)
        det = to_detections(d["boxes"], d["labels"], d["scores"], None, 1.0, full, predictor.label_map)
        if has_masks:  # already binary at the full size
            det.masks = d["masks"].dense() if "masks" in d else np.zeros((0, *t.shape[-2:]), bool)
        out.append(det)
    return out


def slice_spec(ap: Any, args: Any) -> SliceSpec | None:
    """The SliceSpec the command line asks for (None without --slice); bad values are usage errors."""
    if args.slice is None:
        if args.no_full_pass:
            ap.error("--no-full-pass needs --slice")
        return None
    try:
        return SliceSpec(
            args.slice, args.overlap, not args.no_full_pass, args.slice_iou, args.slice_merge, args.slice_metric
        )
    except ValueError as exc:
        ap.error(str(exc))
    return None  # not reached: ap.error exits


def sliced_detect(
    spec: SliceSpec, batch_size: int, autocast: Callable[[], Any] | None = None
) -> Callable[[torch.nn.Module, list[torch.Tensor]], list[dict[str, Any]]]:
    """The ``detect`` of engine.evaluate for sliced evaluation: each full-resolution image of a
    batch by its own tiles, ``batch_size`` tiles per forward pass. Images are sliced one by one
    (their tiles never mix), so the detections of an image do not depend on the batches or the
    number of processes, and the gathered metrics stay the same for 1 and N processes."""
    from detector.models.build import model_input_size
    from detector.models.zoo import loss_and_detections

    def detect(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        run = lambda ims: loss_and_detections(model, ims, None, autocast)[1]  # noqa: E731
        return [detect_sliced(run, im, spec, batch_size, model_input_size(model)) for im in images]

    return detect
