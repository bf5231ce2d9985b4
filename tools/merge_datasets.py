"""Merge COCO files into one, matching categories by name.

    python tools/merge_datasets.py a.json b.json --output merged.json [--prefix dirA dirB] [--rename automobile=car]

Category ids are renumbered 1..K in order of first appearance by name (the same name in two
files is one class, whatever its id); image and annotation ids are renumbered. --prefix puts
each file's images under a folder of one common image root. Every input is validated as
training validates it (strict mode); the same file_name in two inputs is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import runtime  # noqa: E402
from detector.data.coco import CocoIndex, DatasetError  # noqa: E402
from detector.data.split import merge  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="COCO json files")
    ap.add_argument("--output", required=True)
    ap.add_argument("--prefix", nargs="+", help="one folder prefix per input for its file names")
    ap.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW", help="category names to rename first")
    args = ap.parse_args(argv)

    renames = {}
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise DatasetError(f"--rename takes OLD=NEW, got {item!r}")
        renames[old] = new
    merged, notes = merge(args.inputs, args.prefix, renames)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged))
    index = CocoIndex(out, on_invalid="error")
    print("\n".join(notes))
    print(index.summary())
    return 0


if __name__ == "__main__":
    sys.exit(runtime.run_main(main))
