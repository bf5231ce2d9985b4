"""Run an exported detector like the Predictor: a file path (or PIL image, array, tensor) in,
``Detections`` in the full image's pixels out.

An exported graph (tools/export.py) takes one float RGB image (3, H, W) in [0, 1] of any size,
resizes and normalises it inside and returns boxes in the pixels of the image it was given. The
steps around it are the Predictor's own (``detector.inference.predictor.decode`` and ``to_detections``):

- pre: decode RGB with EXIF orientation; JPEGs larger than the model's input may be decoded at
  a reduced scale (1/2, 1/4, 1/8, as training decoded them: metadata ``input.decode``);
- post: boxes / that scale, clipped to the full image; masks brought to the full image's size.

``ExportedPredictor`` takes the graph as a "run" callable (float32 (3, H, W) numpy array ->
outputs by name), so that any runtime plugs in: ``from_onnx`` builds one on ONNX Runtime.

Example:
    >>> p = ExportedPredictor.from_onnx("model.onnx")  # reads model.onnx.json beside it
    >>> dets = p.predict(["a.jpg", "b.jpg"])
    >>> dets[0].boxes, dets[0].names, dets[0].scores
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.core.detections import Detections, ImageInput, decode, image_list, to_detections
from detector.core.labels import LabelMap

__all__ = ["METADATA_FORMAT", "ExportedPredictor", "RunGraph", "onnx_run", "onnx_session", "read_metadata"]

# the version of the metadata written beside an exported model (FILE.json); 2: any input size
METADATA_FORMAT = "detector.export/2"

RunGraph = Callable[[np.ndarray], dict[str, np.ndarray]]  # float32 (3, H, W) in [0, 1] -> outputs by name

_OPTIMIZATION = ("disable", "basic", "extended", "all")


def onnx_session(
    path: str | Path,
    threads: int | None = None,
    graph_optimization: str | None = "all",
    optimized_path: str | Path | None = None,
):
    """An ONNX Runtime CPU session for an exported graph (the one place sessions are made).

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        graph_optimization: ONNX Runtime's graph optimisation level, one of "disable", "basic",
            "extended", "all" (set with one inter-op thread and sequential execution); None
            leaves every session option at ONNX Runtime's default.
        optimized_path: write the optimised graph there.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("running an ONNX model needs onnxruntime: pip install 'detector[export]'") from None
    if graph_optimization is not None and graph_optimization not in _OPTIMIZATION:
        raise ValueError(f"graph_optimization must be one of {', '.join(_OPTIMIZATION)}, got {graph_optimization!r}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if graph_optimization is not None:
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, "ORT_DISABLE_ALL" if graph_optimization == "disable" else
            f"ORT_ENABLE_{graph_optimization.upper()}",
        )  # fmt: skip
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_run(session: Any) -> RunGraph:
    """The run callable of an ONNX Runtime session: image -> {output name: array}."""
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]

    def run(image: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(None, {name: np.ascontiguousarray(image, dtype=np.float32)})))

    return run


def read_metadata(model_path: str | Path) -> dict[str, Any]:
    """The metadata written beside an exported model (``<model>.json``).

    Raises:
        FileNotFoundError: there is none (naming the file expected).
        ValueError: it describes a fixed-size export of an earlier version, which the steps here
            (no resize outside the graph) would run wrongly.
    """
    path = Path(str(model_path) + ".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metadata beside {model_path} (tools/export.py writes it)")
    meta = json.loads(path.read_text())
    if meta.get("input", {}).get("size_hw") != "any" or "decode" not in meta.get("input", {}):
        raise ValueError(
            f"{path}: this model was exported for a fixed input size {meta.get('input', {}).get('size_hw')} by an "
            "earlier version; export it again with tools/export.py (graphs now take images of any size)"
        )
    return meta


class ExportedPredictor:
    """Detect objects with an exported model, with the Predictor's decoding and post-processing.

    Args:
        run: the graph: float32 (3, H, W) in [0, 1] -> {"boxes", "labels", "scores"[, "masks"]}
            in that image's pixels (see ``onnx_run``).
        meta: the export's metadata (``read_metadata``).
        score_threshold: keep detections at or above it (it can only raise the threshold the
            model was exported with, ``meta["score_threshold"]``).
        draft_decode: decode large JPEGs at reduced scale as in training (None: as the
            metadata says, the training run's data.draft_decode).
    """

    def __init__(
        self,
        run: RunGraph,
        meta: dict[str, Any],
        score_threshold: float | None = None,
        draft_decode: bool | None = None,
    ) -> None:
        self.run = run
        self.meta = meta
        self.label_map = LabelMap.from_dict({"category_ids": meta["category_ids"], "names": meta["class_names"]})
        dec = meta["input"]["decode"]
        self.draft_decode = bool(dec["draft"]) if draft_decode is None else draft_decode
        self.model_size: tuple[int, int] = (int(dec["model_size"][0]), int(dec["model_size"][1]))
        exported = meta.get("score_threshold")
        if score_threshold is not None and exported is not None and score_threshold < exported:
            raise ValueError(
                f"score_threshold {score_threshold} is below the {exported} the model was exported with: the graph "
                "has dropped those detections already (export again with a lower model.box_score_thresh)"
            )
        self.score_threshold = score_threshold

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        threads: int | None = None,
        score_threshold: float | None = None,
        graph_optimization: str = "all",
    ) -> ExportedPredictor:
        """An ONNX model on ONNX Runtime (CPU), with the metadata beside it (``<path>.json``)."""
        meta = read_metadata(path)
        if meta.get("format") != "onnx":
            raise ValueError(f"{path}.json: a {meta.get('format')} export, not ONNX")
        return cls(onnx_run(onnx_session(path, threads, graph_optimization)), meta, score_threshold)

    @property
    def class_names(self) -> list[str]:
        return list(self.label_map.names)

    def prepare(self, image: ImageInput) -> tuple[torch.Tensor, float, tuple[int, int]]:
        """An input as the graph takes it, decoded exactly as the Predictor decodes it."""
        return decode(image, self.model_size if self.draft_decode else None)

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> list[Detections]:
        """Detect objects in one image or a list of them, one graph call per image.

        Boxes are in the pixels of the full image (after EXIF orientation for files); a Mask
        R-CNN's masks are binary arrays of that size.
        """
        out = []
        for image in image_list(images):
            tensor, scale, size = self.prepare(image)
            o = self.run(tensor.numpy())
            boxes, labels, scores, masks = o["boxes"], o["labels"], o["scores"], o.get("masks")
            if self.score_threshold is not None:
                keep = np.asarray(scores) >= self.score_threshold
                boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
                masks = masks[keep] if masks is not None else None
            out.append(to_detections(boxes, labels, scores, masks, scale, size, self.label_map))
        return out
