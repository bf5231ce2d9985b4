"""Inference over many image files with bounded memory (tools/infer.py).

A torch DataLoader decodes the files in worker processes exactly as ``Predictor.prepare`` does
(``inference.decode``: EXIF orientation, reduced-scale JPEG decoding); the main process runs
the model a batch at a time, writes each drawn image as soon as it is made, and appends the COCO
result rows to a spool file. Memory stays flat however many files there are: the only thing
kept per image is its row in images.json (id, file name, size).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import orjson
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from detector.core.detections import Detections, decode
from detector.core.drawing import draw_detections
from detector.core.images import ImageDecodeError, load_image
from detector.inference.predictor import Predictor

Prepared = tuple[torch.Tensor, float, tuple[int, int]]


# -- result rows and drawing, shared by images and video frames ----------------------------------


def detection_rows(det: Detections, image_id: int) -> list[dict[str, Any]]:
    """One image's detections as COCO result rows: the dataset's category ids, bbox xywh in the
    image's pixels, score, and for a Mask R-CNN the mask as compressed RLE."""
    rles = det.rles() if det.masks is not None else [None] * len(det)
    return [
        {
            "image_id": image_id,
            "category_id": int(c),
            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            "score": s,
            **({"segmentation": rle} if rle is not None else {}),
        }
        for b, c, s, rle in zip(det.boxes.tolist(), det.category_ids.tolist(), det.scores.tolist(), rles)
    ]


def ids_by_file_name(files: Sequence[str | Path], images: Sequence[dict[str, Any]]) -> list[int | None]:
    """The dataset's image id of each file, matched by name: the longest trailing part of the
    file's path that is a ``file_name`` of ``images`` (a COCO json's "images": ``val/a.jpg``
    matches ``val/a.jpg`` before ``a.jpg``); None for a file no image names.

    Args:
        files: paths or URLs (as given to tools/infer.py, or the file names of its images.json).
        images: dicts with ``id`` and ``file_name``.
    """
    by_name = {PurePosixPath(str(im["file_name"]).replace("\\", "/")).as_posix(): int(im["id"]) for im in images}
    out: list[int | None] = []
    for f in files:
        parts = PurePosixPath(str(f).replace("\\", "/")).parts
        tails = (PurePosixPath(*parts[-k:]).as_posix() for k in range(len(parts), 0, -1))
        out.append(next((by_name[t] for t in tails if t in by_name), None))
    return out


def draw(image: np.ndarray, det: Detections, class_names: Sequence[str]) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image with the detections drawn (boxes, names, scores, masks)."""
    drawn = draw_detections(
        torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        torch.from_numpy(det.boxes),
        det.labels,
        class_names,
        det.scores,
        masks=torch.from_numpy(det.masks) if det.masks is not None else None,
    )
    return drawn.permute(1, 2, 0).numpy()


def categories(predictor: Predictor) -> list[dict[str, Any]]:
    return [{"id": c, "name": n} for c, n in zip(predictor.label_map.category_ids, predictor.class_names)]


class RowSpool:
    """JSON rows appended to an anonymous temporary file as they are produced (nothing kept in
    memory), copied into the final file as one JSON array by ``write_json``."""

    def __init__(self, folder: str | Path) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=folder, suffix=".rows")  # noqa: SIM115 (closed by close())
        self.count = 0

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            self._file.write((b"," if self.count else b"") + orjson.dumps(row))
            self.count += 1

    def copy_into(self, out: IO[bytes]) -> None:
        out.write(b"[")
        self._file.flush()
        self._file.seek(0)
        while chunk := self._file.read(1 << 20):
            out.write(chunk)
        self._file.seek(0, os.SEEK_END)
        out.write(b"]")

    def close(self) -> None:
        self._file.close()


def write_json(path: Path, value: RowSpool | dict[str, Any]) -> None:
    """Write a spool as a JSON array, or a dict whose values may be spools, atomically (a
    temporary file renamed into place: an interrupted run leaves no half-written file)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as out:
            if isinstance(value, RowSpool):
                value.copy_into(out)
            else:
                out.write(b"{")
                for i, (key, v) in enumerate(value.items()):
                    out.write((b"," if i else b"") + orjson.dumps(key) + b":")
                    if isinstance(v, RowSpool):
                        v.copy_into(out)
                    else:
                        out.write(orjson.dumps(v))
                out.write(b"}")
        tmp.replace(path)
    except BaseException:  # Ctrl-C, a full disk: no .partial left behind
        tmp.unlink(missing_ok=True)
        raise


# -- folders of images through a DataLoader -------------------------------------------------------


class ImageFiles(Dataset):
    """Image files decoded as the Predictor decodes them, in DataLoader workers.

    An undecodable file does not raise (which would stop the loader): its item is
    ``(index, None, message naming the file)`` for the main process to report and skip.
    """

    def __init__(self, files: Sequence[str | Path], model_size: tuple[int, int] | None) -> None:
        """``model_size``: ``decode``'s (``Predictor.decode_model_size``; None: full resolution)."""
        self.files = list(files)
        self.model_size = model_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Prepared | None, str | None]:
        try:
            return i, decode(self.files[i], self.model_size), None
        except ImageDecodeError as exc:
            return i, None, str(exc)


def _as_list(batch: list) -> list:
    return batch


def image_loader(files: Sequence[str | Path], predictor: Predictor, workers: int = 0) -> DataLoader:
    """Batches of ``predictor.batch_size`` files in order, decoded by ``workers`` processes
    (0: in this process); at most 2 batches per worker are decoded ahead."""
    dataset = ImageFiles(files, predictor.decode_model_size)
    return DataLoader(dataset, batch_size=predictor.batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_as_list, prefetch_factor=2 if workers else None)  # fmt: skip


@dataclass
class ImagesSummary:
    images: int = 0
    detections: int = 0
    failed: list[str] = field(default_factory=list)


def infer_images(
    predictor: Predictor,
    files: Sequence[str | Path],
    out: Path,
    draw_images: bool = True,
    workers: int = 0,
    bar: Any = None,
    on_batch: Callable[[int], None] | None = None,
    image_ids: Sequence[int] | None = None,
) -> ImagesSummary:
    """Detect objects in image files and write to ``out``: results.json (COCO results),
    images.json (image ids, files and sizes; the categories) and, with ``draw_images``, each
    image drawn as ``{id:05d}_{stem}.png``.

    Args:
        image_ids: each file's image id, e.g. a dataset's (``ids_by_file_name``); None: an image's
            id is its position in images.json (only the images decoded are listed there).
        bar: a progress bar (``update(n)`` per batch of files), or None.
        on_batch: called with the number of files done after each batch (measurements).
    """
    summary = ImagesSummary()
    images: list[dict[str, Any]] = []
    results = RowSpool(out)
    done = 0
    try:
        for batch in image_loader(files, predictor, workers):
            good = []
            for i, prepared, error in batch:
                if prepared is None:
                    summary.failed.append(str(error))
                else:
                    good.append((i, prepared))
            dets = predictor.predict_prepared([p for _, p in good])
            for (i, (_, _, (w, h))), det in zip(good, dets):
                f = files[i]
                image_id = len(images) if image_ids is None else int(image_ids[i])
                images.append({"id": image_id, "file_name": str(f), "height": h, "width": w})
                rows = detection_rows(det, image_id)
                results.add(rows)
                summary.detections += len(rows)
                if draw_images:
                    arr, _, _ = load_image(f)  # drawn on the full-size image
                    Image.fromarray(draw(arr, det, predictor.class_names)).save(
                        out / f"{image_id:05d}_{PurePosixPath(str(f)).stem}.png"
                    )
            done += len(batch)
            if bar is not None:
                bar.update(len(batch))
            if on_batch is not None:
                on_batch(done)
        write_json(out / "results.json", results)
    finally:
        results.close()
    write_json(out / "images.json", {"images": images, "categories": categories(predictor)})
    summary.images = len(images)
    return summary
