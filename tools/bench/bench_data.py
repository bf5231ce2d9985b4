"""Data-layer benchmarks, each against a baseline measured in the same run.

    python tools/bench/bench_data.py pipeline [--n 200]     # decode + augment + collate, images/s
    python tools/bench/bench_data.py index [--images 118287 --annotations 860001]

pipeline: our dataset (decode, default augmentation, collate) against PIL open +
torchvision's ``weights.transforms()`` (no augmentation) on the same JPEGs, in one process
(one worker's work), on 640x360 images and on 4000x3000 photos that the model shrinks to
800x1333 anyway (we decode those at reduced scale, never below the model's input).

index: load time of CocoIndex against pycocotools' COCO() on one generated json at COCO
train2017 scale, and the USS growth of 4 forked workers that each read every item, against
an index kept as a Python list of dicts.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("what", choices=["pipeline", "index"])
    ap.add_argument("--n", type=int, default=200, help="images for the pipeline benchmark (640x360)")
    ap.add_argument("--n-large", type=int, default=12, help="4000x3000 images for the pipeline benchmark")
    ap.add_argument("--images", type=int, default=118287)
    ap.add_argument("--annotations", type=int, default=860001)
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


import numpy as np
from PIL import Image

from detector.config import DataConfig
from detector.data.coco import CocoDetection, CocoIndex
from detector.data.loader import collate
from detector.data.transforms import build_transform


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like image (smooth gradients, texture, noise): compresses like a real photo."""
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def make_images(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        _photo(rng, *size).save(root / f"{i:05d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:05d}.jpg", "width": size[0], "height": size[1]})
        for k in range(5):
            x, y = rng.uniform(0, size[0] * 0.7), rng.uniform(0, size[1] * 0.7)
            bw, bh = rng.uniform(0.05, 0.3) * size[0], rng.uniform(0.05, 0.3) * size[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + k % 3, "bbox": [x, y, bw, bh]})
    ann = root / "ann.json"
    ann.write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
        )
    )
    return ann


def bench_pipeline(n: int, size: tuple[int, int], batch: int = 4, repeats: int = 3) -> dict:
    from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_FPN_Weights

    baseline_tf = FasterRCNN_MobileNet_V3_Large_FPN_Weights.DEFAULT.transforms()  # no download needed
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ann = make_images(root, n, size)
        index = CocoIndex(ann)
        cfg = DataConfig()
        ours = CocoDetection(index, root, build_transform(cfg.augment, cfg.bbox), model_size=(800, 1333))
        paths = [root / index.file_name(i) for i in range(len(index))]

        def run_baseline() -> float:
            t = time.perf_counter()
            for s in range(0, n, batch):
                items = []
                for p in paths[s : s + batch]:
                    with Image.open(p) as im:
                        items.append(baseline_tf(im.convert("RGB")))
                _ = list(items)
            return n / (time.perf_counter() - t)

        def run_ours() -> float:
            t = time.perf_counter()
            for s in range(0, n, batch):
                collate([ours[(i, i)] for i in range(s, min(n, s + batch))])
            return n / (time.perf_counter() - t)

        run_baseline(), run_ours()  # warm the page cache and the libraries
        base = max(run_baseline() for _ in range(repeats))
        mine = max(run_ours() for _ in range(repeats))
        shape = tuple(ours[(0, 0)][0].shape)
    return {"size": f"{size[0]}x{size[1]}", "images": n, "baseline_img_s": base, "ours_img_s": mine,
            "ratio": mine / base, "our_decoded_shape": shape}  # fmt: skip


# -- index at scale ---------------------------------------------------------------------------------


def make_big_json(path: Path, n_images: int, n_anns: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    img_of = np.sort(rng.integers(1, n_images + 1, n_anns))
    xy = rng.uniform(0, 400, (n_anns, 2)).round(2)
    wh = rng.uniform(2, 200, (n_anns, 2)).round(2)
    cats = rng.integers(1, 81, n_anns)
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 640, "license": 1}
        for i in range(1, n_images + 1)
    ]
    anns = [
        {"id": k + 1, "image_id": int(img_of[k]), "category_id": int(cats[k]), "iscrowd": 0,
         "bbox": [float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
         "area": float(wh[k, 0] * wh[k, 1]), "segmentation": []}
        for k in range(n_anns)
    ]  # fmt: skip
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": categories}))


def _uss() -> int:
    import psutil

    return psutil.Process().memory_full_info().uss


class ListIndex:
    """The baseline: the index as Python lists of dicts (what many datasets keep)."""

    def __init__(self, path: Path) -> None:
        data = json.loads(path.read_text())
        by_img: dict[int, list] = {}
        for a in data["annotations"]:
            by_img.setdefault(a["image_id"], []).append(a)
        self.items = [{"image": im, "annotations": by_img.get(im["id"], [])} for im in data["images"]]

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> float:
        item = self.items[i]
        return sum(a["bbox"][2] for a in item["annotations"]) + len(item["image"]["file_name"])


class ArrayIndex:
    def __init__(self, path: Path) -> None:
        self.index = CocoIndex(path)

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> float:
        boxes, _, _ = self.index.annotations(i)
        return float((boxes[:, 2] - boxes[:, 0]).sum()) + len(self.index.file_name(i))


def _worker(index, conn) -> None:
    before = _uss()
    total = 0.0
    for i in range(len(index)):
        total += index.read(i)
    conn.send(_uss() - before)


def worker_growth(index, workers: int = 4) -> list[float]:
    """MB of USS each forked worker gains by reading every item (copy-on-read)."""
    ctx = mp.get_context("fork")
    gc.collect()
    gc.freeze()  # as DataLoader users are told to do; it does not stop refcount writes
    pipes, procs = [], []
    for _ in range(workers):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(index, b))
        p.start()
        pipes.append(a)
        procs.append(p)
    growth = [a.recv() / 2**20 for a in pipes]
    for p in procs:
        p.join()
    gc.unfreeze()
    return growth


def bench_index(n_images: int, n_anns: int) -> dict:
    from pycocotools.coco import COCO

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.json"
        t = time.perf_counter()
        make_big_json(path, n_images, n_anns)
        print(f"generated {path.stat().st_size / 2**20:.0f} MB json in {time.perf_counter() - t:.1f}s", flush=True)
        results: dict = {"images": n_images, "annotations": n_anns}
        for name, load in (("pycocotools_COCO", lambda: COCO(str(path))), ("CocoIndex", lambda: CocoIndex(path))):
            times = []
            for _ in range(2):
                gc.collect()
                t = time.perf_counter()
                obj = load()
                times.append(time.perf_counter() - t)
                del obj
            results[f"{name}_load_s"] = min(times)
        results["load_ratio_ours_over_coco"] = results["CocoIndex_load_s"] / results["pycocotools_COCO_load_s"]
        for name, cls in (("list_of_dicts", ListIndex), ("CocoIndex", ArrayIndex)):
            index = cls(path)
            growth = worker_growth(index)
            results[f"{name}_worker_uss_growth_mb"] = growth
            del index
            gc.collect()
    return results


def main() -> int:
    args = build_parser().parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.what == "pipeline":
        for size, n in (((640, 360), args.n), ((4000, 3000), args.n_large)):
            r = bench_pipeline(n, size)
            print(json.dumps(r), flush=True)
    else:
        print(json.dumps(bench_index(args.images, args.annotations)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
