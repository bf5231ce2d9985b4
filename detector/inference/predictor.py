"""Predictor: load a best.pt and detect objects in images (paths, PIL images, arrays or tensors)."""

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
from detector.inference.slicing import SliceSpec
from detector.models.build import model_input_size
from detector.models.family import loss_and_detections
from detector.models.weights import load_model

__all__ = ["Detections", "Predictor", "decode", "load_model", "to_detections"]

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
        from detector.core.masks import encode

        return encode(self.masks.astype(np.uint8))


class Predictor:
    """Detect objects with a trained checkpoint.

    Example:
        >>> p = Predictor.from_checkpoint("runs/demo/best.pt")
        >>> dets = p.predict(["a.jpg", "b.jpg"])
        >>> dets[0].boxes, dets[0].names, dets[0].scores
    """

    def __init__(
        self,
        model: torch.nn.Module,
        label_map: LabelMap,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        draft_decode: bool = True,
        slicing: SliceSpec | None = None,
    ) -> None:
        """Args:
        model: a detector in eval mode.
        label_map: labels 1..K <-> the dataset's category ids and names.
        device: where the model runs.
        batch_size: images per forward pass.
        draft_decode: decode image files larger than the model's input at reduced scale, as
            training and evaluation did (data.draft_decode of the training run).
        slicing: detect by overlapping tiles of the full-resolution image, batch_size tiles per
            forward pass, merged with a full-image pass (detector.inference.slicing); None: whole images.
        """
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.label_map = label_map
        self.batch_size = batch_size
        self.draft_decode = draft_decode
        self.slicing = slicing

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        score_threshold: float | None = None,
        batch_size: int = 4,
        slicing: SliceSpec | None = None,
    ) -> Predictor:
        """Load best.pt (or last.pt); device defaults to CUDA when there is one."""
        overrides = {"box_score_thresh": score_threshold} if score_threshold is not None else {}
        model, label_map, meta = load_model(path, **overrides)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        draft = bool(meta.get("config", {}).get("data", {}).get("draft_decode", True))
        return cls(model, label_map, device, batch_size, draft, slicing)

    @property
    def class_names(self) -> list[str]:
        return list(self.label_map.names)

    @staticmethod
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

    def prepare(self, image: ImageInput) -> tuple[torch.Tensor, float, tuple[int, int]]:
        """An input as the model sees it: (float (3, H, W) in [0, 1], content scale, full (w, h))
        (see ``decode``)."""
        return decode(image, self.decode_model_size)

    @property
    def decode_model_size(self) -> tuple[int, int] | None:
        """The model input size that image files may be decoded down to (``decode``'s
        ``model_size``); None for full resolution: draft decoding off, or sliced inference (tiles
        are cut from the full-resolution image)."""
        return model_input_size(self.model) if self.draft_decode and self.slicing is None else None

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput]) -> list[Detections]:
        """Detect objects in one image or a list of them (float32; batches of batch_size).

        Boxes are in the pixels of the full image (after EXIF orientation for files); a Mask R-CNN's
        masks are binary arrays of that size (``Detections.rles()`` gives them as COCO RLE).
        """
        out: list[Detections] = []
        for batch in iter_batches(image_list(images), self.batch_size):
            out += self.predict_prepared([self.prepare(im) for im in batch])
        return out

    @torch.no_grad()
    def predict_prepared(self, prepared: Sequence[tuple[torch.Tensor, float, tuple[int, int]]]) -> list[Detections]:
        """Detections for inputs already through ``prepare`` (or ``decode``, e.g. in a
        DataLoader's workers), in one forward pass: ``predict`` is ``prepare`` then this. With
        ``slicing`` set, each image is detected by tiles instead (``detector.inference.slicing``)."""
        if self.slicing is not None:
            from detector.inference.slicing import predict_sliced

            return predict_sliced(self, prepared)
        out: list[Detections] = []
        if prepared:
            tensors = [t.to(self.device) for t, _, _ in prepared]
            _, dets = loss_and_detections(self.model, tensors, None)
            for d, (_, scale, size) in zip(dets, prepared):
                d = {k: v.cpu() for k, v in d.items()}
                out.append(to_detections(d["boxes"], d["labels"], d["scores"], d.get("masks"), scale, size,
                                         self.label_map))  # fmt: skip
        return out


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
    t = Predictor.to_tensor(image)
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
        from detector.evaluation.segm import to_original_size

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
