"""COCO detection data: a validated, compact index and the dataset that reads images through it.

``CocoIndex`` parses and validates a COCO json once and keeps what training needs in numpy
arrays (no Python list of dicts), so DataLoader workers do not grow by copy-on-read.
``LabelMap`` maps the dataset's category ids to the contiguous labels 1..K the model uses, and
back. ``CocoDetection`` decodes images (EXIF, modes, reduced-scale JPEG decoding), applies the
Albumentations pipeline and returns ``(uint8 image CHW, target)``.
"""

from __future__ import annotations

import gc
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ImageFile

from detector.core import storage
from detector.core.errors import MAX_LISTED, DatasetError
from detector.core.images import ImageDecodeError, decode_size, load_image, scan_images
from detector.core.labels import LabelMap
from detector.data.transforms import apply

try:  # orjson parses large exports several times faster; json is the fallback
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None


def read_json(path: Path | str) -> Any:
    raw = storage.read_bytes(path)  # a local file or an fsspec URL
    # A large export is millions of small objects: the cyclic GC would rescan them again and
    # again while they are created (3x the parse time at COCO scale). Nothing here is cyclic.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if orjson is not None:
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass  # json also takes what Python tools write (NaN, Infinity): try it before failing
        return json.loads(raw)
    finally:
        if was_enabled:
            gc.enable()


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a grey stripe
BOX_TOLERANCE = 1.0  # px a box may overhang the image before data.on_invalid=error calls it outside
EXIF_SWAPPED = (
    "images whose json width/height is the stored size before their EXIF rotation: "
    "sizes swapped, boxes taken as drawn on the rotated image"
)
AREA_FILLED = "annotations without a positive 'area': w*h of the box used"
UNMATCHED = -1  # match_categories: a category whose annotations repair mode drops


@dataclass
class Report:
    """What loading found: problems by kind (with examples) and what was repaired or dropped."""

    source: str
    problems: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(self, kind: str, where: str, message: str) -> None:
        self.counts[kind] += 1
        self.problems.append(f"{where}: {message}")

    def raise_if_any(self, hint: str = "") -> None:
        if not self.problems:
            return
        shown = "\n".join(f"  - {p}" for p in self.problems[:MAX_LISTED])
        more = f"\n  ... and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        raise DatasetError(
            f"{self.source}: {len(self.problems)} problem(s) ({kinds})\n{shown}{more}{hint}", list(self.problems)
        )


def _clip_reason(mode: str, far: np.ndarray) -> str:
    if mode == "error" or not far.any():
        return f"boxes overhanging the image by <= {BOX_TOLERANCE:g} px clipped for training"
    return "boxes overhanging the image clipped for training (evaluated as written)"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _safe_relpath(name: str) -> bool:
    """Relative, without '..' components and without a Windows drive (backslashes already '/')."""
    return not (name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"))


class CocoIndex:
    """A validated COCO detection file held in flat numpy arrays.

    Attributes:
        image_ids, widths, heights: one entry per image (json order).
        ann_start: offsets; annotations of image i are rows ann_start[i]:ann_start[i+1].
        boxes: (N, 4) float32 xyxy; category_ids, iscrowd, areas: per annotation.
        label_map: category ids <-> labels 1..K.
        report: problems found and what was repaired, dropped or counted.
    """

    masks: Any = None  # a data.masks.MaskStore when the index was read with masks=True

    def __init__(
        self,
        path: str | Path,
        on_invalid: str = "clip",
        label_map: LabelMap | None = None,
        drop_empty: bool = False,
        allow_outside_root: bool = False,
        label_source: str | None = None,
        images_root: str | Path | None = None,
        read_headers: bool = True,
        progress: Any = None,
        max_pixels: int | None = None,
        masks: bool = False,
        option: str = "data.on_invalid",
    ) -> None:
        """Parse and validate a COCO detection json.

        Args:
            path: the annotation file.
            on_invalid: what to do with boxes and annotations that are not right as written.
                "clip" (the default) clips boxes that overhang the image for training (the
                evaluation ground truth keeps them as written) and stops on what cannot be meant
                (NaN, no size left after clipping, unknown image or category); "error" also stops
                on boxes that overhang by more than BOX_TOLERANCE px; "repair" clips and drops
                what cannot be repaired. Whatever is clipped or dropped is counted.
            label_map: the training split's map, for a validation split; None derives it here.
                Categories are matched by name for shared ids (see ``match_categories``).
            drop_empty: drop images without annotations (they are valid negatives otherwise).
            allow_outside_root: accept absolute file names and names with '..'.
            label_source: where ``label_map`` comes from (a file name), for error messages.
            images_root: the image folder; when given, the image files are checked before the
                boxes are (missing files, headers, sizes, EXIF orientation: see ``files``).
            read_headers: with images_root, open every header (size, EXIF) besides checking
                that the file exists.
            progress: optional wrapper for an iterable (a progress bar) for the header scan.
            max_pixels: with images_root, images declaring more pixels are listed as too large.
            masks: also parse and validate the instance masks (``segmentation``) into flat
                buffers (see data.masks); box-only families leave them unread.
            option: how messages name the ``on_invalid`` setting (a tool's ``--on-invalid``).

        Raises:
            DatasetError: naming the file, the json location and the id of every problem.
        """
        self.path = storage.local_or_url(path)  # a URL stays a string (Path would fold its '//')
        try:  # credentials belong in the storage client's config: a URL holding them is refused
            storage.check_url(path, "annotation file")
            if images_root is not None:
                storage.check_url(images_root, "image root")
            found = storage.isfile(self.path)
        except storage.StorageError as exc:
            raise DatasetError(str(exc)) from None
        if not found:
            raise DatasetError(f"annotation file not found: {storage.redact(self.path)}")
        try:
            data = read_json(self.path)
        except OSError as exc:  # a URL that cannot be read (permissions, network)
            raise DatasetError(f"{storage.redact(self.path)}: cannot read: {exc}") from None
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            raise DatasetError(f"{self.path}: not valid JSON: {exc}") from None
        except RecursionError:
            raise DatasetError(f"{self.path}: not a COCO file: its JSON is nested too deeply to read") from None
        self.report = Report(str(self.path))
        self.repairs: Counter = Counter()
        if not isinstance(data, dict):
            raise DatasetError(f"{self.path}: top level must be an object with images, annotations, categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                got = "missing" if key not in data else type(data[key]).__name__
                raise DatasetError(f"{self.path}: '{key}' must be a list ({got})")
        self.info = data.get("info") if isinstance(data.get("info"), dict) else {}
        if on_invalid not in ("error", "clip", "repair"):
            raise ValueError(f"on_invalid must be error, clip or repair, got {on_invalid!r}")
        self.on_invalid = on_invalid
        self.option = option
        repair = on_invalid == "repair"
        cats = self._parse_categories(data["categories"])
        img_ids, widths, heights, names = self._parse_images(data["images"], allow_outside_root, repair)
        if not data["images"]:
            raise DatasetError(f"{self.path}: 'images' is empty: nothing to train or evaluate on")
        # The image files come before the boxes: which frame the boxes are in depends on them.
        self.files: dict[str, list[tuple[int, str]]] = {}
        if images_root is not None:
            widths, heights = self._check_files(images_root, names, widths, heights, read_headers, progress, max_pixels)
        rows = self._parse_annotations_fast(data["annotations"], img_ids, widths, heights, cats)
        if rows is None:  # something needs a closer look: the item-by-item parser says what
            rows = self._parse_annotations(data["annotations"], img_ids, widths, heights, cats, repair)
        self.masks = None
        if masks:
            from detector.data.mask_index import parse_masks

            rows, self.masks = parse_masks(self, data["annotations"], rows, widths, heights, names, repair)
        del data
        # Problems that cannot be repaired, or any problem in "error" mode, stop here.
        self.report.raise_if_any("" if repair else f"\n(set {option}=repair to drop what cannot be used, counted)")
        ann_img, ann_cat, ann_box, ann_raw, ann_crowd, ann_area, ann_src = rows
        used = set(ann_cat.tolist())
        _refuse_duplicate_names(cats, self._supercategories, used, str(self.path))
        self.category_remap: dict[int, int] = {}  # this file's category id -> the label map's, where they differ
        if label_map is None:
            label_map, self.dropped_categories = _derive_label_map(cats, self._supercategories, used)
        else:
            self.dropped_categories = []
            remap = match_categories(
                cats, used, label_map, str(self.path), label_source or "the training split", repair, option
            )
            for c in [c for c, t in remap.items() if t == UNMATCHED]:
                n = int((ann_cat == c).sum())
                self.repairs[f"annotations of category {c} '{cats[c]}' (not a training class) dropped"] += n
            self.category_remap = {c: t for c, t in remap.items() if c != t}
            if self.category_remap:
                lut = {**{c: c for c in cats}, **remap}
                ann_cat = np.asarray([lut[c] for c in ann_cat.tolist()], dtype=np.int64)
        self.label_map = label_map
        known = np.isin(ann_cat, np.asarray(label_map.category_ids, dtype=np.int64))
        if not known.all():  # categories dropped above
            ann_img, ann_cat, ann_box, ann_raw, ann_crowd, ann_area, ann_src = (
                a[known] for a in (ann_img, ann_cat, ann_box, ann_raw, ann_crowd, ann_area, ann_src)
            )
        # Group annotations by image (stable: json order within an image).
        order = np.argsort(ann_img, kind="stable")
        counts = np.bincount(ann_img, minlength=len(img_ids))
        self.image_ids, self.widths, self.heights = img_ids, widths, heights
        self.ann_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.boxes = ann_box[order].astype(np.float32)  # xyxy, clipped to the image: training targets
        self.gt_xywh = ann_raw[order].astype(np.float64)  # as written: the evaluation ground truth
        self.category_ids = ann_cat[order]
        self.labels = label_map.to_labels(self.category_ids)
        self.iscrowd = ann_crowd[order]
        self.areas = ann_area[order].astype(np.float64)  # the json's area (w*h where it has none)
        self.source_rows = ann_src[order].astype(np.int64)  # each annotation's position in the json's list
        if self.masks is not None:
            self.masks.select(np.flatnonzero(known)[order] if not known.all() else order)
        self._set_names(names)
        self._check_swapped_frames()
        if self.masks is not None:
            from detector.data.mask_index import drop_maskless

            drop_maskless(self)
        if drop_empty:  # positions of now: images without masks may have been dropped above
            empty = np.flatnonzero(np.diff(self.ann_start) == 0)
            self.drop_images(empty, "images without annotations dropped (data.drop_empty)")

    # -- parsing -------------------------------------------------------------------------------

    def _check_files(self, root, names, widths, heights, read_headers, progress, max_pixels=None):
        """Scan the image files (see images.scan_images); returns the sizes the boxes are in.

        A json whose width/height is an image's stored size before a 90-degree EXIF rotation
        (Label Studio keeps it while drawing boxes on the rotated image) is taken to describe the
        rotated image: its width and height are swapped, and counted.
        """
        try:
            found = scan_images(
                root, names, np.stack([widths, heights], 1), read_headers, progress, max_pixels=max_pixels
            )
        except (storage.StorageError, OSError) as exc:  # a URL prefix that cannot be listed
            raise DatasetError(f"{storage.redact(self.path)}: image root: {exc}") from None  # exc names the URL
        swapped = [i for i, _ in found["exif_swapped"]]
        if swapped:
            widths, heights = widths.copy(), heights.copy()
            widths[swapped], heights[swapped] = heights[swapped], widths[swapped]
            self.repairs[EXIF_SWAPPED] += len(swapped)
        self.files = found
        return widths, heights

    def _check_swapped_frames(self) -> None:
        """The size swap above is a guess: a tool that ignores EXIF writes the same json with its
        boxes on the stored image. Boxes that do not fit the rotated image prove it wrong."""
        bad = []
        for i, _ in self.files.get("exif_swapped", []):
            s, e = self.ann_start[i], self.ann_start[i + 1]
            xywh = self.gt_xywh[s:e]
            w, h = float(self.widths[i]), float(self.heights[i])
            if len(xywh) and ((xywh[:, 0] + xywh[:, 2] > w + BOX_TOLERANCE).any()
                              or (xywh[:, 1] + xywh[:, 3] > h + BOX_TOLERANCE).any()):  # fmt: skip
                bad.append(f"{self.file_name(i)} (json {h:g}x{w:g}, EXIF-rotated {w:g}x{h:g})")
        if bad:
            listed = "\n".join(f"  - {b}" for b in bad[:MAX_LISTED])
            raise DatasetError(
                f"{self.path}: {len(bad)} image(s) whose json width/height is the size before their EXIF rotation "
                f"have boxes that do not fit the rotated image, so the boxes were drawn on the stored (unrotated) "
                f"image; detector decodes images rotated as EXIF says. Re-export with the EXIF orientation applied, "
                f"or strip the orientation tag from these files:\n{listed}"
            )

    def _parse_categories(self, items: list) -> dict[int, str]:
        cats: dict[int, str] = {}
        supers: dict[int, str] = {}
        for i, c in enumerate(items):
            where = f"categories[{i}]"
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                self.report.add("bad category", where, "needs an integer 'id'")
                continue
            if c["id"] in cats:
                self.report.add("duplicate category id", where, f"category id {c['id']} appears twice")
                continue
            name = c.get("name")
            cats[c["id"]] = str(name) if name is not None else f"class_{c['id']}"
            supers[c["id"]] = str(c.get("supercategory", ""))
        self._supercategories = supers
        if not cats and not self.report.problems:
            self.report.add("no categories", "categories", "the list is empty")
        return cats

    def _parse_images(self, items: list, allow_outside: bool, repair: bool):
        ids, ws, hs, names = [], [], [], []
        seen: set[int] = set()
        seen_names: dict[str, int] = {}
        self._rejected_images: set = set()
        for i, im in enumerate(items):
            if not isinstance(im, dict):
                self.report.add("bad image", f"images[{i}]", "must be an object")
                continue
            iid = im.get("id")
            where = f"images[{i}] (id {iid})"
            if not _is_int(iid):
                self.report.add("bad image", where, "needs an integer 'id'")
                continue
            if iid in seen:
                if repair:
                    self.repairs["duplicate image entries dropped (first kept)"] += 1
                else:
                    self.report.add("duplicate image id", where, f"image id {iid} appears more than once")
                continue
            name, w, h = im.get("file_name"), im.get("width"), im.get("height")
            if not isinstance(name, str) or not name:
                self.report.add("bad image", where, "needs a 'file_name' string")
                continue
            name = name.replace("\\", "/")
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                self.report.add("bad image", where, f"file_name {name!r} is not valid text (a lone surrogate)")
                self._rejected_images.add(iid)
                continue
            if name in seen_names:
                if repair:
                    self.repairs["images whose file_name another image id already has dropped (first kept)"] += 1
                else:
                    self.report.add(
                        "duplicate file_name",
                        where,
                        f"file_name '{name}' is also image id {seen_names[name]}: one image's boxes would be "
                        "trained on the other's pixels",
                    )
                self._rejected_images.add(iid)
                continue
            if not allow_outside and not _safe_relpath(name):
                self.report.add(
                    "file_name outside image root",
                    where,
                    f"file_name '{name}' is absolute or contains '..' (set data.allow_outside_root=true to allow)",
                )
                self._rejected_images.add(iid)
                continue
            if not (_is_num(w) and _is_num(h) and w > 0 and h > 0):
                self.report.add("bad image size", where, f"width/height must be positive numbers, got {w!r}/{h!r}")
                self._rejected_images.add(iid)
                continue
            seen.add(iid)
            seen_names[name] = iid
            ids.append(iid)
            ws.append(int(round(w)))
            hs.append(int(round(h)))
            names.append(name)
        return (np.asarray(ids, dtype=np.int64), np.asarray(ws, np.int32), np.asarray(hs, np.int32), names)

    def _parse_annotations_fast(self, items, img_ids, widths, heights, cats):
        """Vectorised parsing for files without problems (COCO-scale files load in seconds).

        Returns None as soon as anything looks wrong (a type, a missing key, a duplicate id, an
        unknown image or category, a bad box, a box overhanging more than the mode allows):
        ``_parse_annotations`` then goes item by item and reports or repairs each problem.
        Overhanging boxes are clipped (for training only) and counted here, as there.
        """
        n = len(items)
        if n == 0:
            e = np.empty(0)
            return (np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 4)), np.empty((0, 4)), e.astype(bool), e,
                    np.empty(0, np.int64))  # fmt: skip
        try:
            if not all(type(a) is dict for a in items):
                return None
            ids = [a.get("id") for a in items]
            image_ids = [a.get("image_id") for a in items]
            cat_ids = [a.get("category_id") for a in items]
            if not ({type(v) for v in ids} | {type(v) for v in image_ids} | {type(v) for v in cat_ids}) <= {int}:
                return None
            crowd_types = {type(a.get("iscrowd", 0)) for a in items}
            if not crowd_types <= {int, bool}:
                return None
            bbox_list = [a.get("bbox") for a in items]
            if any(type(v) is bool for b in bbox_list if isinstance(b, list) for v in b):
                return None  # numpy would read True as 1
            boxes = np.array(bbox_list)
            crowd = np.array([a.get("iscrowd", 0) for a in items])
            areas = np.array([a.get("area", math.nan) for a in items])
        except (TypeError, ValueError):
            return None
        if boxes.shape != (n, 4) or boxes.dtype.kind not in "if" or crowd.dtype.kind not in "biu":
            return None
        if not np.isin(crowd, (0, 1)).all():  # iscrowd 2 or -1: the item-by-item parser says so
            return None
        if areas.dtype.kind not in "iuf":
            return None
        if len(set(ids)) != n:
            return None
        order = np.argsort(img_ids, kind="stable")
        sorted_ids = img_ids[order]
        img_a = np.asarray(image_ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(sorted_ids, img_a), 0, max(len(sorted_ids) - 1, 0))
        if not len(sorted_ids) or not np.array_equal(sorted_ids[pos], img_a):
            return None
        img = order[pos]
        cat_a = np.asarray(cat_ids, dtype=np.int64)
        if not np.isin(cat_a, np.fromiter(cats, np.int64, len(cats))).all():
            return None
        boxes = boxes.astype(np.float64)
        if not np.isfinite(boxes).all() or (boxes[:, 2:] <= 0).any():
            return None
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        size = np.stack([widths[img], heights[img]], axis=1).astype(np.float64)
        far = (xyxy[:, :2] < -BOX_TOLERANCE).any(1) | (xyxy[:, 2:] > size + BOX_TOLERANCE).any(1)
        if self.on_invalid == "error" and far.any():
            return None
        over = (xyxy[:, :2] < 0).any(1) | (xyxy[:, 2:] > size).any(1)
        clipped = np.concatenate([np.maximum(xyxy[:, :2], 0), np.minimum(xyxy[:, 2:], size)], axis=1)
        wh = clipped[:, 2:] - clipped[:, :2]
        if (wh <= 0).any():
            return None
        areas = areas.astype(np.float64)
        no_area = ~(np.isfinite(areas) & (areas > 0))
        areas = np.where(no_area, boxes[:, 2] * boxes[:, 3], areas)
        if no_area.any():
            self.repairs[AREA_FILLED] += int(no_area.sum())
        for near_or_far in (over & ~far, over & far):  # counted as the item-by-item parser counts them
            if near_or_far.any():
                self.repairs[_clip_reason(self.on_invalid, far[near_or_far])] += int(near_or_far.sum())
        return img.astype(np.int64), cat_a, clipped, boxes, crowd.astype(bool), areas, np.arange(n, dtype=np.int64)

    def _parse_annotations(self, items, img_ids, widths, heights, cats, repair):
        id_to_idx = {int(i): k for k, i in enumerate(img_ids.tolist())}
        n = len(items)
        out_img = np.empty(n, np.int64)
        out_cat = np.empty(n, np.int64)
        out_box = np.empty((n, 4), np.float64)
        out_raw = np.empty((n, 4), np.float64)
        out_crowd = np.empty(n, bool)
        out_area = np.empty(n, np.float64)
        out_src = np.empty(n, np.int64)  # the json position of each kept annotation
        seen_ids: set = set()
        k = 0
        rep = self.report
        strict = self.on_invalid == "error"
        swapped = {i for i, _ in self.files.get("exif_swapped", [])}
        rejected = getattr(self, "_rejected_images", set())
        of_rejected: Counter = Counter()

        def swapped_hint(img: int) -> str:
            if img not in swapped:
                return ""
            return (
                " (the json gives this image's size before its EXIF rotation, taken as the rotated image's: "
                "do not fit the rotated image, so were they drawn on the stored one?)"
            )

        def reject(repaired: str, kind: str, where: str, message: str) -> None:
            # repair mode drops and counts; the other modes report (and stop after parsing)
            if repair:
                self.repairs[repaired] += 1
            else:
                rep.add(kind, where, message)

        for i, a in enumerate(items):
            if not isinstance(a, dict):
                rep.add("bad annotation", f"annotations[{i}]", "must be an object")
                continue
            aid = a.get("id")
            where = f"annotations[{i}] (id {aid})"
            if aid is None:
                if not repair:
                    rep.add("annotation without id", where, "has no 'id'")
                    continue
                self.repairs["annotations without id (kept)"] += 1
            elif aid in seen_ids:
                if not repair:
                    rep.add("duplicate annotation id", where, f"annotation id {aid} appears more than once")
                    continue
                self.repairs["duplicate annotation ids (kept, renumbered)"] += 1
            else:
                seen_ids.add(aid)
            img = id_to_idx.get(a.get("image_id")) if _is_int(a.get("image_id")) else None
            if img is None and _is_int(a.get("image_id")) and a.get("image_id") in rejected:
                of_rejected[a.get("image_id")] += 1  # reported once per image, below
                continue
            if img is None:
                reject(
                    "annotations of unknown images dropped",
                    "unknown image",
                    where,
                    f"image_id {a.get('image_id')!r} is not in 'images'",
                )
                continue
            cat = a.get("category_id")
            if not _is_int(cat) or cat not in cats:
                reject(
                    "annotations of unknown categories dropped",
                    "unknown category",
                    where,
                    f"category_id {cat!r} is not in 'categories'",
                )
                continue
            bbox = a.get("bbox")
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
                reject(
                    "annotations with a malformed bbox dropped",
                    "bad bbox",
                    where,
                    f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}",
                )
                continue
            crowd = a.get("iscrowd", 0)
            if not (crowd in (0, 1) and isinstance(crowd, (int, bool))):
                reject(
                    "annotations with a malformed iscrowd dropped",
                    "bad iscrowd",
                    where,
                    f"iscrowd must be 0 or 1, got {crowd!r}",
                )
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                reject(
                    "annotations with zero or negative width/height dropped",
                    "empty bbox",
                    where,
                    f"bbox width and height must be > 0, got {bbox}",
                )
                continue
            W, H = float(widths[img]), float(heights[img])
            x1, y1, x2, y2 = x, y, x + w, y + h
            area = a.get("area")
            area_filled = not (_is_num(area) and area > 0)
            area = w * h if area_filled else float(area)
            far = x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE or x2 > W + BOX_TOLERANCE or y2 > H + BOX_TOLERANCE
            cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(W, x2), min(H, y2)
            if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
                reject(
                    "boxes outside the image (nothing left after clipping) dropped",
                    "bbox outside image",
                    where,
                    f"bbox {bbox} lies outside the {int(W)}x{int(H)} image" + swapped_hint(img),
                )
                continue
            if far and strict:
                rep.add(
                    "bbox outside image",
                    where,
                    f"bbox {bbox} (xyxy {x1:g},{y1:g},{x2:g},{y2:g}) leaves the {int(W)}x{int(H)} image "
                    f"({self.option}=clip, the default, clips it for training)" + swapped_hint(img),
                )
                continue
            if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
                self.repairs[_clip_reason(self.on_invalid, np.asarray([far]))] += 1
            if area_filled:
                self.repairs[AREA_FILLED] += 1
            out_img[k], out_cat[k] = img, cat
            out_box[k] = (cx1, cy1, cx2, cy2)
            out_raw[k] = (x, y, w, h)
            out_crowd[k] = bool(crowd)
            out_area[k] = area
            out_src[k] = i
            k += 1
        for iid, n in sorted(of_rejected.items()):
            reject("annotations of rejected images dropped", "annotations of a rejected image", f"images (id {iid})",
                   f"its {n} annotation(s) are not used: the image entry was rejected above")  # fmt: skip
            if repair:
                self.repairs["annotations of rejected images dropped"] += n - 1
        return out_img[:k], out_cat[:k], out_box[:k], out_raw[:k], out_crowd[:k], out_area[:k], out_src[:k]

    def drop_images(self, positions: Sequence[int], reason: str) -> None:
        """Remove images (by position) and their annotations, counting them under ``reason``."""
        if not len(positions):
            return
        keep = np.ones(len(self), dtype=bool)
        keep[np.asarray(positions, dtype=np.int64)] = False
        counts = np.diff(self.ann_start)
        ann_keep = np.repeat(keep, counts)
        names = [self.file_name(i) for i in np.flatnonzero(keep)]
        self.image_ids, self.widths, self.heights = self.image_ids[keep], self.widths[keep], self.heights[keep]
        for attr in ("boxes", "gt_xywh", "category_ids", "labels", "iscrowd", "areas", "source_rows"):
            setattr(self, attr, getattr(self, attr)[ann_keep])
        if self.masks is not None:
            self.masks.select(np.flatnonzero(ann_keep))
        self.ann_start = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
        self._set_names(names)
        new_pos = np.cumsum(keep) - 1
        self.files = {k: [(int(new_pos[i]), m) for i, m in v if keep[i]] for k, v in self.files.items()}
        self.repairs[reason] += int((~keep).sum())

    def _set_names(self, names: list[str]) -> None:
        encoded = [n.encode("utf-8") for n in names]
        self._name_buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self._name_off = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)

    # -- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_annotations(self) -> int:
        return len(self.boxes)

    def file_name(self, i: int) -> str:
        return bytes(self._name_buf[self._name_off[i] : self._name_off[i + 1]]).decode("utf-8")

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes xyxy float32 (n, 4), labels 1..K (n,), iscrowd (n,)) of image i."""
        s, e = self.ann_start[i], self.ann_start[i + 1]
        return self.boxes[s:e], self.labels[s:e], self.iscrowd[s:e]

    def aspect_ratios(self) -> np.ndarray:
        return self.widths.astype(np.float32) / self.heights.astype(np.float32)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[~self.iscrowd], minlength=self.label_map.num_classes + 1)
        return {name: int(counts[i + 1]) for i, name in enumerate(self.label_map.names)}

    def to_coco_gt(self) -> dict[str, Any]:
        """A COCO ground-truth dict for COCOeval, with the dataset's own image and category ids.

        Boxes and areas are the json's own (boxes that overhang the image are clipped for
        training only). Annotation ids are renumbered from 1: pycocotools treats a match to
        annotation id 0 as "unmatched", which would score a perfect detection of it as a false
        positive. Category ids are the label map's (see ``category_remap``).
        """
        images = [
            {"id": int(i), "width": int(w), "height": int(h), "file_name": self.file_name(k)}
            for k, (i, w, h) in enumerate(zip(self.image_ids, self.widths, self.heights))
        ]
        img_of_ann = np.repeat(self.image_ids, np.diff(self.ann_start))
        xywh = self.gt_xywh  # as written in the json (pycocotools semantics), not clipped
        annotations = [
            {
                "id": k + 1,
                "image_id": int(img_of_ann[k]),
                "category_id": int(self.category_ids[k]),
                "bbox": [float(v) for v in xywh[k]],
                "area": float(self.areas[k]),
                "iscrowd": int(self.iscrowd[k]),
            }
            for k in range(len(xywh))
        ]
        if self.masks is not None:
            from detector.data.mask_index import gt_segmentations

            for a, seg in zip(annotations, gt_segmentations(self)):
                a["segmentation"] = seg
        categories = [{"id": c, "name": n} for c, n in zip(self.label_map.category_ids, self.label_map.names)]
        return {"info": dict(self.info), "images": images, "annotations": annotations, "categories": categories}

    def summary(self, images_root: str | Path | None = None) -> str:
        """A few lines for the console: counts, per-class annotations, what was repaired."""
        n_empty = int((np.diff(self.ann_start) == 0).sum())
        lines = [
            f"{self.path}: {len(self)} images ({n_empty} without objects), "
            f"{self.num_annotations} annotations ({int(self.iscrowd.sum())} crowd), "
            f"{self.label_map.num_classes} classes"
        ]
        counts = self.class_counts()
        lines.append("  per class: " + ", ".join(f"{n}={c}" for n, c in counts.items()))
        for c, name in self.dropped_categories:
            lines.append(f"  unused placeholder category {c} '{name}' left out of the classes")
        if self.category_remap:
            pairs = ", ".join(f"{c} -> {t} '{self.label_map.names[self.label_map.category_ids.index(t)]}'"
                              for c, t in sorted(self.category_remap.items()))  # fmt: skip
            lines.append(f"  categories matched to the training classes by name: {pairs}")
        rotated = len(self.files.get("exif_rotated", []))
        if rotated:
            lines.append(
                f"  {rotated} image(s) carry an EXIF orientation: decoded rotated, with boxes taken as drawn "
                "on the rotated (displayed) image"
            )
        for what, n in sorted(self.repairs.items()):
            lines.append(f"  repaired: {what}: {n}")
        maskless = getattr(self, "maskless_names", [])
        if maskless:
            more = f" ... and {len(maskless) - MAX_LISTED} more" if len(maskless) > MAX_LISTED else ""
            lines.append(f"  images dropped for annotations without a mask: {', '.join(maskless[:MAX_LISTED])}{more}")
        return "\n".join(lines)


def match_categories(
    cats: dict[int, str],
    used: set[int],
    label_map: LabelMap,
    path: str,
    label_source: str,
    repair: bool = False,
    option: str = "data.on_invalid",
) -> dict[int, int]:
    """Map a split's categories onto a label map (the training split's) by name.

    A category whose id and name both match keeps its id; one whose name is a training class
    under another id is mapped to that id (separately exported splits often number classes in
    another order). A used category whose name is not a training class stops with both files
    named: scoring it under the training class of the same id would count dogs as cats
    (``repair`` drops its annotations instead, counted). Unused categories that match nothing
    (Roboflow's placeholder) are left out.

    Returns:
        {this file's category id: the label map's category id (UNMATCHED for dropped ones)}.

    Raises:
        DatasetError: a used category matching no training class, or a label map (a checkpoint
            trained before such files were refused) with two classes of one name.
    """
    _refuse_duplicate_names(
        dict(zip(label_map.category_ids, label_map.names)), {}, set(), label_source,
        "The model was trained before such classes were refused (e.g. with Roboflow's placeholder category "
        "taken as a class): train it again on this data, which leaves the placeholder out",
    )  # fmt: skip
    by_name: dict[str, int] = {}
    for c, n in zip(label_map.category_ids, label_map.names):
        by_name.setdefault(n, c)
    by_id = dict(zip(label_map.category_ids, label_map.names))
    remap: dict[int, int] = {}
    bad = []
    for cid, name in sorted(cats.items()):
        if by_id.get(cid) == name:
            remap[cid] = cid
        elif name in by_name:
            remap[cid] = by_name[name]
        elif cid in used:
            theirs = f"'{by_id[cid]}'" if cid in by_id else "no such id"
            bad.append(f"category {cid} '{name}' (in {label_source}: {theirs})")
            if repair:  # its annotations are dropped and counted
                remap[cid] = UNMATCHED
    if bad and not repair:
        classes = ", ".join(f"{c} '{n}'" for c, n in zip(label_map.category_ids, label_map.names))
        raise DatasetError(
            f"{path}: categories do not match {label_source}: "
            + "; ".join(bad)
            + f". The model's classes are {classes}; categories are matched by name, so rename or relabel "
            f"the categories of one of the files ({option}=repair drops their annotations instead)."
        )
    return remap


def _derive_label_map(
    cats: dict[int, str], supers: dict[int, str], used: set[int]
) -> tuple[LabelMap, list[tuple[int, str]]]:
    """Contiguous labels for the categories, in id order.

    An unused category whose name is the supercategory of other categories is Roboflow's
    dataset-level placeholder, not a class: it is left out (and reported). Other unused
    categories stay, so that the label map matches what the user declared.
    """
    placeholders = _placeholders(cats, supers, used)
    keep = [c for c in sorted(cats) if c not in placeholders]
    dropped = [(c, cats[c]) for c in sorted(placeholders)]
    return LabelMap(tuple(keep), tuple(cats[c] for c in keep)), dropped


def _placeholders(cats: dict[int, str], supers: dict[int, str], used: set[int]) -> set[int]:
    """Roboflow's dataset-level placeholders: unused categories named as the supercategory of
    another category. Its name may be a class's own (a one-class export of "car" has placeholder
    0 'car' and class 1 'car' under supercategory 'car'); a category that is its own
    supercategory (COCO's 'person') does not make itself a placeholder."""
    parents: dict[str, set[int]] = {}
    for c, s in supers.items():
        if s:
            parents.setdefault(s, set()).add(c)
    return {c for c, n in cats.items() if c not in used and parents.get(n, set()) - {c}}


def _refuse_duplicate_names(
    cats: dict[int, str], supers: dict[int, str], used: set[int], path: str, advice: str | None = None
) -> None:
    """Two classes with one name would share one per-class result (AP, error analysis, the label
    names of predictions): class 1 found perfectly and class 2 missed would read ``car: 0.0``.
    Roboflow's placeholder (see ``_placeholders``) may share a class's name: it is not a class.

    Args:
        advice: what to do about it (default: for a json: rename or relabel).

    Raises:
        DatasetError: naming the file, the name and every id that carries it.
    """
    placeholders = _placeholders(cats, supers, used)
    ids_of: dict[str, list[int]] = {}
    for c in sorted(cats):
        if c not in placeholders:
            ids_of.setdefault(cats[c], []).append(c)
    dup = {n: ids for n, ids in ids_of.items() if len(ids) > 1}
    if dup:
        listed = "; ".join(f"'{n}' is category " + " and ".join(str(c) for c in ids) for n, ids in dup.items())
        raise DatasetError(
            f"{path}: categories share a name ({listed}): their per-class results would be merged under one "
            "name. " + (advice or "Give each category its own name, or relabel its annotations to one id")
        )


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets of a CocoIndex, decoded and augmented.

    Items are ``(image, target)``: image a uint8 tensor (3, H, W) (the float conversion happens
    where the model runs), target a dict with ``boxes`` float32 (n, 4) xyxy, ``labels`` int64
    (n,) in 1..K (crowd annotations left out), ``index``, ``image_id``, ``scale`` (the decoded
    size over the json size, to map predictions back) and ``dropped`` (boxes that degenerated
    under augmentation). A key may be ``(index, seed)``: the augmentation of that item is then a
    pure function of the seed, whatever worker or process draws it.
    """

    def __init__(
        self,
        index: CocoIndex,
        images_root: str | Path,
        transform: Any = None,
        model_size: tuple[int, int] | None = None,
        on_corrupt_image: str = "error",
    ) -> None:
        """Args:
        index: the validated annotations.
        images_root: folder that file names are relative to.
        transform: an Albumentations pipeline (see data.transforms), or None.
        model_size: (min_size, max_size) of the model's resize; JPEGs larger than that are
            decoded at reduced scale (never below it). None decodes at full size.
        on_corrupt_image: "error" raises naming the file; "skip" returns None (the collate
            function drops it and counts it).
        """
        self.index = index
        self.root = str(images_root)
        self.transform = transform
        self.model_size = model_size
        self.on_corrupt_image = on_corrupt_image

    def __len__(self) -> int:
        return len(self.index)

    def path(self, i: int) -> str:
        return storage.join(self.root, self.index.file_name(i))

    def _decode_size(self, i: int) -> tuple[int, int] | None:
        return decode_size(int(self.index.widths[i]), int(self.index.heights[i]), self.model_size)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]] | None:
        i, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
        try:
            arr, sx, sy = load_image(self.path(i), self._decode_size(i))
        except ImageDecodeError as exc:
            if self.on_corrupt_image == "skip":
                return None
            raise DatasetError(f"{exc} (set data.on_corrupt_image=skip to skip such images)") from None
        boxes, labels, crowd = self.index.annotations(i)
        boxes, labels = boxes[~crowd], labels[~crowd]
        h0, w0 = arr.shape[:2]
        if sx != 1.0 or sy != 1.0:
            boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        boxes = np.clip(boxes, 0, [w0, h0, w0, h0]).astype(np.float32)
        masks = None
        if self.index.masks is None:
            arr, boxes, labels = apply(self.transform, arr, boxes, labels, seed)
        else:
            from detector.data.mask_index import apply_with_masks, item_masks

            masks = item_masks(self.index, i, (w0, h0), (sx, sy))
            arr, boxes, labels, masks = apply_with_masks(self.transform, arr, boxes, labels, masks, seed)
        h1, w1 = arr.shape[:2]
        wh = boxes[:, 2:] - boxes[:, :2]
        ok = np.isfinite(boxes).all(1) & (wh >= 1.0).all(1)
        if masks is not None:  # a mask that vanished under augmentation goes with its box
            ok &= masks.any(axis=(1, 2))
        dropped = int(len(crowd) - int(crowd.sum()) - int(ok.sum()))
        if not arr.flags.writeable:  # PIL's arrays are read-only; torch wants to own writable memory
            arr = arr.copy()
        image = torch.from_numpy(arr).permute(2, 0, 1)  # a CHW view: no copy
        target = {
            "boxes": torch.from_numpy(boxes[ok]).reshape(-1, 4),
            "labels": torch.from_numpy(labels[ok]).reshape(-1),
            "index": i,
            "image_id": int(self.index.image_ids[i]),
            # decoded content scale (relative to the json size), times any resize the pipeline made
            "scale": (sx * w1 / w0, sy * h1 / h0),
            "size": (int(self.index.widths[i]), int(self.index.heights[i])),  # json (width, height)
            "dropped": dropped,
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks[ok]))
        return image, target
