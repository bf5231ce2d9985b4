"""Convert YOLO, Pascal VOC, CVAT (XML) or labelme annotations to one COCO detection json.

    python tools/convert_dataset.py yolo LABELS_DIR --images IMAGES --classes data.yaml --output train.json
    python tools/convert_dataset.py voc ANNOTATIONS_DIR --images JPEGImages --output voc.json [--voc-origin 1|0]
    python tools/convert_dataset.py cvat annotations.xml --images IMAGES --output cvat.json
    python tools/convert_dataset.py labelme JSON_DIR --images IMAGES --output labelme.json [--include-poly]

Class names are kept (YOLO: from data.yaml / classes.txt; CVAT: its label list; others sorted,
or in the order of --classes). Every problem names its source file and line/object; the output
is then loaded as training loads it (strict mode, image files and sizes checked). Exit code 2
on bad input. See detector/data/convert.py for the coordinate conventions.
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
    ap.add_argument("format", choices=("yolo", "voc", "cvat", "labelme"))  # detector.data.convert.FORMATS
    ap.add_argument("source", help="yolo: labels folder; voc/labelme: folder of .xml/.json; cvat: annotations.xml")
    ap.add_argument(
        "--images", required=True, metavar="DIR", help="image root; file_name in the output is relative to it"
    )
    ap.add_argument("--output", required=True, metavar="FILE", help="the COCO json to write")
    ap.add_argument("--classes", help="class names: data.yaml (names:) or a text file, one name a line")
    ap.add_argument(
        "--voc-origin",
        type=int,
        choices=(0, 1),
        default=1,
        help="VOC pixel indices: 1 = VOC devkit (1-based inclusive), 0 = 0-based",
    )
    ap.add_argument("--include-poly", action="store_true", help="labelme polygons as their bounding boxes")
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported

from detector.core.errors import DatasetError
from detector.data import header_progress
from detector.data.convert import convert, read_class_names, validate


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    classes = read_class_names(args.classes) if args.classes else None
    if classes is None and args.format == "yolo":
        for guess in (Path(args.source) / "classes.txt", Path(args.source).parent / "data.yaml"):
            if guess.is_file():
                classes = read_class_names(guess)
                print(f"class names from {guess}")
                break
    result = convert(args.format, args.source, args.images, classes, args.voc_origin, args.include_poly)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result.coco))
    try:
        index = validate(tmp, args.images, progress=header_progress(True, desc="checking the result"))
    except DatasetError as exc:  # named after the file it would have been
        tmp.unlink(missing_ok=True)
        raise DatasetError(str(exc).replace(str(tmp), f"{out} (not written)"), exc.problems) from None
    tmp.replace(out)  # only a file that loads cleanly is written
    print(index.summary().replace(str(tmp), str(out)))
    for what, n in sorted(result.counts.items()):
        print(f"  {what}: {n}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
