"""Merge COCO files into one, matching categories by name.

    python tools/merge_datasets.py a.json b.json --output merged.json [--prefix dirA dirB] [--rename automobile=car]
        [--on-invalid clip|error|repair]

Category ids are renumbered 1..K in order of first appearance by name (the same name in two
files is one class, whatever its id); image and annotation ids are renumbered. --prefix puts
each file's images under a folder of one common image root. Every input is validated as
training validates it, with --on-invalid as data.on_invalid (clip by default: boxes overhanging
the image are kept as written and counted; repair also leaves out what it drops, counted). File
names of two inputs that would be one file under one image root (the same name, up to './',
'//' and letter case) are refused, named: give --prefix.
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
    ap.add_argument("inputs", nargs="+", help="COCO json files")
    ap.add_argument("--output", required=True, metavar="FILE", help="the merged COCO json")
    ap.add_argument("--prefix", nargs="+", help="one folder prefix per input for its file names")
    ap.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW", help="category names to rename first")
    cli.add_on_invalid(ap)
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported

from detector.core.errors import DatasetError
from detector.data.coco import CocoIndex
from detector.data.split import OPTION, merge


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    renames = {}
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise DatasetError(f"--rename takes OLD=NEW, got {item!r}")
        renames[old] = new
    merged, notes = merge(args.inputs, args.prefix, renames, args.on_invalid)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(merged))
    try:
        index = CocoIndex(tmp, on_invalid=args.on_invalid, option=OPTION)
    except DatasetError as exc:  # named after the file it would have been
        tmp.unlink(missing_ok=True)
        raise DatasetError(str(exc).replace(str(tmp), f"{out} (not written)"), exc.problems) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)  # only a file that loads is written
    index.path = out
    print("\n".join(notes))
    print(index.summary())
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
