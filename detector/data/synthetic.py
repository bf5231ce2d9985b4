"""The built-in demo dataset: shapes on textured backgrounds, written as a COCO export.

Deterministic for a seed. It deliberately carries the quirks real exports have: category ids
that are not contiguous (and an unused placeholder category, as Roboflow writes), images
without objects, and several image sizes (landscape and portrait).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Non-contiguous ids on purpose; id 0 is an unused placeholder like Roboflow's supercategory.
CATEGORIES = [
    {"id": 0, "name": "shapes", "supercategory": "none"},
    {"id": 3, "name": "circle", "supercategory": "shapes"},
    {"id": 7, "name": "square", "supercategory": "shapes"},
    {"id": 12, "name": "triangle", "supercategory": "shapes"},
]
SIZES = [(192, 192), (256, 192), (192, 256), (224, 160)]  # (width, height)
EMPTY_FRACTION = 0.08


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour gradient + blotches + fine noise: enough texture that shapes are not trivial."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.4, 0.4, size=(3, 2))
    img = base[None, None, :] + xx[..., None] * slope[:, 0] + yy[..., None] * slope[:, 1]
    for _ in range(int(rng.integers(3, 8))):  # soft blotches
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 60)
        d = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += d[..., None] * rng.uniform(-50, 50, size=3)
    img += rng.normal(0, 10, size=img.shape)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):  # thin clutter lines
        pts = [tuple(rng.uniform(0, [w, h]).tolist()) for _ in range(2)]
        draw.line(pts, fill=tuple(rng.integers(0, 255, 3).tolist()), width=int(rng.integers(1, 3)))
    return im.filter(ImageFilter.GaussianBlur(0.6))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float], color: tuple) -> None:
    x1, y1, x2, y2 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)


def _polygon(kind: str, box: list[float]) -> list[float]:
    """The shape's outline as one COCO polygon part (what _draw_shape fills)."""
    x1, y1, x2, y2 = box
    if kind == "circle":
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        pts = [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    elif kind == "square":
        pts = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    else:
        pts = [((x1 + x2) / 2, y1), (x2, y2), (x1, y2)]
    return [round(float(v), 2) for p in pts for v in p]


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _make_split(
    root: Path,
    split: str,
    n: int,
    seed: int,
    masks: bool = True,
    sizes: list[tuple[int, int]] = SIZES,
    object_px: tuple[float, float] = (22, 64),
    objects: tuple[int, int] = (1, 5),
) -> Path:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    classes = [c for c in CATEGORIES if c["supercategory"] == "shapes"]
    images, annotations = [], []
    ann_id = 1
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        im = _background(rng, w, h)
        draw = ImageDraw.Draw(im)
        n_obj = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(*objects))
        boxes: list[list[float]] = []
        for _ in range(n_obj):
            for _attempt in range(20):
                s = float(rng.uniform(*object_px))
                ar = float(rng.uniform(0.75, 1.33))
                bw, bh = s * math.sqrt(ar), s / math.sqrt(ar)
                x1, y1 = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
                box = [x1, y1, x1 + bw, y1 + bh]
                if all(_iou(box, b) < 0.1 for b in boxes):
                    break
            else:
                continue
            cat = classes[int(rng.integers(len(classes)))]
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            _draw_shape(draw, cat["name"], tuple(box), color)  # type: ignore[arg-type]
            boxes.append(box)
            x, y = round(box[0], 2), round(box[1], 2)
            bw, bh = round(box[2] - box[0], 2), round(box[3] - box[1], 2)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": cat["id"],
                    "bbox": [x, y, bw, bh],
                    "area": round(bw * bh, 2),
                    "iscrowd": 0,
                    "segmentation": [_polygon(cat["name"], box)] if masks else [],
                }
            )
            ann_id += 1
        name = f"{split}_{i:05d}.jpg"
        im.save(img_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    ann_path = root / f"{split}.json"
    coco = {
        "info": {"description": "detector built-in demo dataset", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(ann_path)  # the json appears last: its presence means the split is complete
    return ann_path


def make_dataset(
    root: str | Path, num_train: int = 384, num_val: int = 96, seed: int = 0, masks: bool = True
) -> dict[str, Path]:
    """Write the demo dataset.

    Args:
        root: output folder; gets train.json, val.json, train/ and val/.
        num_train: training images.
        num_val: validation images.
        seed: the dataset is a pure function of (seed, counts).
        masks: write each shape's outline as its polygon ``segmentation`` (Mask R-CNN); the
            images and boxes are the same either way.

    Returns:
        Paths of the annotation files, by split.
    """
    root = Path(root)
    return {
        "train": _make_split(root, "train", num_train, seed, masks),
        "val": _make_split(root, "val", num_val, seed, masks),
    }


def ensure_dataset(root: str | Path, num_train: int, num_val: int, seed: int) -> dict[str, Path]:
    """Generate the demo dataset unless a complete one with these settings is already there."""
    root = Path(root)
    stamp = root / "SETTINGS.json"
    want = {"num_train": num_train, "num_val": num_val, "seed": seed, "version": 2}  # 2: with polygons
    complete = (root / "train.json").is_file() and (root / "val.json").is_file()
    if complete and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return {"train": root / "train.json", "val": root / "val.json"}
    paths = make_dataset(root, num_train, num_val, seed)
    stamp.write_text(json.dumps(want))
    return paths


def make_large_dataset(
    root: str | Path,
    num_train: int = 8,
    num_val: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (3000, 2000),
    object_px: tuple[float, float] = (16, 32),
    objects: tuple[int, int] = (150, 301),
    masks: bool = True,
    val_objects: tuple[int, int] | None = (30, 61),
) -> dict[str, Path]:
    """The demo shapes, small, on large images: what sliced inference is for.

    Args:
        root: output folder; gets train.json, val.json, train/ and val/.
        num_train: training images.
        num_val: validation images.
        seed: the dataset is a pure function of its arguments.
        size: (width, height) of every image (its portrait twin every other image).
        object_px: the range of the objects' size (about their side) in pixels.
        objects: objects per training image, drawn from [low, high).
        masks: write polygon segmentations (Mask R-CNN).
        val_objects: objects per validation image (None: as ``objects``). The default keeps
            them under COCOeval's 100 scored detections per image (maxDets), which would
            otherwise cap recall, while training images stay dense.

    Returns:
        Paths of the annotation files, by split.
    """
    root = Path(root)
    w, h = size
    opts = {"sizes": [(w, h), (h, w)], "object_px": object_px, "objects": objects}
    return {
        "train": _make_split(root, "train", num_train, seed, masks, **opts),  # type: ignore[arg-type]
        "val": _make_split(root, "val", num_val, seed, masks, **{**opts, "objects": val_objects or objects}),  # type: ignore[arg-type]
    }
