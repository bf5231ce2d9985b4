"""Report on a COCO detection dataset before training on it.

    python tools/check_dataset.py --annotations JSON --images DIR [--decode] [--draw N --output-dir DIR]
    python tools/check_dataset.py JSON DIR ...     (the same, positional)

Prints counts, the class histogram (classes without annotations as a warning), the box size
distribution, every problem in the json (with its location) and every missing, unreadable or
mis-sized image; with --masks, how many masks were checked and what was wrong with them. Only the image headers are read,
which is fast; --decode also decodes every image in full, which finds truncated or corrupt files
whose headers look fine (what training would stop on, or skip with data.on_corrupt_image=skip).
--draw N writes N images with their boxes as PNG files into DIR. Exit code 1 when problems were
found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import cli
from detector.core import errors


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    cli.add_dataset_positional(ap)
    ap.add_argument("--draw", type=int, default=0, metavar="N", help="draw N images with their boxes")
    cli.add_output_dir(ap, "dataset_check", "folder for the drawings")
    ap.add_argument("--decode", action="store_true", help="decode every image in full (finds truncated files)")
    cli.add_workers(ap, 0, "decoding threads (0: the usable CPUs)")
    ap.add_argument("--masks", action="store_true", help="also check the instance masks (as Mask R-CNN reads them)")
    return ap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    cli.dataset_paths(ap, args)
    return args


if __name__ == "__main__":
    parse()  # --help and a mistyped flag answer before torch is imported

import numpy as np
import torch
from PIL import Image

from detector.config import DataConfig
from detector.core import progress, storage
from detector.core.drawing import draw_detections
from detector.core.errors import DatasetError
from detector.data import header_progress
from detector.data.coco import CocoDetection, CocoIndex
from detector.train import process as runtime


def box_stats(index: CocoIndex) -> list[str]:
    if not index.num_annotations:
        return ["  no boxes"]
    wh = index.boxes[:, 2:] - index.boxes[:, :2]
    area = index.areas
    lines = [
        f"  COCO size ranges (by area): small (<32^2) {int((area < 32**2).sum())}, "
        f"medium {int(((area >= 32**2) & (area < 96**2)).sum())}, large (>=96^2) {int((area >= 96**2).sum())}"
    ]
    for name, v in (("width", wh[:, 0]), ("height", wh[:, 1]), ("aspect w/h", wh[:, 0] / wh[:, 1])):
        q = np.percentile(v, [0, 5, 50, 95, 100])
        lines.append(f"  {name:>10}: min {q[0]:.1f}  p5 {q[1]:.1f}  median {q[2]:.1f}  p95 {q[3]:.1f}  max {q[4]:.1f}")
    per_image = np.diff(index.ann_start)
    lines.append(f"  boxes per image: mean {per_image.mean():.1f}, max {per_image.max()}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    problems: list[str] = []
    try:  # what training with the default data.on_invalid=clip would stop on
        CocoIndex(args.annotations, images_root=args.images, masks=args.masks)
    except DatasetError as exc:
        if not exc.problems:
            raise
        problems = exc.problems
    index = CocoIndex(  # what training with on_invalid=repair would use
        args.annotations,
        on_invalid="repair",
        images_root=args.images,
        progress=header_progress(True),
        max_pixels=DataConfig().max_image_pixels,
        masks=args.masks,
    )
    found = index.files
    print(index.summary())
    print("box sizes:")
    print("\n".join(box_stats(index)))
    print("class histogram:")
    counts = index.class_counts()
    peak = max(counts.values(), default=1) or 1
    for name, n in counts.items():
        print(f"  {name:>20} {n:7d} {'#' * round(40 * n / peak)}")
    empty = [name for name, n in counts.items() if n == 0]
    if empty:  # a class the model gets an output for and never sees: a typo, or a class not exported
        print(f"warning: {len(empty)} class(es) without (non-crowd) annotations: {', '.join(empty)}")
    if args.masks:
        print(mask_report(index))
    problems += [f"missing image file: {p}" for _, p in found["missing"]]
    problems += [m for kind in ("unreadable", "size_mismatch", "too_large") for _, m in found[kind]]
    if args.decode:
        skip = {i for kind in ("missing", "unreadable", "too_large") for i, _ in found[kind]}
        problems += decode_all(index, args.images, skip, args.workers or runtime.auto_threads())
    print(f"problems: {len(problems)}")
    for p in problems:
        print(f"  - {p}")
    if args.draw:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        ds = CocoDetection(index, args.images)
        missing = {i for kind in ("missing", "unreadable", "too_large") for i, _ in found[kind]}
        drawn = 0
        for i in range(len(index)):
            if drawn >= args.draw:
                break
            if i in missing:
                continue
            image, target = ds[i]
            boxes, labels, crowd = index.annotations(i)
            img = draw_detections(image, torch.from_numpy(boxes), labels.tolist(), index.label_map.names)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / f"{Path(index.file_name(i)).stem}.png")
            drawn += 1
        print(f"drew {drawn} image(s) into {out}")
    return 1 if problems else 0


def mask_report(index: CocoIndex) -> str:
    """How many masks were checked (by form) and what was wrong with them (the problems are
    listed below with the others)."""
    from detector.core.masks import NO_MASKS_IMAGES, POLYGON, REPAIRED, RLE

    kind = index.masks.kind
    bad, maskless = index.repairs.get(REPAIRED, 0), index.repairs.get(NO_MASKS_IMAGES, 0)
    return (
        f"masks: {len(kind) + bad} checked ({int((kind == POLYGON).sum())} polygon, {int((kind == RLE).sum())} RLE "
        f"usable; {bad} unusable); {maskless} image(s) with an annotation without a mask (left out by training)"
    )


def decode_all(index: CocoIndex, images: str, skip: set[int], workers: int) -> list[str]:
    """Decode every image (but those in skip) in full, as training would; the failures, by file.

    Threads suffice: PIL and libjpeg-turbo release the GIL while decoding.
    """
    from concurrent.futures import ThreadPoolExecutor

    from detector.core.images import ImageDecodeError, load_image

    def decode(i: int) -> str | None:
        try:
            load_image(storage.join(images, index.file_name(i)))  # a URL root stays one
        except ImageDecodeError as exc:
            return f"undecodable image: {exc}"
        return None

    todo = [i for i in range(len(index)) if i not in skip]
    bar = progress.progress(True, total=len(todo), desc="decoding images", unit="img")
    failures = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for failure in pool.map(decode, todo):
            bar.update(1)
            if failure:
                failures.append(failure)
    bar.close()
    print(f"decoded {len(todo) - len(failures)} of {len(todo)} image(s) in full")
    return failures


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
