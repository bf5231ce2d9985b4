"""Write the built-in demo dataset (shapes on textured backgrounds) as a COCO export.

    python tools/make_synthetic_dataset.py OUTPUT_DIR [--train 384 --val 96 --seed 0]
    python tools/make_synthetic_dataset.py OUTPUT_DIR --large [--train 2 --val 4]   (configs/demo_tiles.yaml)

OUTPUT_DIR gets train.json, val.json (boxes and the shapes' polygons) and the JPEGs in train/ and val/. The same arguments give
the same files. configs/demo.yaml generates it by itself on first use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("output", metavar="OUTPUT_DIR", help="the folder to write the dataset to")
    ap.add_argument("--train", type=int, help="training images (default 384; --large: 2)")
    ap.add_argument("--val", type=int, help="validation images (default 96; --large: 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-masks", action="store_true", help="leave out the shapes' polygons (segmentation)")
    ap.add_argument("--large", action="store_true",
                    help="3000x2000 images, shapes of 16-32 px: 150-300 per training image, 30-60 per validation image "
                         "(under COCOeval's 100 detections per image); for data.tile and sliced inference")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from detector.data.synthetic import make_dataset, make_large_dataset  # after parsing: --help stays fast

    if args.large:
        n_train, n_val = args.train or 2, args.val or 4
        paths = make_large_dataset(args.output, n_train, n_val, args.seed, masks=not args.no_masks)
    else:
        paths = make_dataset(args.output, args.train or 384, args.val or 96, args.seed, masks=not args.no_masks)
    for split, path in paths.items():
        print(f"{split}: {path} (images in {Path(args.output) / split})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
