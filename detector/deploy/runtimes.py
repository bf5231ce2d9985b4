"""CPU runtimes for an exported detector: ONNX Runtime and OpenVINO, fp32 or int8.

Every runner here is a callable ``image -> {output name: numpy array}`` (detector.deploy.exported's
RunGraph, so ``ExportedPredictor(run, meta)`` runs it on files like the Predictor): the image a
float32 RGB array or tensor (3, H, W) in [0, 1] of any size, the outputs named as the family's
detection dicts (``family_of_model(model).outputs``: boxes, scores, labels, and masks for a Mask
R-CNN), labels as int64. :func:`exported_predictor` builds the ExportedPredictor of a file.

ONNX Runtime: :func:`ort_runner` sets the session up for the CPU explicitly (all graph
optimisations, ``threads`` intra-op threads, one inter-op thread, sequential execution) and can
write the optimised graph (``optimized_path``) so that a later session loads it without
optimising again. These are ONNX Runtime's own defaults on a CPU (1.32: ORT_ENABLE_ALL,
sequential, one thread per physical core): setting them changed nothing measurable on the demo
model (tools/bench/bench_runtimes.py); the fp32 gain over ONNX Runtime is OpenVINO's.

OpenVINO reads the ONNX graph directly (:func:`export_openvino` writes it as OpenVINO IR,
.xml + .bin); :func:`openvino_runner` compiles it for the CPU with ``threads`` inference threads
and the latency hint. On CPUs with bf16 instructions (AVX512_BF16, AMX) OpenVINO's default
inference precision is bf16, whose 8-bit mantissa moves boxes by pixels and flips labels; the
runner asks for f32 unless told otherwise. An int8 graph (see detector.deploy.quantize: ONNX
QuantizeLinear/DequantizeLinear pairs) runs as int8 in both runtimes.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.core.errors import ConfigError

Runner = Callable[[np.ndarray | torch.Tensor], dict[str, np.ndarray]]

EXPORT_EXTRA = "pip install 'detector[export]'"  # onnx, onnxruntime: the ONNX export and its check
DEPLOY_EXTRA = "pip install 'detector[deploy]'"  # and openvino: the OpenVINO export, int8
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "onnx": "onnx"}


class MissingPackageError(ConfigError):
    """An option that needs an optional package this install does not have (the tools print it
    as one line and exit 2)."""


def require(module: str, what: str, extra: str = DEPLOY_EXTRA) -> Any:
    """Import an optional runtime package, or fail with what to install.

    Args:
        module: the module to import ("onnxruntime.quantization").
        what: what needs it, for the message ("int8 quantization").
        extra: the install command of the extra that has it.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _PACKAGES.get(module.split(".")[0], module)
        raise MissingPackageError(f"{what} needs the {package} package: {extra}") from None


def require_installed(modules: Sequence[str], what: str, extra: str) -> None:
    """Fail before any work when an optional package is missing, naming the extra to install;
    the packages are looked up, not imported (importing openvino takes seconds).

    Args:
        modules: top-level packages ("onnx", "onnxruntime", "openvino").
        what: what needs them, for the message ("--format onnx").
        extra: the install command of the extra that has them.

    Raises:
        MissingPackageError: naming every missing package and the extra.
    """
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None  # None too where sys.modules[name] is None
        except (ImportError, ValueError):  # a finder that refuses it, a module without a spec
            found = False
        if not found:
            missing.append(_PACKAGES.get(name, name))
    if missing:
        packages = " and ".join(missing) + (" packages" if len(missing) > 1 else " package")
        raise MissingPackageError(f"{what} needs the {packages}: {extra}")


def _array(img: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    return np.ascontiguousarray(img, dtype=np.float32)


def _named(values: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    out = {n: np.asarray(values[n]) for n in names if n in values}
    if "labels" in out:
        out["labels"] = out["labels"].astype(np.int64)
    return out


def ort_session(
    path: str | Path,
    threads: int | None = None,
    optimize: bool = True,
    optimized_path: str | Path | None = None,
) -> Any:
    """An ONNX Runtime CPU session (``deploy.onnx_session``).

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        optimize: all graph optimisations (constant folding, node fusions, layout changes),
            one inter-op thread and sequential execution; False keeps ONNX Runtime's defaults.
        optimized_path: write the optimised graph there (only with optimize).
    """
    from detector.deploy.exported import onnx_session

    require("onnxruntime", "running an ONNX model")
    return onnx_session(path, threads, "all" if optimize else None, optimized_path if optimize else None)


def ort_runner(
    path: str | Path, threads: int | None = None, optimize: bool = True, optimized_path: str | Path | None = None
) -> Runner:
    """image -> outputs with ONNX Runtime (see :func:`ort_session` for the arguments)."""
    from detector.deploy.exported import onnx_run

    session = ort_session(path, threads, optimize, optimized_path)
    run_graph = onnx_run(session)
    names = [o.name for o in session.get_outputs()]

    def run(img: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        return _named(run_graph(_array(img)), names)

    return run


def export_openvino(onnx_path: str | Path, path: str | Path) -> Path:
    """Convert an ONNX graph to OpenVINO IR: ``path`` (.xml) and the .bin beside it, weights
    kept in their precision (OpenVINO would compress fp32 weights to fp16 by default)."""
    ov = require("openvino", "the OpenVINO export")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is written as .xml + .bin: {path} does not end in .xml")
    model = ov.Core().read_model(str(onnx_path))  # ONNX frontend: seconds faster than ov.convert_model
    repair_empty_branches(model)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def repair_empty_branches(model: Any) -> int:
    """Give back their empty shape to the empty constants of If branches, which OpenVINO's ONNX
    reader (2026.4) turns into scalars; returns how many it repaired.

    torchvision's batched_nms returns an empty index list when there are no boxes (an If in the
    graph, an int64 constant of shape [0] in its "then" branch). Read as a scalar 0, it makes the
    detections of an image where the model finds nothing one row gathered out of range from
    empty tensors: stale memory (the previous image's score, label 0), not zero rows. A branch
    result is repaired only where it is a scalar constant 0 and the If's outputs are 1-D (a
    scalar there is never what the If returns)."""
    ov = require("openvino", "the OpenVINO export")
    ops = getattr(ov, "op", None) or importlib.import_module("openvino.runtime").op  # moved in 2025
    repaired = 0
    for op in model.get_ordered_ops():
        ranks = [o.get_partial_shape().rank for o in op.outputs()]
        if op.get_type_name() != "If" or not all(r.is_static and r.get_length() == 1 for r in ranks):
            continue
        if not hasattr(op, "get_function"):  # an OpenVINO whose Python nodes do not expose If bodies
            continue
        for branch in (0, 1):
            body = op.get_function(branch)
            for result in body.get_results():
                source = result.input_value(0)
                node = source.get_node()
                if (node.get_type_name() == "Constant" and source.get_partial_shape().rank.get_length() == 0
                        and np.asarray(node.get_data()).item() == 0):  # fmt: skip
                    empty = ops.Constant(node.get_element_type(), ov.Shape([0]), [])
                    result.input(0).replace_source_output(empty.output(0))
                    repaired += 1
            body.validate_nodes_and_infer_types()
    if repaired:
        model.validate_nodes_and_infer_types()
    return repaired


class _SignalStack(ctypes.Structure):
    """Linux's stack_t (sigaltstack(2))."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keeping_signal_stack() -> Iterator[None]:
    """Give the calling thread back the alternate signal stack it had before the block.

    OpenVINO's CPU plugin (2026.4 on Linux) installs a signal stack of its own on the thread that
    compiles a model and, when the model is freed, puts back the one it found; two compiled
    models freed in the order they were made leave the thread on the first one's freed stack, and
    the next signal the process gets (a child's exit, Ctrl-C) kills it with SIGSEGV. Compiling
    inside this block keeps the thread's own stack (Python's faulthandler's, or none) whatever
    order models are freed in; signals are then handled on it as in any Python program.
    """
    before = signal_stack()
    try:
        yield
    finally:
        if before is not None:
            before.ss_flags &= ~1  # SS_ONSTACK describes the running handler, it is not a setting
            ctypes.CDLL(None).sigaltstack(ctypes.byref(before), None)


def signal_stack() -> _SignalStack | None:
    """The calling thread's alternate signal stack (sigaltstack(2)), or None off Linux (where the
    struct's layout differs) or when it cannot be read."""
    if not sys.platform.startswith("linux"):
        return None
    current = _SignalStack()
    return current if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current)) == 0 else None


def openvino_runner(
    path: str | Path, threads: int | None = None, precision: str = "f32", hint: str = "LATENCY"
) -> Runner:
    """image -> outputs with OpenVINO on the CPU.

    Args:
        path: an OpenVINO .xml (or an .onnx, which OpenVINO reads as well).
        threads: inference threads (None: OpenVINO's default, one per core).
        precision: the inference precision of fp32 layers: "f32" (as exported), or "bf16"
            (faster on CPUs with bf16 instructions, less exact); int8 layers stay int8 either way.
        hint: OpenVINO's performance hint; LATENCY for one image at a time.
    """
    ov = require("openvino", "running an OpenVINO model")
    config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    model = core.read_model(str(path))
    repair_empty_branches(model)  # an IR written before the repair, or an .onnx read here
    with keeping_signal_stack():
        compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)
    # an output has several names (its ONNX name and the tensor's); the graph's own come first
    names = [next((n for n in ("boxes", "scores", "labels", "masks") if n in o.get_names()), o.get_any_name())
             for o in outputs]  # fmt: skip

    def run(img: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        result = request.infer({0: _array(img)})
        return _named({n: np.array(result[o]) for n, o in zip(names, outputs)}, names)

    return run


def runtime_layers(path: str | Path) -> dict[str, int]:
    """How many convolution and fully connected layers OpenVINO's CPU plugin runs at each
    precision for a model, e.g. {"Convolution:u8": 33, "FullyConnected:u8": 4}: shows whether an
    int8 model really runs as int8."""
    ov = require("openvino", "inspecting an OpenVINO model")
    with keeping_signal_stack():
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in ("Convolution", "FullyConnected", "MatMul"):
            key = f"{layer}:{info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def as_triple(run: Runner) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A runner as detector.deploy.export.check_parity takes it: image -> (boxes, labels, scores)."""

    def triple(img: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = run(img)
        return out["boxes"], out["labels"], out["scores"]

    return triple


def as_mask_runner(run: Runner) -> Callable[[torch.Tensor], tuple[np.ndarray, ...]]:
    """A runner as detector.deploy.mask_parity.mask_parity takes it: (boxes, labels, scores, masks)."""

    def quad(img: torch.Tensor) -> tuple[np.ndarray, ...]:
        out = run(img)
        return out["boxes"], out["labels"], out["scores"], out["masks"]

    return quad


def runner_for(path: str | Path, threads: int | None = None) -> Runner:
    """The runner of an exported file by its suffix: .xml -> OpenVINO, .onnx -> ONNX Runtime."""
    return openvino_runner(path, threads) if str(path).endswith(".xml") else ort_runner(path, threads)


def exported_predictor(path: str | Path, threads: int | None = None, score_threshold: float | None = None) -> Any:
    """An ExportedPredictor (detector.deploy.exported) of an exported .onnx (ONNX Runtime, tuned) or .xml
    (OpenVINO), fp32 or int8, with the metadata written beside it.

    Example:
        >>> p = exported_predictor("model.xml", threads=2)
        >>> p.predict("a.jpg")[0].boxes
    """
    from detector.deploy.exported import ExportedPredictor, read_metadata

    return ExportedPredictor(runner_for(path, threads), read_metadata(path), score_threshold)
