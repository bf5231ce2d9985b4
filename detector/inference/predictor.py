"""Predictor: load a best.pt and detect objects in images (paths, PIL images, arrays or tensors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from detector.core.detections import Detections, ImageInput, decode, image_list, iter_batches, to_detections, to_tensor
from detector.core.labels import LabelMap
from detector.inference.slicing import SliceSpec
from detector.models.build import load_model, model_input_size
from detector.models.zoo import loss_and_detections


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

    to_tensor = staticmethod(to_tensor)  # any supported input as a float (3, H, W) tensor in [0, 1]

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
