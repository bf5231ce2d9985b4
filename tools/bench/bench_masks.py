"""Instance masks in the index: memory per DataLoader worker and load time, at scale.

    python tools/bench/bench_masks.py [--images 100000 --per-image 3 --workers 2]

Generates a json of polygon annotations (one or two parts each, 6-16 points a part) and
measures: the load time of CocoIndex without masks (what box families pay) and with them
(Mask R-CNN), the size of the mask buffers, and the USS growth of forked workers that each read
every item's masks, rasterised as the dataset does, against the same masks kept as a Python
list of dicts (copy-on-read). The images are small (96x96) so that rasterising stays cheap: the
index, not the pixels, is what is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--per-image", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="also measure the list-of-dicts baseline")
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


import numpy as np
from pycocotools import mask as mask_utils

from detector.data.coco import CocoIndex
from detector.data.mask_index import item_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import worker_growth

SIZE = 96


def make_json(path: Path, n_images: int, per_image: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    images = [{"id": i, "file_name": f"{i:09d}.jpg", "width": SIZE, "height": SIZE} for i in range(1, n_images + 1)]
    anns = []
    for i in range(1, n_images + 1):
        for _ in range(per_image):
            cx, cy, r = rng.uniform(20, 76, 2).tolist() + [float(rng.uniform(5, 18))]
            parts = []
            for p in range(int(rng.integers(1, 3))):
                n = int(rng.integers(6, 17))
                t = np.sort(rng.uniform(0, 2 * np.pi, n))
                rad = r * rng.uniform(0.6, 1.0, n) / (p + 1)
                xy = np.stack([cx + rad * np.cos(t) + 2 * p, cy + rad * np.sin(t)], 1).clip(0, SIZE - 1)
                parts.append(xy.round(2).reshape(-1).tolist())
            xs = [v for q in parts for v in q[0::2]]
            ys = [v for q in parts for v in q[1::2]]
            bbox = [min(xs), min(ys), max(max(xs) - min(xs), 1), max(max(ys) - min(ys), 1)]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "segmentation": parts})  # fmt: skip
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))


class MaskArrayIndex:
    """Ours: CocoIndex with masks; a worker rasterises each item's masks as the dataset does."""

    def __init__(self, path: Path) -> None:
        self.index = CocoIndex(path, masks=True)

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> float:
        return float(item_masks(self.index, i, (SIZE, SIZE)).sum())


class MaskListIndex:
    """The baseline: the annotations as Python lists of dicts, rasterised the same way."""

    def __init__(self, path: Path) -> None:
        data = json.loads(path.read_text())
        by_img: dict[int, list] = {}
        for a in data["annotations"]:
            by_img.setdefault(a["image_id"], []).append(a)
        self.items = [by_img.get(im["id"], []) for im in data["images"]]

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> float:
        total = 0.0
        for a in self.items[i]:
            total += float(
                mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], SIZE, SIZE))).sum()
            )
        return total


def main() -> int:
    args = build_parser().parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "masks.json"
        t = time.perf_counter()
        make_json(path, args.images, args.per_image)
        print(f"generated {path.stat().st_size / 2**20:.0f} MB json in {time.perf_counter() - t:.1f}s", flush=True)
        out: dict = {"images": args.images, "annotations": args.images * args.per_image, "workers": args.workers}
        for name, masks in (("boxes_only", False), ("with_masks", True)):
            gc.collect()
            t = time.perf_counter()
            index = CocoIndex(path, masks=masks)
            out[f"load_s_{name}"] = round(time.perf_counter() - t, 2)
            if masks:
                out["mask_buffers_mb"] = round(index.masks.nbytes / 2**20, 1)
            del index
        ours = MaskArrayIndex(path)
        t = time.perf_counter()
        out["CocoIndex_masks_worker_uss_growth_mb"] = [round(g, 2) for g in worker_growth(ours, args.workers)]
        out["read_all_s"] = round(time.perf_counter() - t, 1)
        del ours
        gc.collect()
        if args.baseline:
            base = MaskListIndex(path)
            out["list_of_dicts_worker_uss_growth_mb"] = [round(g, 2) for g in worker_growth(base, args.workers)]
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
