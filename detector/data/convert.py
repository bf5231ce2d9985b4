"""YOLO, Pascal VOC, CVAT (XML) and labelme annotations to one COCO detection json.

The formats are parsed by globox (``pip install 'detector[convert]'``), which reads all four
into one box model (absolute xmin/ymin/xmax/ymax per labelled image). What it leaves to us, and
what this module therefore does itself:

- image sizes for YOLO come from our own header reader (EXIF orientation applied, as the data
  layer and Ultralytics read them; globox's reader ignores EXIF), and YOLO images without a
  label file are kept as negatives (globox lists label files only);
- class names: YOLO's indices are mapped to the names of data.yaml / classes.txt; CVAT's label
  list gives the class order (globox reads boxes only); the others are sorted by name unless
  ``classes`` is given;
- Pascal VOC coordinates are 1-based inclusive pixel indices in the VOC devkit (a box covering
  a whole W-wide image is xmin=1, xmax=W): ``voc_origin=1`` (the default) maps them to COCO's
  continuous frame as x = xmin - 1, w = xmax - xmin + 1 (detectron2 reads VOC the same way);
  ``voc_origin=0`` takes them as 0-based continuous coordinates (what CVAT and Label Studio
  write in their VOC exports); objects marked ``difficult`` stay ordinary annotations (COCO has
  no such flag), counted;
- every error names the source file (and line or object) at fault, and the result is checked
  by loading it with ``CocoIndex`` in strict mode (``on_invalid=error``) against the images.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detector.core.errors import MAX_LISTED, DatasetError
from detector.core.images import header_info
from detector.data.coco import BOX_TOLERANCE, CocoIndex

FORMATS = ("yolo", "voc", "cvat", "labelme")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Converted:
    """The COCO dict, what conversion counted (negatives, ignored shapes...) and warnings about
    what the data suggests was read under the wrong convention."""

    coco: dict[str, Any]
    counts: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)


class _Problems:
    """Collects located problems and raises them together, as CocoIndex's report does."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            shown = "\n".join(f"  - {p}" for p in self.items[:MAX_LISTED])
            more = f"\n  ... and {len(self.items) - MAX_LISTED} more" if len(self.items) > MAX_LISTED else ""
            raise DatasetError(f"{self.source}: {len(self.items)} problem(s)\n{shown}{more}", list(self.items))


def _globox():
    try:
        import globox
    except ImportError:
        raise DatasetError("tools/convert_dataset.py needs globox: pip install 'detector[convert]'") from None
    return globox


def read_class_names(path: str | Path) -> list[str]:
    """Class names from classes.txt (one a line) or a YOLO data.yaml (``names:`` list or {index: name})."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class names file not found: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        try:
            names = OmegaConf.to_container(OmegaConf.load(path)).get("names")  # type: ignore[union-attr]
        except Exception as exc:  # omegaconf raises its own error types for bad YAML
            raise DatasetError(f"{path}: not readable YAML: {exc}") from None
        if isinstance(names, dict) and all(isinstance(k, int) for k in names):
            if sorted(names) != list(range(len(names))):
                raise DatasetError(f"{path}: 'names' indices must be 0..{len(names) - 1}, got {sorted(names)}")
            names = [names[i] for i in range(len(names))]
        if not (isinstance(names, list) and names and all(isinstance(n, (str, int)) for n in names)):
            raise DatasetError(f"{path}: needs 'names': a list of class names or {{index: name}}")
        out = [str(n) for n in names]
    else:
        out = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    dup = [n for n, c in Counter(out).items() if c > 1]
    if not out or dup:
        raise DatasetError(f"{path}: " + (f"class names appear twice: {dup}" if dup else "no class names"))
    return out


def _image_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def _from_yolo(labels: Path, images: Path, names: list[str], problems: _Problems, counts: Counter):
    """(file_name, (w, h), [(name, xmin, ymin, xmax, ymax, where)]) per image."""
    globox = _globox()
    files = _image_files(images)
    by_stem: dict[str, str] = {}
    for f in files:
        stem = os.path.splitext(f)[0]
        if stem in by_stem:
            problems.add(str(images / f), f"two images share the label name {stem}.txt: {by_stem[stem]} and {f}")
        by_stem[stem] = f
    label_files = sorted(p.relative_to(labels).as_posix() for p in labels.rglob("*.txt") if p.name != "classes.txt")
    for lf in label_files:
        if os.path.splitext(lf)[0] not in by_stem:
            problems.add(str(labels / lf), f"no image for this label file under {images}")
    out = []
    for f in files:
        try:
            w, h, _ = header_info(images / f)
        except (OSError, ValueError, SyntaxError) as exc:
            problems.add(str(images / f), f"cannot read image header: {exc}")
            continue
        lf = labels / (os.path.splitext(f)[0] + ".txt")
        boxes = []
        if lf.is_file():
            lines = lf.read_text().splitlines()
            ok = _check_yolo_lines(lf, lines, len(names), problems)
            if ok:  # globox turns the checked lines into absolute boxes with the header's size;
                # line by line: its file reader fails on a blank line (an empty negative's file)
                for k, line in enumerate(lines, 1):
                    if line.strip():
                        b = globox.BoundingBox.from_yolo_darknet(line, image_size=(w, h))
                        boxes.append((names[int(b.label)], b.xmin, b.ymin, b.xmax, b.ymax, f"{lf}:{k}"))
        else:
            counts["images without a label file (kept as negatives)"] += 1
        out.append((f, (w, h), boxes))
    return out


def _check_yolo_lines(path: Path, lines: list[str], num_classes: int, problems: _Problems) -> bool:
    """class cx cy w h per line, normalised to [0, 1] (a detection file's 6th value is refused)."""
    before = len(problems.items)
    for k, line in enumerate(lines, 1):
        values = line.split()
        if not values:
            continue
        where = f"{path}:{k}"
        if len(values) != 5:
            what = "a polygon (segmentation label)" if len(values) > 6 else f"{len(values)} values"
            problems.add(where, f"expected 'class cx cy w h', got {what}: {line.strip()[:80]!r}")
            continue
        if not (values[0].isdigit() and int(values[0]) < num_classes):
            problems.add(where, f"class {values[0]!r} is not an index 0..{num_classes - 1} of the class names")
            continue
        try:
            cx, cy, bw, bh = (float(v) for v in values[1:])
        except ValueError:
            problems.add(where, f"coordinates must be numbers: {line.strip()[:80]!r}")
            continue
        if not all(math.isfinite(v) for v in (cx, cy, bw, bh)) or bw <= 0 or bh <= 0:
            problems.add(where, f"width and height must be positive finite numbers: {line.strip()[:80]!r}")
        elif max(cx + bw / 2, cy + bh / 2) > 1.01 or min(cx - bw / 2, cy - bh / 2) < -0.01:
            problems.add(where, f"box leaves the image: YOLO coordinates are normalised to [0, 1]: {line.strip()!r}")
    return len(problems.items) == before


def _from_voc(folder: Path, origin: int, problems: _Problems, counts: Counter, warnings: list[str]):
    globox = _globox()
    out = []
    zeros: list[str] = []  # objects with a coordinate of 0, which 1-based pixel indices cannot have
    for xml in sorted(folder.rglob("*.xml")):
        try:
            ann = globox.Annotation.from_xml(xml)
            # globox drops VOC's difficult flag; COCO has none either: such objects stay, counted
            difficult = sum(o.findtext("difficult", "0").strip() == "1" for o in ET.parse(xml).getroot().iter("object"))
        except (globox.ParsingError, ET.ParseError, ValueError, AssertionError) as exc:
            problems.add(str(xml), f"not a Pascal VOC annotation: {exc or 'needs filename, size and objects'}")
            continue
        if difficult:
            counts["VOC objects marked difficult (kept as ordinary annotations)"] += difficult
        shift = 1.0 if origin == 1 else 0.0  # 1-based inclusive pixel indices: see the module docstring
        if origin == 1:
            zeros += [f"{xml} object {k + 1}" for k, b in enumerate(ann.boxes) if min(b.xmin, b.ymin) == 0]
        boxes = [(b.label, b.xmin - shift, b.ymin - shift, b.xmax, b.ymax, f"{xml} object {k + 1}")
                 for k, b in enumerate(ann.boxes)]  # fmt: skip
        out.append((ann.image_id, ann.image_size, boxes))
    if not out:
        problems.add(str(folder), "no .xml files")
    if zeros:
        warnings.append(
            f"{len(zeros)} VOC object(s) have a coordinate of 0 (e.g. {zeros[0]}), which the 1-based pixel "
            "indices of --voc-origin 1 (the default) cannot have: this export looks 0-based (CVAT and Label "
            "Studio write VOC that way), and its boxes were shifted 1 px left and up; convert it with --voc-origin 0"
        )
    return out


def _from_cvat(xml: Path, problems: _Problems, counts: Counter):
    globox = _globox()
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DatasetError(f"{xml}: not readable XML: {exc}") from None
    tracks = len(root.findall("track"))
    if tracks:  # "CVAT for video": boxes per track and frame, which the image format's reader does not see
        raise DatasetError(
            f"{xml}: {tracks} track(s): this is a 'CVAT for video 1.1' export; export the task as "
            "'CVAT for images 1.1' (boxes per image) and convert that"
        )
    for k, node in enumerate(root.iter("image")):
        where = f"{xml}: image {node.get('name')!r} (#{k + 1})"
        for j, box in enumerate(node.iter("box")):
            if float(box.get("rotation", 0) or 0) != 0:
                problems.add(
                    f"{where} box {j + 1}", f"rotated by {box.get('rotation')} degrees: COCO boxes are axis-aligned"
                )
        for shape in ("polygon", "polyline", "points", "mask", "ellipse", "cuboid", "skeleton"):
            counts[f"CVAT {shape} shapes ignored (boxes only)"] += len(node.findall(shape))
    try:
        ann_set = globox.AnnotationSet.from_cvat(xml)
    except (globox.ParsingError, ValueError, AssertionError) as exc:
        raise DatasetError(f"{xml}: not a CVAT for images 1.1 XML export: {exc}") from None
    out = [(a.image_id, a.image_size, [(b.label, b.xmin, b.ymin, b.xmax, b.ymax, f"{xml}: image {a.image_id!r} box {j + 1}")
           for j, b in enumerate(a.boxes)]) for a in ann_set]  # fmt: skip
    labels = [n.findtext("name") for n in root.iterfind("./meta/*/labels/label")]
    return out, [n for n in labels if n]


def _from_labelme(folder: Path, images: Path, include_poly: bool, problems: _Problems, counts: Counter):
    globox = _globox()
    out = []
    for js in sorted(folder.rglob("*.json")):
        try:
            ann = globox.Annotation.from_labelme(js, include_poly=include_poly)
            shapes = json.loads(js.read_text()).get("shapes", [])
        except (globox.ParsingError, ValueError, AssertionError, AttributeError) as exc:
            problems.add(str(js), f"not a labelme file (needs imagePath, imageWidth, imageHeight, shapes): {exc}")
            continue
        kept = {"rectangle", "polygon"} if include_poly else {"rectangle"}
        counts["labelme shapes other than rectangles ignored"] += sum(
            1 for s in shapes if isinstance(s, dict) and s.get("shape_type") not in kept
        )
        # imagePath is relative to the json file; file_name must be relative to the image root
        image = js.parent / ann.image_id.replace("\\", "/")
        image = image.parent.resolve() / image.name  # the folders resolved, not the file: it may be a symlink
        try:
            name = image.relative_to(images.resolve()).as_posix()
        except ValueError:
            problems.add(str(js), f"imagePath {ann.image_id!r} is not under the image root {images}")
            continue
        boxes = [(b.label, b.xmin, b.ymin, b.xmax, b.ymax, f"{js} shape {k + 1}") for k, b in enumerate(ann.boxes)]
        out.append((name, ann.image_size, boxes))
    if not out and not problems.items:
        problems.add(str(folder), "no labelme .json files")
    return out


def convert(
    fmt: str,
    source: str | Path,
    images: str | Path,
    classes: list[str] | None = None,
    voc_origin: int = 1,
    include_poly: bool = False,
) -> Converted:
    """Read a dataset in ``fmt`` as a COCO detection dict.

    Args:
        fmt: yolo, voc, cvat or labelme.
        source: yolo: the labels folder; voc and labelme: the folder of .xml / .json files;
            cvat: the annotations.xml file.
        images: the image root (file names are relative to it; YOLO reads image sizes here).
        classes: class names in order (YOLO: index order, required); others: the category
            order (None: CVAT's label list, else sorted by name). Names not listed are errors.
        voc_origin: 1 for the VOC devkit's 1-based inclusive pixel indices, 0 for 0-based. With
            1, a coordinate of 0 (which 1-based data cannot have) is a warning in the result.
        include_poly: labelme polygons as their bounding boxes (rectangles only otherwise).

    Raises:
        DatasetError: naming each source file (and line, object or shape) at fault.
    """
    source, images = Path(source), Path(images)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    if not source.exists():
        raise DatasetError(f"{fmt} annotations not found: {source}")
    if not images.is_dir():
        raise DatasetError(f"image folder not found: {images}")
    problems = _Problems(str(source))
    counts: Counter = Counter()
    warnings: list[str] = []
    if fmt == "yolo":
        if not classes:
            raise DatasetError(
                f"{source}: YOLO labels hold class indices: give the class names (data.yaml or classes.txt)"
            )
        items = _from_yolo(source, images, classes, problems, counts)
    elif fmt == "voc":
        items = _from_voc(source, voc_origin, problems, counts, warnings)
    elif fmt == "cvat":
        items, cvat_labels = _from_cvat(source, problems, counts)
        classes = classes or cvat_labels or None
    else:
        items = _from_labelme(source, images, include_poly, problems, counts)
    problems.raise_if_any()
    if fmt != "yolo":  # these formats list annotated images only: say what the folder holds besides
        listed = {f for f, _, _ in items}
        unlisted = sum(1 for f in _image_files(images) if f not in listed)
        if unlisted:
            counts["image files under the image root without annotations (left out)"] = unlisted
    return Converted(_to_coco(items, classes, problems), counts, warnings)


def _to_coco(items, classes: list[str] | None, problems: _Problems) -> dict[str, Any]:
    used = sorted({b[0] for _, _, boxes in items for b in boxes})
    names = list(classes) if classes else used
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images, annotations, seen = [], [], {}
    for file_name, size, boxes in sorted(items, key=lambda t: t[0]):
        if file_name in seen:
            problems.add(boxes[0][5] if boxes else file_name, f"image {file_name} is annotated twice")
            continue
        if size is None:
            problems.add(file_name, "no image size")
            continue
        image_id = seen[file_name] = len(images) + 1
        w, h = size
        images.append({"id": image_id, "file_name": file_name, "width": int(w), "height": int(h)})
        for label, x1, y1, x2, y2, where in boxes:
            if label not in cat_id:
                problems.add(where, f"class {label!r} is not one of the given class names {names}")
                continue
            if not (x2 - x1 > 0 and y2 - y1 > 0):
                problems.add(where, f"empty box xyxy ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
                continue
            tol = BOX_TOLERANCE
            if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
                problems.add(where, f"box xyxy ({x1:g}, {y1:g}, {x2:g}, {y2:g}) leaves the {w}x{h} image")
                continue
            bw, bh = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[label],
                                "bbox": [x1, y1, bw, bh], "area": bw * bh, "iscrowd": 0})  # fmt: skip
    problems.raise_if_any()
    categories = [{"id": i, "name": n, "supercategory": ""} for n, i in cat_id.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def validate(path: str | Path, images: str | Path | None, progress: Callable | None = None) -> CocoIndex:
    """Load a written COCO file as training will, in strict mode: every box inside its image,
    every image file present and of the size the json says (EXIF applied).

    Raises:
        DatasetError: what the data layer would say about it.
    """
    index = CocoIndex(path, on_invalid="error", images_root=images, progress=progress)
    bad = [m for kind in ("missing", "unreadable", "size_mismatch", "too_large") for _, m in index.files.get(kind, [])]
    if bad:
        shown = "\n".join(f"  - {m}" for m in bad[:MAX_LISTED])
        raise DatasetError(f"{path}: {len(bad)} image file problem(s):\n{shown}")
    return index
