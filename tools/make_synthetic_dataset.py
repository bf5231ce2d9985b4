"""Write the built-in demo dataset (shapes on textured backgrounds) as a COCO export.

    python tools/make_synthetic_dataset.py OUTPUT_DIR [--train 384 --val 96 --seed 0]

OUTPUT_DIR gets train.json, val.json (boxes and the shapes' polygons) and the JPEGs in train/ and val/. The same arguments give
the same files. configs/demo.yaml generates it by itself on first use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.data.synthetic import make_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output")
    ap.add_argument("--train", type=int, default=384, help="training images")
    ap.add_argument("--val", type=int, default=96, help="validation images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-masks", action="store_true", help="leave out the shapes' polygons (segmentation)")
    args = ap.parse_args(argv)
    paths = make_dataset(args.output, args.train, args.val, args.seed, masks=not args.no_masks)
    for split, path in paths.items():
        print(f"{split}: {path} (images in {Path(args.output) / split})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
