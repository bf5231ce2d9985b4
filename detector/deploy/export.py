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

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.core.labels import LabelMap
from detector.deploy.resize import eager_resize
from detector.models.zoo import family_of_model

OPSET = 17


TIE_BAND = 0.01  # score above the cap's cut within which near-equal scores may be cut differently


@dataclass
class ImageParity:
    """How the exported model agrees with eager PyTorch on one image."""

    name: str
    shape: tuple[int, int]  # (height, width)
    detections: int  # eager detections at or above the score threshold
    unpaired: list[float]  # scores of detections found on one side only (beyond the allowances)
    pairs: list[tuple[float, float, float]]  # (box diff px, score diff, eager score) per paired detection
    cap: int | None  # the model's detections per image, when the eager list reached it
    cut: float  # the lowest score eager kept at the cap (the threshold when not capped)

    @property
    def max_box_diff(self) -> float:
        return max((b for b, _, _ in self.pairs), default=0.0)

    @property
    def max_score_diff(self) -> float:
        return max((d for _, d, _ in self.pairs), default=0.0)

    def differing(self, box_tol: float, score_tol: float) -> list[float]:
        """Scores of the detections that differ: unpaired, or paired beyond a tolerance."""
        return self.unpaired + [sc for b, d, sc in self.pairs if b > box_tol or d > score_tol]

    def at_cap_ties(self, box_tol: float, score_tol: float) -> bool:
        """Every difference is among near-equal scores just above the cut the model's per-image
        cap made (within TIE_BAND): which of them the cap keeps depends on their order, not on
        the graph (benign; a threshold above the cut compares without them)."""
        diff = self.differing(box_tol, score_tol)
        return self.cap is not None and bool(diff) and max(diff) < self.cut + TIE_BAND

    def describe(self, box_tol: float, score_tol: float) -> str:
        """One line for a failed check: the image, how many detections differ, the largest
        differences, and whether the model's cap explains them."""
        diff = self.differing(box_tol, score_tol)
        line = (
            f"{self.name} ({self.shape[0]}x{self.shape[1]}): {len(diff)} of {self.detections} detection(s) differ "
            f"({len(self.unpaired)} found by one side only), max box diff {self.max_box_diff:.3f} px, "
            f"max score diff {self.max_score_diff:.2e}"
        )
        if self.at_cap_ties(box_tol, score_tol):
            line += (
                f"; all within {TIE_BAND} of the lowest score kept at the model's cap of {self.cap} detections "
                f"({self.cut:.4f}): near-equal scores cut in another order (benign; --score-threshold "
                f"{self.cut + TIE_BAND:.3f} compares without them)"
            )
        return line


@dataclass
class Parity:
    """How the exported model agrees with eager PyTorch on sample images."""

    images: int
    detections: int  # eager detections above the score threshold, summed over images
    labels_equal: bool
    max_box_diff: float  # px
    max_score_diff: float
    per_image: list[ImageParity] = field(default_factory=list, repr=False)

    def ok(self, box_tol: float, score_tol: float = 1e-3) -> bool:
        """Every detection paired, within the tolerances, and something was compared at all (a
        check on images where the model finds nothing would pass any graph)."""
        return (
            self.detections > 0
            and self.labels_equal
            and self.max_box_diff <= box_tol
            and self.max_score_diff <= score_tol
        )

    def failed(self, box_tol: float, score_tol: float = 1e-3) -> list[ImageParity]:
        """The images on which some detection differs (see ``ImageParity.describe``)."""
        return [im for im in self.per_image if im.differing(box_tol, score_tol)]

    def summary(self, box_tol: float, score_tol: float = 1e-3) -> dict[str, Any]:
        """The figures for the metadata file, with the images that differ named."""
        return {
            "images": self.images,
            "detections": self.detections,
            "labels_equal": self.labels_equal,
            "max_box_diff": self.max_box_diff,
            "max_score_diff": self.max_score_diff,
            "passed": self.ok(box_tol, score_tol),
            "differing": [
                {
                    "image": im.name,
                    "shape_hw": list(im.shape),
                    "detections": im.detections,
                    "differ": len(im.differing(box_tol, score_tol)),
                    "max_box_diff": im.max_box_diff,
                    "max_score_diff": im.max_score_diff,
                    "at_cap_ties": im.at_cap_ties(box_tol, score_tol),
                }
                for im in self.failed(box_tol, score_tol)
            ],  # fmt: skip
        }


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


# How much the model's resize shrinks the images users feed it: a photo several times the model's
# input (an 800x600 export for a 320 px model is 0.4). Where side * scale is an integer the
# traced resize once rounded a pixel lower than eager PyTorch (detector.deploy.resize).
PARITY_SCALES = (0.8, 0.6, 0.4, 0.2)


def model_scale(model: torch.nn.Module, hw: tuple[int, int]) -> float:
    """The factor the model's own resize scales an image of (height, width) ``hw`` by (a
    fixed-size model's: that of the side it shrinks least)."""
    t = model.transform
    h, w = hw
    if getattr(t, "fixed_size", None):
        fw, fh = t.fixed_size  # torchvision's fixed_size is (width, height)
        return max(fh / h, fw / w)
    return min(t.min_size[-1] / min(h, w), t.max_size / max(h, w))


def scaled_shapes(model: torch.nn.Module, hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(height, width) of ``hw``'s aspect ratio at which the model's resize scales the image by
    each of PARITY_SCALES (the sizes users feed it, larger than its input)."""
    s0 = model_scale(model, hw)
    return [(max(1, round(hw[0] * s0 / f)), max(1, round(hw[1] * s0 / f))) for f in PARITY_SCALES]


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


@contextlib.contextmanager
def known_trace_warnings_silenced() -> Iterator[None]:
    """Hide the TracerWarnings that torchvision's detection code raises under the ONNX export's
    trace, and only those: every other warning (a TracerWarning from any other module included)
    stays visible.

    torchvision converts tensors to Python numbers and builds constants while traced (image
    sizes in the transform, anchors, RoI pooling levels, box clipping, and torch._assert and
    F.interpolate called from there); it is written to export so, and a value frozen into the
    graph would show in the parity check at several sizes and aspect ratios (``parity_shapes``),
    which is what the warnings ask to verify.
    """
    tracer = torch.jit.TracerWarning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=tracer, module=r"torchvision\.")
        # torch's helpers, called by torchvision's code above; these two messages are hidden whoever
        # calls them under this trace (our export_resize wrapper too, whose sizes the parity check covers)
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", tracer, r"torch\Z")
        warnings.filterwarnings("ignore", "torch.tensor results are registered", tracer, r"torch\.nn\.functional\Z")
        # export_resize's min_size/max_size are the model's settings: constants in the graph by design
        warnings.filterwarnings("ignore", "torch.tensor results are registered", tracer, r"detector\.deploy\.resize\Z")
        yield


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
    with known_trace_warnings_silenced(), eager_resize(model):
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
    from detector.deploy.exported import METADATA_FORMAT
    from detector.models.build import model_input_size

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


def compare(
    eager: dict[str, np.ndarray],
    other: tuple[np.ndarray, np.ndarray, np.ndarray],
    thresh: float,
    margin: float = 1e-3,
    cap: int | None = None,
    name: str = "image",
    shape: tuple[int, int] = (0, 0),
) -> ImageParity:
    """Pair each eager detection at or above ``thresh`` with an exported one of the same label
    (the closest box); the order of near-equal scores may differ between runtimes, so pairs are
    found by label and box, not by position. Detections within ``margin`` of the threshold may
    be missing on either side (a score of 0.3001 vs 0.2999 is no disagreement).

    Args:
        eager: the eager model's boxes, labels and scores (numpy).
        other: the exported model's (boxes, labels, scores).
        thresh: detections below it are not compared.
        margin: the allowance around the threshold (and the cap's cut).
        cap: the model's detections per image (``detections_cap``): where the eager list has that
            many, the lowest score it kept acts as the threshold too (None: no cap).
        name, shape: the image's name and (height, width), for messages.
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
    unpaired: list[float] = []
    pairs: list[tuple[float, float, float]] = []
    for b, lab, sc in sorted(zip(be, le, se), key=lambda t: -t[2]):
        cand = [j for j in free if labels_o[j] == lab]
        diffs = [float(np.abs(boxes_o[j] - b).max()) for j in cand]
        if not cand or (sc < floor + margin and min(diffs) > 1.0):
            if sc >= floor + margin:
                unpaired.append(float(sc))
            continue
        k = int(np.argmin(diffs))
        pairs.append((diffs[k], float(abs(scores_o[cand[k]] - sc)), float(sc)))
        free = free[free != cand[k]]
    unpaired += [float(scores_o[j]) for j in free if scores_o[j] >= floor + margin]
    return ImageParity(name, shape, len(le), unpaired, pairs, cap if capped else None, floor)


def _match(eager: dict[str, np.ndarray], other: tuple[np.ndarray, np.ndarray, np.ndarray], thresh: float,
           margin: float = 1e-3, cap: int | None = None):  # fmt: skip
    """``compare`` as (every detection paired, max box difference px, max score difference,
    eager count)."""
    im = compare(eager, other, thresh, margin, cap)
    return not im.unpaired, im.max_box_diff, im.max_score_diff, im.detections


def check_parity(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    run_exported,
    score_threshold: float = 0.3,
    names: list[str] | None = None,
) -> Parity:
    """Compare eager detections with an exported model's on the same images.

    Args:
        model: the eager model (eval mode).
        images: float (3, H, W) images in [0, 1].
        run_exported: image -> (boxes, labels, scores) numpy arrays.
        score_threshold: detections below it are not compared (near-ties there can flip).
        names: one per image, for messages (default: image 1, image 2, ...).
    """
    cap = detections_cap(model)
    names = names or [f"image {i + 1}" for i in range(len(images))]
    per_image = []
    with torch.no_grad():
        for img, name in zip(images, names, strict=True):
            det = model([img])[0]
            eager = {k: v.numpy() for k, v in det.items()}
            shape = (int(img.shape[1]), int(img.shape[2]))
            per_image.append(compare(eager, run_exported(img), score_threshold, cap=cap, name=name, shape=shape))
    return Parity(
        len(images),
        sum(im.detections for im in per_image),
        all(not im.unpaired for im in per_image),
        max((im.max_box_diff for im in per_image), default=0.0),
        max((im.max_score_diff for im in per_image), default=0.0),
        per_image,
    )


def onnx_runner(path: str | Path, threads: int | None = None):
    """image tensor -> (boxes, labels, scores) with ONNX Runtime on the CPU (``threads``: intra-op
    threads, None for ONNX Runtime's default)."""
    from detector.deploy.runtimes import as_triple, ort_runner

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
