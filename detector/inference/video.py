"""Detection on video files (tools/infer.py): decode, detect in batches, draw, write.

OpenCV reads and writes the videos (``opencv-python-headless``, already installed for
Albumentations; its wheel bundles FFmpeg, so no system codecs are needed). Frames are decoded in
a background thread into a small bounded queue and go through the Predictor ``batch_size`` at a
time: at most ``queue_size + batch_size`` frames are in memory, whatever the video's length.

Rotation: OpenCV's FFmpeg reader applies a video's rotation metadata (``CAP_PROP_ORIENTATION_AUTO``
is on by default), so frames, boxes and the annotated video are upright; the JSON records the
rotation that was applied.

The annotated video is MPEG-4 Part 2 (fourcc ``mp4v``) in an .mp4: the codec OpenCV's wheel can
encode everywhere (it has no H.264 encoder); same frame rate and size as the (upright) input,
every decoded frame written.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.core.detections import iter_batches
from detector.core.progress import progress as progress_bar
from detector.inference.folders import RowSpool, categories, detection_rows, draw, write_json
from detector.inference.predictor import Predictor

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
OUTPUT_FOURCC = "mp4v"


class VideoError(RuntimeError):
    """A video that cannot be read (missing, corrupt, no frames) or written."""


@dataclass
class VideoInfo:
    path: str
    fps: float  # 0 when the container does not say
    width: int  # after rotation
    height: int
    frame_count: int | None  # as the container declares it (None: unknown)
    rotation: int  # degrees applied from the metadata


def is_video(path: str | Path) -> bool:
    return Path(str(path)).suffix.lower() in VIDEO_EXTS


def _cv2() -> Any:
    import cv2

    return cv2


def _open(path: str | Path) -> tuple[Any, VideoInfo]:
    cv2 = _cv2()
    if not Path(path).is_file():
        raise VideoError(f"no such video file: {path}")
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise VideoError(f"cannot open video {path}: not a video FFmpeg can read (corrupt or unsupported format)")
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    info = VideoInfo(
        path=str(path),
        fps=float(cap.get(cv2.CAP_PROP_FPS) or 0.0),
        width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        frame_count=count if count > 0 else None,
        rotation=int(cap.get(cv2.CAP_PROP_ORIENTATION_META) or 0),
    )
    return cap, info


def probe(path: str | Path) -> VideoInfo:
    """The video's frame rate, (upright) size, declared frame count and rotation."""
    cap, info = _open(path)
    cap.release()
    return info


_END = object()


def frames(path: str | Path, queue_size: int = 8) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame index, timestamp in seconds, RGB (H, W, 3) uint8 upright) for each frame, decoded
    in a background thread at most ``queue_size`` frames ahead.

    Raises:
        VideoError: the file cannot be opened, or no frame of it can be decoded.
    """
    cv2 = _cv2()
    cap, info = _open(path)
    q: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def decode() -> None:
        try:
            i = 0
            while not stop.is_set():
                ok, bgr = cap.read()
                if not ok:
                    break
                msec = cap.get(cv2.CAP_PROP_POS_MSEC)  # the presentation time of the frame just read
                t = msec / 1000 if (msec > 0 or i == 0 or not info.fps) else i / info.fps
                if not put((i, t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))):
                    return
                i += 1
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            cap.release()

    thread = threading.Thread(target=decode, name=f"decode {Path(path).name}", daemon=True)
    thread.start()
    n = 0
    try:
        while True:
            item = q.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise VideoError(f"cannot decode video {path}: {item}") from item
            n += 1
            yield item
        if n == 0:
            raise VideoError(f"video {path} has no decodable frames (empty, corrupt or an unsupported codec)")
    finally:
        stop.set()
        thread.join()


class AnnotatedVideoWriter:
    """Frames (RGB) written to an .mp4 of the given frame rate; its size is the first frame's."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, fps
        self.size: tuple[int, int] | None = None
        self._writer: Any = None
        self.written = 0

    def write(self, rgb: np.ndarray) -> None:
        cv2 = _cv2()
        h, w = rgb.shape[:2]
        if self._writer is None:
            self.size = (w, h)
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*OUTPUT_FOURCC), self.fps, (w, h))
            if not self._writer.isOpened():
                raise VideoError(f"cannot write video {self.path} ({OUTPUT_FOURCC}, {w}x{h} at {self.fps} fps)")
        elif (w, h) != self.size:  # OpenCV would silently drop the frame
            raise VideoError(
                f"frame {self.written} of {self.path} is {w}x{h}, the video is {self.size[0]}x{self.size[1]}"
            )
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def _ended_early(info: VideoInfo, n_frames: int, last_t: float) -> bool:
    """Whether the frames decoded stop short of the video's declared length.

    OpenCV's frame count is the container's own where it has one (mp4, mov, avi) and otherwise
    (mkv, webm) its duration x nominal frame rate, which overcounts a variable frame rate. So
    fewer frames than that count are a shortfall only when the last one (plus one frame interval)
    also ends more than half a frame before count / fps: a complete variable-rate file spans it.
    """
    if info.frame_count is None or n_frames >= info.frame_count:
        return False
    if info.fps <= 0:  # no frame rate, so no estimate: the count is the container's own
        return True
    return last_t + 1 / info.fps < (info.frame_count - 0.5) / info.fps


@dataclass
class VideoSummary:
    frames: int
    detections: int
    json_path: Path
    video_path: Path | None
    warning: str | None = None


def infer_video(
    predictor: Predictor,
    path: str | Path,
    out: Path,
    name: str,
    draw_frames: bool = True,
    progress: bool = True,
) -> VideoSummary:
    """Detect objects in every frame of a video, ``predictor.batch_size`` frames per forward pass.

    Writes ``out/{name}.json``: per-frame COCO-style detections: ``video`` (file, fps, size,
    frame count, rotation applied), ``categories`` (the dataset's ids), ``images`` (one per frame:
    id = frame index, ``frame_index``, ``timestamp`` in seconds, size) and ``annotations`` (id,
    image_id, category_id, bbox xywh, score, and ``segmentation`` as compressed RLE for a
    Mask R-CNN). With ``draw_frames``, also ``out/{name}.mp4``: every frame with its
    detections drawn, at the input's frame rate and size.

    Args:
        progress: show a progress bar of frames (its total the container's frame count, if known).

    Raises:
        VideoError: naming the video (unreadable, corrupt, no frames, cannot write the output).
    """
    info = probe(path)
    bar = progress_bar(progress, total=info.frame_count, desc=name, unit="frame")
    fps = info.fps if info.fps > 0 else 30.0
    video_path = out / f"{name}.mp4" if draw_frames else None
    writer = AnnotatedVideoWriter(video_path, fps) if video_path is not None else None
    images, annotations = RowSpool(out), RowSpool(out)
    n_frames, last_t = 0, 0.0
    size = (info.width, info.height)
    decoded = frames(path, queue_size=2 * predictor.batch_size)  # a generator: starts when iterated
    try:
        for batch in iter_batches(decoded, predictor.batch_size):
            dets = predictor.predict([rgb for _, _, rgb in batch])
            for (i, t, rgb), det in zip(batch, dets):
                size = (rgb.shape[1], rgb.shape[0])
                images.add([{"id": i, "frame_index": i, "timestamp": round(t, 6), "file_name": str(path),
                             "width": size[0], "height": size[1]}])  # fmt: skip
                annotations.add([{"id": annotations.count + 1 + k, **r} for k, r in enumerate(detection_rows(det, i))])
                if writer is not None:
                    writer.write(draw(rgb, det, predictor.class_names))
                n_frames, last_t = n_frames + 1, t
            bar.update(len(batch))
        if writer is not None:
            writer.close()
        warning = None
        if _ended_early(info, n_frames, last_t):
            warning = f"video {path}: decoded {n_frames} frame(s), its header declares {info.frame_count} (truncated or corrupt?)"
        meta = {"file_name": str(path), "fps": info.fps, "width": size[0], "height": size[1], "frames": n_frames,
                "declared_frames": info.frame_count, "rotation": info.rotation}  # fmt: skip
        json_path = out / f"{name}.json"
        write_json(json_path, {"video": meta, "categories": categories(predictor), "images": images,
                               "annotations": annotations})  # fmt: skip
        return VideoSummary(n_frames, annotations.count, json_path, video_path, warning)
    except BaseException:
        if writer is not None:
            writer.close()
            video_path.unlink(missing_ok=True)  # no half-written video left behind
        raise
    finally:
        decoded.close()  # stops the decoding thread however the loop ended
        bar.close()
        images.close()
        annotations.close()
