"""Memory of tools/infer.py on a large folder: peak RSS as the images stream through.

    python tools/bench/bench_stream.py --checkpoint runs/demo/best.pt --folder /tmp/stream10k [--n 10000] [--workers 2]

Writes ``--n`` small JPEGs (64x48, random shapes) into ``--folder`` unless they are there, then
runs infer.py's folder path (``streaming.infer_images``, no drawing) over them and prints, every
``--every`` images, the main process's peak RSS so far (``ru_maxrss``), its current RSS, and the
workers' current RSS: flat numbers mean memory does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--every", type=int, default=1000)
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


import numpy as np
import psutil
from PIL import Image, ImageDraw

from detector.inference.folders import infer_images
from detector.inference.predictor import Predictor


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"img_{i:06d}.jpg" for i in range(n)]
    rng = np.random.default_rng(seed)
    for f in files:
        if f.is_file():
            continue
        im = Image.new("RGB", (64, 48), tuple(int(v) for v in rng.integers(0, 255, 3)))
        x, y = (int(v) for v in rng.integers(0, 40, 2))
        ImageDraw.Draw(im).ellipse(
            [x, y % 30, x + 20, y % 30 + 16], fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
        im.save(f, quality=90)
    return files


def main() -> int:
    args = build_parser().parse_args()

    files = make_images(Path(args.folder), args.n)
    predictor = Predictor.from_checkpoint(args.checkpoint, "cpu", 0.5, args.batch_size)
    me = psutil.Process()
    mb = 1 / 1024**2
    print(f"{'images':>7} {'peak RSS main':>14} {'RSS main':>9} {'RSS workers':>12} {'s':>6}")
    start = time.perf_counter()
    next_mark = args.every

    def report(done: int) -> None:
        nonlocal next_mark
        if done < next_mark and done < len(files):
            return
        next_mark += args.every
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        workers = sum(c.memory_info().rss for c in me.children(recursive=True)) * mb
        print(f"{done:>7} {peak:>11.0f} MB {me.memory_info().rss * mb:>6.0f} MB {workers:>9.0f} MB "
              f"{time.perf_counter() - start:>6.0f}", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as out:
        summary = infer_images(predictor, files, Path(out), draw_images=False, workers=args.workers, on_batch=report)
        size = (Path(out) / "results.json").stat().st_size
    print(f"{summary.images} images, {summary.detections} detections (results.json {size / 1024:.0f} KB), "
          f"{len(summary.failed)} failed")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
