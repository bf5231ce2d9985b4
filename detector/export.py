"""Export a trained detector to TorchScript or ONNX, with a parity check against eager PyTorch.

ONNX: Faster R-CNN exports reliably at a fixed input size, so the exported graph takes one
float image (3, H, W) in [0, 1] of exactly the size given at export time; it resizes and
normalises internally like the eager model and returns boxes (n, 4, xyxy in input pixels),
labels (n, 1..K) and scores (n). TorchScript keeps the eager model's interface
(a list of images of any size in, ``(losses, detections)`` out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.families import family_of_model
from detector.labels import LabelMap

OPSET = 17


@dataclass
class Parity:
    """How the exported model agrees with eager PyTorch on sample images."""

    images: int
    detections: int  # eager detections above the score threshold, summed over images
    labels_equal: bool
    max_box_diff: float  # px
    max_score_diff: float

    def ok(self, box_tol: float, score_tol: float = 1e-3) -> bool:
        """Every detection paired, within the tolerances, and something was compared at all (a
        check on images where the model finds nothing would pass any graph)."""
        return (
            self.detections > 0
            and self.labels_equal
            and self.max_box_diff <= box_tol
            and self.max_score_diff <= score_tol
        )


def default_size(model: torch.nn.Module) -> tuple[int, int]:
    """(height, width) for a fixed-size export: the model's min_size by a 4:3 width (capped)."""
    t = model.transform
    return int(t.min_size[-1]), min(int(t.max_size), round(t.min_size[-1] * 4 / 3))


def export_onnx(model: torch.nn.Module, path: str | Path, size: tuple[int, int], opset: int = OPSET) -> Path:
    """Write an ONNX graph for images of (height, width) = size."""
    model.eval()
    example = torch.rand(3, *size)
    path = Path(path)
    torch.onnx.export(
        model,
        ([example],),
        str(path),
        opset_version=opset,
        dynamo=False,  # the TorchScript-based exporter handles torchvision's detection ops
        input_names=["image"],
        output_names=list(family_of_model(model).outputs),  # the order the family's dict has
    )
    return path


def export_torchscript(model: torch.nn.Module, path: str | Path) -> Path:
    model.eval()
    scripted = torch.jit.script(model)
    path = Path(path)
    scripted.save(str(path))
    return path


def metadata(label_map: LabelMap, size: tuple[int, int] | None, fmt: str, model: torch.nn.Module) -> dict[str, Any]:
    t = model.transform
    return {
        "format": fmt,
        "class_names": list(label_map.names),
        "category_ids": list(label_map.category_ids),
        "labels": "1..K index class_names (0 is the background)",
        "input": {
            "layout": "float32 RGB (3, H, W) in [0, 1]",
            "size_hw": list(size) if size else "any",
            "normalisation": {"mean": list(t.image_mean), "std": list(t.image_std), "applied_inside_model": True},
            "model_resize": {"min_size": int(t.min_size[-1]), "max_size": int(t.max_size)},
        },
        "outputs": {
            "boxes": "(n, 4) xyxy in input pixels",
            "labels": "(n,) 1..K",
            "scores": "(n,)",
            "order": list(family_of_model(model).outputs),
        },  # fmt: skip
        "opset": OPSET if fmt in ("onnx", "openvino") else None,  # openvino: converted from ONNX
    }


def _match(eager: dict[str, np.ndarray], other: tuple[np.ndarray, np.ndarray, np.ndarray], thresh: float,
           margin: float = 1e-3):  # fmt: skip
    """Pair each eager detection at or above ``thresh`` with an exported one of the same label
    (the closest box); the order of near-equal scores may differ between runtimes, so pairs are
    found by label and box, not by position. Detections within ``margin`` of the threshold may
    be missing on either side (a score of 0.3001 vs 0.2999 is no disagreement).

    Returns:
        (every detection paired, max box difference px, max score difference, eager count).
    """
    boxes_o, labels_o, scores_o = (np.asarray(a) for a in other)
    # Where the model's detections-per-image cap cut the list, the cut falls among near-equal
    # scores too: below the lowest score it kept, either side may have kept another one.
    floor = max(thresh, float(eager["scores"].min()) if len(eager["scores"]) else thresh)
    keep_e = eager["scores"] >= thresh
    be, le, se = eager["boxes"][keep_e], eager["labels"][keep_e], eager["scores"][keep_e]
    free = np.flatnonzero(scores_o >= thresh - margin)
    ok, box_diff, score_diff = True, 0.0, 0.0
    for b, lab, sc in sorted(zip(be, le, se), key=lambda t: -t[2]):
        cand = [j for j in free if labels_o[j] == lab]
        diffs = [float(np.abs(boxes_o[j] - b).max()) for j in cand]
        if not cand or (sc < floor + margin and min(diffs) > 1.0):
            ok &= bool(sc < floor + margin)
            continue
        k = int(np.argmin(diffs))
        box_diff, score_diff = max(box_diff, diffs[k]), max(score_diff, float(abs(scores_o[cand[k]] - sc)))
        free = free[free != cand[k]]
    unpaired = [j for j in free if scores_o[j] >= floor + margin]
    ok &= not unpaired
    return ok, box_diff, score_diff, len(le)


def check_parity(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    run_exported,
    score_threshold: float = 0.3,
) -> Parity:
    """Compare eager detections with an exported model's on the same images.

    Args:
        model: the eager model (eval mode).
        images: float (3, H, W) images in [0, 1].
        run_exported: image -> (boxes, labels, scores) numpy arrays.
        score_threshold: detections below it are not compared (near-ties there can flip).
    """
    labels_ok, box_diff, score_diff, count = True, 0.0, 0.0, 0
    with torch.no_grad():
        for img in images:
            det = model([img])[0]
            eager = {k: v.numpy() for k, v in det.items()}
            same, bd, sd, n = _match(eager, run_exported(img), score_threshold)
            labels_ok &= same
            box_diff, score_diff, count = max(box_diff, bd), max(score_diff, sd), count + n
    return Parity(len(images), count, labels_ok, box_diff, score_diff)


def onnx_runner(path: str | Path, threads: int | None = None):
    """image tensor -> (boxes, labels, scores) with ONNX Runtime on the CPU (``threads``: intra-op
    threads, None for ONNX Runtime's default)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("the ONNX check needs onnxruntime: pip install 'detector[export]'") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(img: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, {name: img.numpy().astype(np.float32)}))
        )
        return out["boxes"], out["labels"].astype(np.int64), out["scores"]

    return run


def torchscript_runner(path: str | Path):
    scripted = torch.jit.load(str(path))

    def run(img: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            _, dets = scripted([img])
        d = dets[0]
        return d["boxes"].numpy(), d["labels"].numpy(), d["scores"].numpy()

    return run


def write_metadata(meta: dict[str, Any], model_path: str | Path) -> Path:
    path = Path(str(model_path) + ".json")
    path.write_text(json.dumps(meta, indent=1))
    return path
