"""Export a trained detector to TorchScript or ONNX, with a parity check against eager PyTorch.

ONNX: the graph takes one float RGB image (3, H, W) in [0, 1] of any height and width (dynamic
axes, TorchScript-based exporter, as torchvision's own tests export its detectors); it resizes
and normalises internally like the eager model and returns boxes (n, 4, xyxy in the pixels of
the image it was given), labels (n, 1..K), scores (n) and, for Mask R-CNN, masks (n, 1, H, W)
probabilities at the input's size. Every family of the zoo exports so (Faster and Mask R-CNN,
RetinaNet, FCOS, SSD/SSDlite, which stretches to its fixed square inside, as in eager). The
parity check compares it with eager PyTorch on images of several sizes and aspect ratios
(``parity_shapes``), so that a size frozen into the graph at export cannot pass.
``detector.deploy.ExportedPredictor`` runs it on files like the Predictor. TorchScript keeps
the eager model's interface (a list of images of any size in, ``(losses, detections)`` out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.export_resize import eager_resize
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
    """(height, width) the model's input is at: its min_size by a 4:3 width (capped)."""
    t = model.transform
    return int(t.min_size[-1]), min(int(t.max_size), round(t.min_size[-1] * 4 / 3))


def example_size(model: torch.nn.Module) -> tuple[int, int]:
    """(height, width) of the image an ONNX graph is traced with: odd and not square (about the
    model's min_size by 1.37 of it), so that no size or ratio the graph is later run at is
    likely to equal it (a value frozen in the trace shows up in the parity check)."""
    m = int(model.transform.min_size[-1])
    return m | 1, round(m * 1.37) | 1


def parity_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(height, width) of the images the export is checked on besides the samples: portrait
    (3:4), 4:3 and 16:9 with a short side of 3/4 and of 3/2 the model's min_size."""
    m = int(model.transform.min_size[-1])
    shapes = []
    for short in (round(m * 0.75), round(m * 1.5)):
        shapes += [(round(short * 4 / 3), short), (short, round(short * 4 / 3)), (short, round(short * 16 / 9))]
    return shapes


def reshaped(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The image's centre crop of the aspect ratio of ``size`` (height, width), resized to it:
    the content keeps its proportions (objects are not stretched)."""
    _, h, w = image.shape
    th, tw = size
    if w * th > h * tw:  # wider than the target: crop the width
        cw = max(1, round(h * tw / th))
        image = image[:, :, (w - cw) // 2 : (w - cw) // 2 + cw]
    else:
        ch = max(1, round(w * th / tw))
        image = image[:, (h - ch) // 2 : (h - ch) // 2 + ch, :]
    return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0].clamp_(0, 1)


def export_onnx(
    model: torch.nn.Module, path: str | Path, size: tuple[int, int] | None = None, opset: int = OPSET
) -> Path:
    """Write an ONNX graph for images of any (height, width).

    Args:
        size: the (height, width) of the example image the graph is traced with (default
            ``example_size``); the graph takes any other size as well.
    """
    model.eval()
    example = torch.rand(3, *(size or example_size(model)), generator=torch.Generator().manual_seed(0))
    outputs = list(family_of_model(model).outputs)  # the order the family's dict has
    path = Path(path)
    with eager_resize(model):
        torch.onnx.export(
            model,
            ([example],),
            str(path),
            opset_version=opset,
            dynamo=False,  # the TorchScript-based exporter handles torchvision's detection ops
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={"image": {1: "height", 2: "width"}, **{o: {0: "detections"} for o in outputs}},
        )
    return path


def export_torchscript(model: torch.nn.Module, path: str | Path) -> Path:
    model.eval()
    with eager_resize(model):  # scripted, torchvision's resize computes the scale in float32
        scripted = torch.jit.script(model)
    path = Path(path)
    scripted.save(str(path))
    return path


def _postprocess_setting(model: torch.nn.Module, name: str) -> float | None:
    """A setting of the model's detection post-processing (its roi_heads' for the R-CNNs)."""
    value = getattr(getattr(model, "roi_heads", model), name, None)
    return float(value) if value is not None else None


def score_threshold(model: torch.nn.Module) -> float | None:
    """The score below which the model drops detections (its box_score_thresh)."""
    return _postprocess_setting(model, "score_thresh")


def metadata(label_map: LabelMap, size: tuple[int, int] | None, fmt: str, model: torch.nn.Module,
             draft_decode: bool = True) -> dict[str, Any]:  # fmt: skip
    """What an exported model's user needs to run it (written beside it as FILE.json).

    Args:
        size: None: the graph takes any size (every export now); kept for the record's shape.
        draft_decode: the training run's data.draft_decode (how files are to be decoded).
    """
    from detector.deploy import METADATA_FORMAT
    from detector.models import model_input_size

    t = model.transform
    return {
        "metadata_format": METADATA_FORMAT,
        "format": fmt,
        "family": family_of_model(model).name,
        "class_names": list(label_map.names),
        "category_ids": list(label_map.category_ids),
        "labels": "1..K index class_names (0 is the background)",
        "score_threshold": score_threshold(model),
        "input": {
            "layout": "float32 RGB (3, H, W) in [0, 1], one image per call",
            "size_hw": list(size) if size else "any",
            "normalisation": {"mean": list(t.image_mean), "std": list(t.image_std), "applied_inside_model": True},
            "model_resize": {
                "min_size": int(t.min_size[-1]),
                "max_size": int(t.max_size),
                "fixed_size": list(t.fixed_size) if getattr(t, "fixed_size", None) else None,
                "applied_inside_model": True,
            },
            "decode": {
                "steps": "decode the file as RGB with its EXIF orientation applied; optionally (draft) decode a JPEG "
                "larger than the model's input at a reduced scale s (1/2, 1/4, 1/8) no smaller than the "
                "size the model resizes it to; float32 (3, H, W) = pixels / 255",
                "draft": bool(draft_decode),
                "model_size": list(model_input_size(model)),
                "inverse": "boxes / s, clipped to the full (oriented) image; masks resized by 1 / s (s = 1 when the "
                "image is passed at its full size)",
            },
        },
        "outputs": {
            "boxes": "(n, 4) xyxy in the pixels of the image given to the model",
            "labels": "(n,) 1..K",
            "scores": "(n,)",
            "order": list(family_of_model(model).outputs),
        },  # fmt: skip
        "opset": OPSET if fmt in ("onnx", "openvino") else None,  # openvino: converted from ONNX
    }


def detections_cap(model: torch.nn.Module) -> int | None:
    """The most detections the model returns for one image (its detections_per_img)."""
    value = _postprocess_setting(model, "detections_per_img")
    return int(value) if value is not None else None


def _match(eager: dict[str, np.ndarray], other: tuple[np.ndarray, np.ndarray, np.ndarray], thresh: float,
           margin: float = 1e-3, cap: int | None = None):  # fmt: skip
    """Pair each eager detection at or above ``thresh`` with an exported one of the same label
    (the closest box); the order of near-equal scores may differ between runtimes, so pairs are
    found by label and box, not by position. Detections within ``margin`` of the threshold may
    be missing on either side (a score of 0.3001 vs 0.2999 is no disagreement).

    Args:
        cap: the model's detections per image (``detections_cap``): where the eager list has that
            many, the lowest score it kept acts as the threshold too (None: no cap).

    Returns:
        (every detection paired, max box difference px, max score difference, eager count).
    """
    boxes_o, labels_o, scores_o = (np.asarray(a) for a in other)
    # Where the model's detections-per-image cap cut the list, the cut falls among near-equal
    # scores too: below the lowest score it kept, either side may have kept another one. Only
    # there: a list the cap did not cut is complete, and its weakest detection must be paired.
    capped = cap is not None and len(eager["scores"]) >= cap > 0
    floor = max(thresh, float(eager["scores"].min())) if capped else thresh
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
    cap = detections_cap(model)
    with torch.no_grad():
        for img in images:
            det = model([img])[0]
            eager = {k: v.numpy() for k, v in det.items()}
            same, bd, sd, n = _match(eager, run_exported(img), score_threshold, cap=cap)
            labels_ok &= same
            box_diff, score_diff, count = max(box_diff, bd), max(score_diff, sd), count + n
    return Parity(len(images), count, labels_ok, box_diff, score_diff)


def onnx_runner(path: str | Path, threads: int | None = None):
    """image tensor -> (boxes, labels, scores) with ONNX Runtime on the CPU (``threads``: intra-op
    threads, None for ONNX Runtime's default)."""
    from detector.runtimes import as_triple, ort_runner

    return as_triple(ort_runner(path, threads))


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
