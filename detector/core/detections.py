"""Detections of one image and the inputs a detector takes: decoding, tensors, batches (eager and exported models)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from detector.core import storage
from detector.core.images import ImageDecodeError, decode_size, load_image, oriented_size, to_rgb_array
from detector.core.labels import LabelMap
from detector.core.masks import encode, to_original_size

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


@dataclass
class Detections:
    """Detections of one image, in its pixel coordinates (xyxy)."""

    boxes: np.ndarray  # (n, 4) float32
    labels: np.ndarray  # (n,) int64, 1..K
    names: list[str]
    scores: np.ndarray  # (n,) float32
    category_ids: np.ndarray  # (n,) the dataset's own category ids
    masks: np.ndarray | None = None  # (n, H, W) bool at the image's full size (Mask R-CNN), else None

    def __len__(self) -> int:
        return len(self.scores)

    def rles(self) -> list[dict]:
        """The masks as COCO compressed RLE dicts (json-ready), in detection order."""
        if self.masks is None:
            raise ValueError("these detections have no masks (the model is not a Mask R-CNN)")
        return encode(self.masks.astype(np.uint8))


def to_tensor(image: ImageInput) -> torch.Tensor:
    """Any supported input as a float (3, H, W) tensor in [0, 1].

    Paths are decoded with EXIF orientation; numpy arrays are HW or HWC (uint8 or float in
    [0, 1]); tensors are HW or CHW (uint8, or float in [0, 1]). One channel is grayscale, four
    are RGBA (alpha dropped, as for an RGBA file).
    """
    if isinstance(image, (str, Path)):
        arr, _, _ = load_image(image)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255)
    if isinstance(image, Image.Image):
        return torch.from_numpy(to_rgb_array(image).copy()).permute(2, 0, 1).float().div_(255)
    if isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[..., None]
        t = _rgb(torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1))
        return t.float().div_(255) if t.dtype == torch.uint8 else t.float()
    if isinstance(image, torch.Tensor):
        t = _rgb(image if image.ndim == 3 else image.unsqueeze(0))
        return t.float().div(255) if t.dtype == torch.uint8 else t.float()
    raise TypeError(f"unsupported image type {type(image).__name__}")


def decode(image: ImageInput, model_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """An input as a detector takes it: (float (3, H, W) in [0, 1], content scale, full (w, h)).

    The one pre-processing step of the Predictor and of exported models (detector.deploy.exported).
    Image files are decoded as training and evaluation decode them: EXIF orientation applied,
    and with ``model_size`` (the model's (min_size, max_size), see
    ``detector.models.build.model_input_size``) JPEGs larger than the model's input are decoded at a
    reduced scale (1/2, 1/4, 1/8; ``scale`` is then that fraction, else 1). In-memory images are
    used as they are (scale 1). Boxes found on the tensor map back to the full image as
    ``boxes / scale``, clipped to (w, h) (``to_detections``).
    """
    if isinstance(image, (str, Path)):
        try:
            w, h = oriented_size(image)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(f"cannot decode image {storage.redact(image)}: {exc}") from None  # as load_image
        want = decode_size(w, h, model_size)
        arr, scale, _ = load_image(image, want)
        t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255)
        return t, scale, (w, h)
    t = to_tensor(image)
    return t, 1.0, (int(t.shape[2]), int(t.shape[1]))


def to_detections(
    boxes: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor | None,
    scale: float,
    size: tuple[int, int],
    label_map: LabelMap,
) -> Detections:
    """A model's outputs on a ``decode``d image -> Detections in the full image's pixels.

    Args:
        boxes, labels, scores: (n, 4) xyxy in the decoded image's pixels, (n,) 1..K, (n,).
        masks: (n, 1, H, W) probabilities in the decoded image's pixels (Mask R-CNN), or None.
        scale, size: from ``decode``: boxes are divided by ``scale`` and clipped to size (w, h);
            masks are brought to that size and thresholded at 0.5.
    """
    w, h = size
    labels = np.asarray(labels).astype(np.int64)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / scale
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    full = None
    if masks is not None:  # probabilities in the decoded pixels -> binary at the full size
        m = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
        full = to_original_size(m, (scale, scale), (w, h)).view(bool)  # 0/1: no copy
    return Detections(
        boxes=boxes,
        labels=labels,
        names=[label_map.names[i - 1] for i in labels],
        scores=np.asarray(scores).astype(np.float32),
        category_ids=label_map.to_category_ids(labels),
        masks=full,
    )


def image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of them (a 4-D tensor is a batch) as a list of images."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)) and not (
        isinstance(images, torch.Tensor) and images.ndim == 4
    ):
        return [images]
    return list(images)


def _rgb(t: torch.Tensor) -> torch.Tensor:
    """(C, H, W) with C of 1 (grayscale), 3 (RGB) or 4 (RGBA) -> (3, H, W)."""
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got {tuple(t.shape)}")
    return t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3]


def iter_batches(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive lists of n items (the last may be shorter), from any iterable (a generator of
    video frames too: items are taken as they come)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
