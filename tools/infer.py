"""Detect objects in images with a trained checkpoint.

    python tools/infer.py --checkpoint best.pt [--score-threshold T] [--output DIR] INPUT...
    python tools/infer.py --checkpoint best.pt --slice 640 --overlap 0.2 [--no-full-pass] INPUT...

INPUT may be image files, folders (searched recursively) or glob patterns. Writes to DIR the
images with boxes, class names and scores drawn (and a Mask R-CNN's masks), and results.json:
COCO-format results (image_id = position in images.json, category_id = the dataset's own ids,
bbox xywh, and segmentation as compressed RLE for masks) plus images.json mapping image ids to files.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from detector import runtime, storage  # noqa: E402
from detector.images import ImageDecodeError, load_image, oriented_size  # noqa: E402
from detector.inference import Predictor  # noqa: E402
from detector.plots import draw_detections  # noqa: E402
from detector.slicing import add_slice_args, slice_spec  # noqa: E402

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def collect(inputs: list[str]) -> list[Path | str]:
    """Expand files, folders, globs and URLs (an object or a prefix) into a sorted, de-duplicated
    list of image files."""
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
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such file, folder or glob match: {item}")
            found += [m for m in matches if m.suffix.lower() in IMAGE_EXTS]
    return list(dict.fromkeys(found))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="image files, folders or globs")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--score-threshold", type=float, default=0.5)
    ap.add_argument("--output", default="predictions", help="folder for drawn images and results.json")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--no-draw", action="store_true", help="only write results.json")
    add_slice_args(ap)
    args = ap.parse_args(argv)

    try:
        files = collect(args.inputs)
    except (FileNotFoundError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not files:
        print("error: no images found in the inputs", file=sys.stderr)
        return 2
    predictor = Predictor.from_checkpoint(
        args.checkpoint, args.device, args.score_threshold, args.batch_size, slice_spec(ap, args)
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results, images, failed = [], [], []
    bar = runtime.progress(True, total=len(files), desc="infer", unit="img")
    for start in range(0, len(files), args.batch_size):
        batch = []
        for f in files[start : start + args.batch_size]:
            try:  # the header: unreadable files are reported and skipped, the rest go on
                batch.append((f, oriented_size(f)))
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
                failed.append(f"cannot decode image {f}: {exc}")
        try:
            dets = predictor.predict([f for f, _ in batch]) if batch else []
        except ImageDecodeError:  # a file that fails past its header: one at a time to name it
            dets = []
            for f, size in list(batch):
                try:
                    dets += predictor.predict([f])
                except ImageDecodeError as exc:
                    failed.append(str(exc))
                    batch.remove((f, size))
        for (f, (w, h)), det in zip(batch, dets):
            image_id = len(images)
            images.append({"id": image_id, "file_name": str(f), "height": h, "width": w})
            rles = det.rles() if det.masks is not None else [None] * len(det)
            for b, c, s, rle in zip(det.boxes.tolist(), det.category_ids.tolist(), det.scores.tolist(), rles):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(c),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "score": s,
                        **({"segmentation": rle} if rle is not None else {}),  # Mask R-CNN: compressed RLE
                    }
                )
            if not args.no_draw:
                arr, _, _ = load_image(f)  # drawn on the full-size image
                drawn = draw_detections(
                    torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))),
                    torch.from_numpy(det.boxes),
                    det.labels,
                    predictor.class_names,
                    det.scores,
                    masks=torch.from_numpy(det.masks) if det.masks is not None else None,
                )
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(
                    out / f"{image_id:05d}_{PurePosixPath(str(f)).stem}.png"
                )
        bar.update(len(files[start : start + args.batch_size]))
    bar.close()
    (out / "results.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps({"images": images, "categories": [
        {"id": c, "name": n} for c, n in zip(predictor.label_map.category_ids, predictor.class_names)]}))  # fmt: skip
    print(f"{len(images)} image(s), {len(results)} detection(s) >= {args.score_threshold} -> {out}")
    for message in failed:
        print(f"warning: skipped {message}", file=sys.stderr)
    return 1 if failed and not images else 0


if __name__ == "__main__":
    sys.exit(runtime.run_main(main))
