"""INT8 post-training quantization of an exported detector, and its accuracy cost on a val set.

One int8 model serves both CPU runtimes: ONNX Runtime's static quantizer calibrates the fp32
ONNX graph on sample images and writes it with QuantizeLinear/DequantizeLinear pairs around
the convolutions and fully connected layers (QDQ, per-channel int8 weights, uint8
activations); ONNX Runtime runs those layers as int8, and OpenVINO reads the same graph (or its
IR, detector.deploy.runtimes.export_openvino) and runs them as u8/i8 (VNNI on CPUs that have it).
NMS, RoIAlign, TopK and the box decoding stay in float.

Why not NNCF (OpenVINO's own quantizer): it is a second heavy dependency (scikit-learn and
more), and nncf 3.4's graph builder fails on torchvision's detection graphs ("Could not find a
node ... in NNCFGraph"). ONNX Runtime's pre-processing step (symbolic shape inference) is
skipped: it takes minutes on a detection graph and changes nothing the quantizer needs here.

The accuracy cost is measured, not assumed: :func:`evaluate_runner` scores any runner's
detections on a COCO val set with the project's COCOeval path (detector.evaluation.cocoeval).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.deploy.runtimes import Runner, require

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def run_split(cfg: dict, split: str) -> tuple[Path, Path] | None:
    """(annotations, images) of a training run's split (its config; the synthetic set's files when
    that is on), when both are still there."""
    data = cfg.get("data", {})
    part = data.get(split, {}) or {}
    ann, img = part.get("annotations"), part.get("images")
    if data.get("synthetic", {}).get("enabled"):
        root = Path(data["synthetic"]["root"])
        ann, img = root / f"{split}.json", root / split
    if ann and img and Path(ann).is_file() and Path(img).is_dir():
        return Path(ann), Path(img)
    return None


def folder_images(folder: str | Path) -> list[Path]:
    """The image files of a folder, searched recursively, sorted (``--calibration DIR``).

    Raises:
        DatasetError: no folder, or no image in it.
    """
    from detector.core.errors import DatasetError

    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"calibration folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def annotated_images(annotations: str | Path, images: str | Path) -> list[Path]:
    """The image files a COCO json lists, under its image folder, in the json's order: a
    training json's images, not every file of the folder it shares with its val json
    (tools/split_dataset.py writes train and val over one image root).

    Raises:
        DatasetError: the json cannot be read, or lists no image.
    """
    # only the file names are used: boxes that training clipped or dropped do not matter here
    from detector.core.errors import DatasetError
    from detector.data.coco import CocoIndex

    # only the file names are used: boxes that training clipped or dropped do not matter here
    index = CocoIndex(annotations, on_invalid="repair")
    if not len(index):
        raise DatasetError(f"{annotations} lists no image to calibrate on")
    return [Path(images) / index.file_name(i) for i in range(len(index))]


def val_overlap(files: Sequence[str | Path], annotations: str | Path, images: str | Path) -> list[Path]:
    """The files that are also images of a val set (same file, by resolved path): calibrating on
    them makes the AP50 cost measured on that val set optimistic."""
    val = {p.resolve() for p in annotated_images(annotations, images)}
    return [Path(f) for f in files if Path(f).resolve() in val]


def spread(files: Sequence[Path], count: int) -> list[Path]:
    """Up to ``count`` of ``files``, spread evenly over the list (all of them when there are fewer)."""
    if count < 1:
        raise ValueError(f"calibration takes at least one image, not {count}")
    if count >= len(files):
        return list(files)
    return [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]


def calibration_images(
    files: Sequence[Path],
    prepare: Callable[[str | Path], tuple[torch.Tensor, float, tuple[int, int]]],
) -> tuple[list[torch.Tensor], list[str]]:
    """Calibration images decoded by ``prepare`` (the Predictor's: the pixels the model will see);
    ``files`` from :func:`annotated_images` or :func:`folder_images` through :func:`spread`.

    Returns:
        (images, problems): files that could not be decoded are left out and named in problems.

    Raises:
        DatasetError: no file could be decoded.
    """
    from detector.core.errors import DatasetError

    images, problems = [], []
    for f in files:
        try:
            images.append(prepare(f)[0])
        except Exception as exc:  # one bad file is reported, not fatal
            problems.append(f"{f}: {exc}")
    if not images:
        raise DatasetError("no calibration image could be decoded: " + "; ".join(problems[:3]))
    return images, problems


def quantize_onnx(src: str | Path, dst: str | Path, images: Sequence[torch.Tensor], per_channel: bool = True) -> Path:
    """Write an int8 (QDQ) copy of an fp32 ONNX graph, calibrated (min/max) on ``images``.

    Args:
        src: the fp32 graph (detector.deploy.export.export_onnx).
        dst: the int8 graph to write.
        images: calibration images, as the graph takes them.
        per_channel: per-output-channel weight scales (better accuracy for the same speed).
    """
    onnx = require("onnx", "int8 quantization")
    q = require("onnxruntime.quantization", "int8 quantization")
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    feeds = iter([{input_name: im.numpy().astype(np.float32)} for im in images])

    class Reader(q.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    q.quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=q.QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=per_channel,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=q.CalibrationMethod.MinMax,
    )
    return Path(dst)


def onnx_op_counts(path: str | Path) -> Counter:
    """Node types of an ONNX graph (an int8 graph has QuantizeLinear/DequantizeLinear nodes)."""
    onnx = require("onnx", "reading an ONNX graph")
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def detections_of(
    run: Runner,
    annotations: str | Path,
    images: str | Path,
    label_map: Any,
    model_size: tuple[int, int] | None = None,
    desc: str = "evaluate",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A runner's COCO result rows on a val set, and the set's ground truth.

    The images are decoded as evaluation decodes them (CocoDetection: EXIF orientation, JPEGs
    larger than the model's input at reduced scale when ``model_size`` is given), run at their
    decoded size (exported graphs take any size), and the boxes mapped back to the json's pixels
    (detector.evaluation.cocoeval.detections_to_coco). Boxes only: masks are not scored here.
    """
    from detector.core import progress
    from detector.data.coco import CocoDetection, CocoIndex
    from detector.evaluation.cocoeval import detections_to_coco

    index = CocoIndex(annotations, label_map=label_map, images_root=images)
    data = CocoDetection(index, images, None, model_size)
    rows: list[dict[str, Any]] = []
    bar = progress.progress(True, total=len(data), desc=desc)
    for i in range(len(data)):
        image, target = data[i]
        out = run(image.float().div_(255))
        det = {k: torch.from_numpy(np.asarray(out[k])) for k in ("boxes", "labels", "scores")}
        rows += detections_to_coco([det], [target], label_map)
        bar.update(1)
    bar.close()
    return rows, index.to_coco_gt()


def evaluate_runner(
    run: Runner,
    annotations: str | Path,
    images: str | Path,
    label_map: Any,
    model_size: tuple[int, int] | None = None,
    desc: str = "evaluate",
) -> dict[str, float]:
    """COCO box stats (mAP, mAP50, ...) and the number of detections of a runner on a val set,
    scored by detector.evaluation.cocoeval.evaluate_coco (pycocotools); see :func:`detections_of`."""
    from detector.evaluation.cocoeval import evaluate_coco

    rows, gt = detections_of(run, annotations, images, label_map, model_size, desc)
    result = evaluate_coco(gt, rows)
    return {**result.stats, "detections": len(rows)}


def quantize_export(fp32_onnx: str | Path, output: str | Path, fmt: str, images: Sequence[torch.Tensor]) -> Path:
    """The int8 model of an fp32 ONNX graph at ``output``: the QDQ ONNX graph (fmt "onnx") or
    its OpenVINO IR (fmt "openvino", .xml + .bin)."""
    if fmt == "onnx":
        return quantize_onnx(fp32_onnx, output, images)
    if fmt != "openvino":
        raise ValueError(f"int8 export is for onnx and openvino, not {fmt}")
    from detector.deploy.runtimes import export_openvino

    with tempfile.TemporaryDirectory() as tmp:
        return export_openvino(quantize_onnx(fp32_onnx, Path(tmp) / "int8.onnx", images), output)


def eager_runner(model: torch.nn.Module) -> Runner:
    """The eager model as a runner (the baseline of the same evaluation path)."""

    def run(img: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            det = model([img])[0]
        return {k: v.numpy() for k, v in det.items()}

    return run
