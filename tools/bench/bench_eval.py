"""COCOeval backends on one generated validation set: faster-coco-eval against pycocotools (the
reference), through detector.evaluation.cocoeval.evaluate_coco, in one process, back to back.

    python tools/bench/bench_eval.py [--images 5000] [--repeats 2]

The set: ``--images`` images of 640x480 with 1-12 objects of 10 classes each, and detections as a
fine-tuned detector gives them (each object found with a jittered box and a score, plus false
positives). Prints the seconds of each backend (the best of ``--repeats``), the ratio, and
whether the 12 statistics and the per-class AP agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--images", type=int, default=5000, help="validation images")
    ap.add_argument("--repeats", type=int, default=2, help="timed evaluations per backend (the best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before numpy is imported

import numpy as np

from detector.evaluation.cocoeval import evaluate_coco


def generated_set(n: int, seed: int) -> tuple[dict, list[dict]]:
    """(COCO ground truth, result rows): boxes found with IoU jitter and scores, misses, and false positives."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, 11)]
    images, anns, rows = [], [], []
    for i in range(1, n + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(int(rng.integers(1, 13))):
            w, h = rng.uniform(8, 200, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            c = int(rng.integers(1, 11))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            if rng.random() < 0.85:  # found, its box placed loosely
                jx, jy, jw, jh = rng.normal(0, 0.08, 4) * [w, h, w, h]
                rows.append(
                    {
                        "image_id": i,
                        "category_id": c,
                        "score": float(rng.uniform(0.3, 1.0)),
                        "bbox": [x + jx, y + jy, max(1.0, w + jw), max(1.0, h + jh)],
                    }
                )
        for _ in range(int(rng.integers(0, 6))):  # false positives
            w, h = rng.uniform(8, 150, 2)
            rows.append(
                {
                    "image_id": i,
                    "category_id": int(rng.integers(1, 11)),
                    "score": float(rng.uniform(0, 0.6)),
                    "bbox": [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), w, h],
                }
            )
    return {"images": images, "annotations": anns, "categories": cats}, rows


def timed(gt: dict, rows: list[dict], backend: str, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = evaluate_coco(gt, rows, backend)
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gt, rows = generated_set(args.images, args.seed)
    print(f"{args.images} images, {len(gt['annotations'])} objects, {len(rows)} detections")
    ref_s, ref = timed(gt, rows, "pycocotools", args.repeats)
    fast_s, fast = timed(gt, rows, "faster_coco_eval", args.repeats)
    stats_equal = all(abs(ref.stats[k] - fast.stats[k]) < 1e-9 for k in ref.stats)
    classes_equal = all(abs(ref.per_class_ap[k] - fast.per_class_ap[k]) < 1e-9 for k in ref.per_class_ap)
    print(f"pycocotools      {ref_s:8.2f} s  (best of {args.repeats})")
    print(f"faster_coco_eval {fast_s:8.2f} s  (best of {args.repeats})")
    print(f"ratio            {ref_s / fast_s:8.1f}x faster than pycocotools, measured in this run")
    print(f"the 12 statistics agree: {stats_equal}; per-class AP agrees: {classes_equal}")
    print(f"mAP {ref.stats['mAP']:.4f}, mAP50 {ref.stats['mAP50']:.4f} (pycocotools)")
    return 0 if stats_equal and classes_equal else 1


if __name__ == "__main__":
    sys.exit(main())
