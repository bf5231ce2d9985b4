"""Detect objects in images and videos with a trained checkpoint.

    python tools/infer.py --checkpoint best.pt [--score-threshold T] [--output-dir DIR] [--workers N] INPUT...
    python tools/infer.py --checkpoint best.pt --slice 640 --overlap 0.2 [--no-full-pass] INPUT...
    python tools/infer.py --checkpoint best.pt --annotations val.json val/   # then evaluate.py --predictions

INPUT may be image or video files (.mp4 .avi .mov .mkv .webm), folders (searched recursively for
both) or glob patterns; images may also be URLs. Writes to DIR:

- images: results.json, COCO-format results (category_id = the dataset's own ids, bbox xywh, and
  segmentation as compressed RLE for masks), images.json mapping image ids to files, and each
  image drawn (boxes, class names, scores, masks). image_id is the image's id in --annotations
  (matched by file name; a file it does not name is an error), or without it the image's
  position in images.json, which only images.json can map back to a file (evaluate.py refuses
  such results for a dataset whose ids differ). Images stream through a DataLoader (--workers
  processes decode them) with bounded memory.
- each video: NAME.json, per-frame COCO-style detections (images = frames with frame_index and
  timestamp; annotations), and NAME.mp4, every frame drawn at the input's frame rate and size.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import cli
from detector.core import errors


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("inputs", nargs="+", help="image or video files, folders or globs")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument(
        "--score-threshold", type=float, default=0.5, help="keep detections scoring at least this, in [0, 1]"
    )
    ap.add_argument(
        "--annotations",
        metavar="JSON",
        help="the images' COCO json: results.json's image_id are its ids (by file name)",
    )
    cli.add_output_dir(ap, "predictions", "folder for the drawn images, videos and json files")
    ap.add_argument("--batch-size", type=int, default=4, help="images or video frames per forward pass")
    cli.add_workers(ap, 0, "processes decoding images (0: in this one)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--no-draw", action="store_true", help="only write the json files (no drawn images or videos)")
    cli.add_slice_args(ap)
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


from detector.core import progress, storage
from detector.core.errors import DatasetError
from detector.data.coco import read_json
from detector.inference.folders import ids_by_file_name, infer_images
from detector.inference.predictor import Predictor
from detector.inference.slicing import require_supervision, slice_spec
from detector.inference.video import VIDEO_EXTS, VideoError, infer_video, is_video

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def collect(inputs: list[str]) -> list[Path | str]:
    """Expand files, folders, globs and URLs (an object or a prefix) into a sorted, de-duplicated
    list of image and video files (videos: local files only)."""
    found: list[Path | str] = []
    for item in inputs:
        if storage.is_url(item):
            storage.check_url(item, "input")
            listed = [item] if storage.isfile(item) else storage.list_files(item, tuple(IMAGE_EXTS))
            if not listed:
                raise FileNotFoundError(f"no such object or images under prefix: {storage.redact(item)}")
            found += listed
            continue
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such file, folder or glob match: {item}")
            found += [m for m in matches if m.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS]
    return list(dict.fromkeys(found))


def video_names(videos: list[Path]) -> list[str]:
    """Output names for the videos: their stems, made unique with _2, _3... in input order (and
    never results or images, the images' json files)."""
    names: list[str] = ["results", "images"]
    for v in videos:
        name, k = v.stem, 1
        while name in names:
            k += 1
            name = f"{v.stem}_{k}"
        names.append(name)
    return names[2:]


def dataset_ids(files: list[Path | str], annotations: str) -> list[int]:
    """Each image file's id in the COCO json ``annotations``, matched by file name; a DatasetError
    naming every file it does not list, or two files it lists as one image."""
    coco = read_json(annotations)
    images = coco.get("images") if isinstance(coco, dict) else None
    if not isinstance(images, list) or not all(isinstance(im, dict) and "id" in im and "file_name" in im
                                               for im in images):  # fmt: skip
        raise DatasetError(f"{annotations}: expected a COCO json with images (id, file_name)")
    ids = ids_by_file_name(files, images)
    missing = [str(storage.redact(f)) for f, i in zip(files, ids) if i is None]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(files)} image(s) are not in {annotations} by file name "
                           f"(their results could not carry its ids): {', '.join(missing)}")  # fmt: skip
    seen: dict[int, Path | str] = {}
    for f, i in zip(files, ids):
        if i in seen:
            raise DatasetError(f"{seen[i]} and {f} are both image {i} of {annotations} (the same file name)")
        seen[i] = f
    return [int(i) for i in ids if i is not None]


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0 <= args.score_threshold <= 1:
        ap.error(f"--score-threshold {args.score_threshold} is not in [0, 1] (scores are probabilities)")
    spec = slice_spec(ap, args)
    if spec is not None:
        require_supervision()

    try:
        found = collect(args.inputs)
    except (FileNotFoundError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    video_flags = [is_video(f) for f in found]
    remote = [str(storage.redact(f)) for f, v in zip(found, video_flags) if v and storage.is_url(f)]
    if remote:
        print(f"error: videos must be local files: {', '.join(remote)}", file=sys.stderr)
        return 2
    videos = [Path(f) for f, v in zip(found, video_flags) if v]
    files = [f for f, v in zip(found, video_flags) if not v]
    if not files and not videos:
        print("error: no images or videos found in the inputs", file=sys.stderr)
        return 2
    if args.annotations and videos:
        raise DatasetError(f"--annotations applies to images, not videos: {', '.join(map(str, videos))}")
    image_ids = dataset_ids(files, args.annotations) if args.annotations else None
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device, args.score_threshold, args.batch_size, spec)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    done = 0
    if files:
        bar = progress.progress(True, total=len(files), desc="infer", unit="img")
        summary = infer_images(predictor, files, out, not args.no_draw, args.workers, bar, image_ids=image_ids)
        bar.close()
        failed += summary.failed
        done += summary.images
        print(f"{summary.images} image(s), {summary.detections} detection(s) >= {args.score_threshold} -> {out}")
    for video, name in zip(videos, video_names(videos)):
        try:
            v = infer_video(predictor, video, out, name, not args.no_draw)
        except VideoError as exc:
            failed.append(str(exc))
            continue
        done += 1
        if v.warning:
            print(f"warning: {v.warning}", file=sys.stderr)
        written = f"{v.json_path}" + (f", {v.video_path}" if v.video_path else "")
        print(f"{video}: {v.frames} frame(s), {v.detections} detection(s) >= {args.score_threshold} -> {written}")
    for message in failed:
        print(f"warning: skipped {message}", file=sys.stderr)
    return 1 if failed and not done else 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
