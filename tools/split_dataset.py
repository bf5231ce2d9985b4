"""Split a COCO json into train/val(/test), stratified by class, keeping groups of images together.

    python tools/split_dataset.py all.json --output-dir splits --ratios 0.8 0.2 [--seed 0]
        [--group dir | --group-regex '^(video_\\d+)_'] [--names train val] [--on-invalid clip|error|repair]

Images that share a group key (their folder with --group dir, or the first group of
--group-regex in file_name, e.g. a video id) always land in the same split, so near-duplicate
frames do not leak from train into val. Every image lands in exactly one split. The ratios must
sum to 1. The input is validated as training validates it, with --on-invalid as data.on_invalid
(clip by default: boxes overhanging the image are kept as written and counted; repair also
leaves out what it drops, counted); each output is validated again, and the outputs are written
only once all of them are (none is left behind by a failed split).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import cli
from detector.core import errors


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    cli.add_dataset_positional(ap, images=False)
    ap.add_argument("--output-dir", required=True, metavar="DIR", help="the folder for the split jsons")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.2], help="2 or 3 shares (train val [test])")
    ap.add_argument("--names", nargs="+", help="output names (default train val [test])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", choices=("none", "dir"), default="none", help="dir: images of one folder stay together")
    ap.add_argument("--group-regex", help="the group key is this regex's first group (or match) in file_name")
    cli.add_on_invalid(ap)
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported

import numpy as np

from detector.core.errors import DatasetError
from detector.data.coco import CocoIndex
from detector.data.split import OPTION, assign, group_keys, load, proportions, repairs, subset


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    cli.dataset_paths(ap, args)

    if len(args.ratios) not in (2, 3):
        raise DatasetError(f"--ratios takes 2 or 3 numbers, got {args.ratios}")
    names = args.names or ["train", "val", "test"][: len(args.ratios)]
    if len(names) != len(args.ratios):
        raise DatasetError(f"--names gives {len(names)} names for {len(args.ratios)} ratios")
    if len(set(names)) != len(names):  # one output file would overwrite the other
        raise DatasetError(f"--names must differ, got {names}")
    index, data = load(args.annotations, args.on_invalid)
    keys = group_keys([index.file_name(i) for i in range(len(index))], args.group, args.group_regex)
    split, _ = assign(index, args.ratios, keys, args.seed)
    for s, name in enumerate(names):
        if not (split == s).any():
            raise DatasetError(f"{args.annotations}: split '{name}' would be empty ({len(set(keys))} groups)")
    for line in repairs(index):
        print(line)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Path]] = []  # (temporary, final): renamed only once every split loads
    try:
        lines = []
        for s, name in enumerate(names):
            path = out / f"{name}.json"
            tmp = path.with_name(path.name + ".tmp")
            written.append((tmp, path))
            tmp.write_text(json.dumps(subset(data, {int(i) for i in index.image_ids[split == s]})))
            part = CocoIndex(tmp, on_invalid=args.on_invalid, label_map=index.label_map,
                             label_source=str(args.annotations), option=OPTION)  # fmt: skip
            groups = len({keys[i] for i in np.flatnonzero(split == s)})
            lines.append(f"{name}: {len(part)} images ({groups} groups), {part.num_annotations} annotations -> {path}")
    except DatasetError as exc:  # named after the file it would have been
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        message = str(exc)
        for tmp, path in written:
            message = message.replace(str(tmp), f"{path} (not written)")
        raise DatasetError(message, exc.problems) from None
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in written:
        tmp.replace(path)
    print("\n".join(lines))
    print(f"share of each class per split ({' / '.join(names)}):")
    for cls, shares in proportions(index, split, len(names)).items():
        print(f"  {cls:>20}: " + " / ".join(f"{v:.3f}" for v in shares))
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
