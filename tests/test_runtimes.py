"""CPU runtimes of an exported model (detector/runtimes.py, detector/quantize.py): the OpenVINO
export against eager PyTorch, and the int8 export, whose accuracy is measured (box AP50 on the
val set) rather than compared with fp32's. The trained tiny Faster R-CNN of conftest."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch

from detector import export, quantize, runtimes
from detector.config import ConfigError
from detector.inference import Predictor

from .conftest import run_tool_in_process


@pytest.fixture(autouse=True)
def _one_thread():
    """Torch on one thread, as the launched tools run (2 threads on a shared 2-core box spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_missing_runtime_package_names_the_extra():
    with pytest.raises(ConfigError, match=r"pip install 'detector\[deploy\]'"):
        runtimes.require("openvino_not_installed_here", "running an OpenVINO model")


@pytest.mark.slow
def test_openvino_export_matches_eager_and_runs_like_the_predictor(trained_run, tiny_dataset, tmp_path):
    out = tmp_path / "model.xml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert run_tool_in_process("export.py", "--checkpoint", trained_run / "best.pt", "--format", "openvino",
                                   "--output", out, "--score-threshold", 0.05) == 0  # fmt: skip
    # the fp32 ONNX graph's temporary folder is removed by the tool, not left to the finalizer
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert out.with_suffix(".bin").is_file()
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["format"] == "openvino" and meta["precision"] == "fp32"
    assert meta["parity"]["detections"] > 0 and meta["parity"]["labels_equal"]
    assert meta["parity"]["max_box_diff"] <= 1.0
    # the IR on files through ExportedPredictor gives the Predictor's detections
    predictor = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", batch_size=1)  # no padding
    exported = runtimes.exported_predictor(out, threads=1)
    files = sorted((tiny_dataset["root"] / "val").glob("*.jpg"))[:3]
    compared = 0
    for a, b in zip(predictor.predict(files), exported.predict(files)):  # paired by label and box
        ok, box_diff, _, n = export._match({"boxes": a.boxes, "labels": a.labels, "scores": a.scores},
                                           (b.boxes, b.labels, b.scores), 0.05)  # fmt: skip
        assert ok and box_diff <= 0.05, box_diff
        compared += n
    assert compared > 0


@pytest.mark.slow
def test_openvino_ir_returns_no_rows_where_the_model_finds_nothing(trained_run, tmp_path):
    """OpenVINO's ONNX reader turns the empty index list of torchvision's batched_nms (an If
    branch for "no boxes") into a scalar: one row of stale memory (the previous image's score, a
    label 0) instead of none. export_openvino writes the IR with the empty list, so that OpenVINO
    itself (not only our runner) returns zero rows."""
    import openvino as ov

    from detector.inference import load_model

    model, _, _ = load_model(trained_run / "best.pt", box_score_thresh=1.0)  # no score reaches 1.0
    onnx_path = export.export_onnx(model, tmp_path / "none.onnx")
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert len(model([image])[0]["scores"]) == 0
    assert len(runtimes.ort_runner(onnx_path, threads=1)(image)["scores"]) == 0
    xml = runtimes.export_openvino(onnx_path, tmp_path / "none.xml")
    out = runtimes.openvino_runner(xml, threads=1)(image)
    assert {k: v.shape[0] for k, v in out.items()} == {"boxes": 0, "scores": 0, "labels": 0}
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": 1})  # the IR as written
    result = compiled.create_infer_request().infer({0: image.numpy()})
    assert [result[o].shape[0] for o in compiled.outputs] == [0, 0, 0]
    # the ONNX graph read directly by the runner gets the same repair
    assert len(runtimes.openvino_runner(onnx_path, threads=1)(image)["scores"]) == 0


@pytest.mark.slow
def test_int8_export_is_quantized_and_its_ap50_is_cocoeval_of_its_detections(trained_run, tiny_dataset, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "int8.onnx"
    assert run_tool_in_process("export.py", "--checkpoint", trained_run / "best.pt", "--format", "onnx", "--int8",
                               "--calibration-count", 8, "--output", out, "--score-threshold", 0.05) == 0  # fmt: skip
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["precision"] == "int8" and meta["int8"]["calibration"]["images"] == 8
    # int8 convolutions and fully connected layers: quantize/dequantize pairs in the graph, and
    # OpenVINO runs the same graph's layers as 8-bit integers
    ops = quantize.onnx_op_counts(out)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= ops["Conv"] > 0
    layers = runtimes.runtime_layers(runtimes.export_openvino(out, tmp_path / "int8.xml"))
    assert layers and all(k.endswith((":u8", ":i8")) for k in layers), layers

    val = meta["int8"]["val"]
    # the training run's own val set (under xdist the shared run trained on a copy of tiny_dataset)
    val_json, val_images = Path(val["annotations"]), Path(val["images"])
    assert val_json.read_bytes() == Path(tiny_dataset["val"]).read_bytes() and val["int8"]["detections"] > 0
    assert val["ap50_drop"] == pytest.approx(val["fp32"]["mAP50"] - val["int8"]["mAP50"])
    # the reported AP50 is pycocotools' on the int8 model's detections, taken here on another
    # path: ExportedPredictor on the files (its own decoding and box mapping), COCOeval directly
    gt = COCO()
    gt.dataset = json.loads(val_json.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    exported = runtimes.exported_predictor(out, threads=1)
    rows = []
    for img in gt.dataset["images"]:
        det = exported.predict(val_images / img["file_name"])[0]
        rows += [{"image_id": img["id"], "category_id": int(c), "bbox": [float(x0), float(y0), float(x1 - x0),
                  float(y1 - y0)], "score": float(s)} for (x0, y0, x1, y1), c, s in
                 zip(det.boxes, det.category_ids, det.scores)]  # fmt: skip
    assert len(rows) == val["int8"]["detections"]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(rows), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert val["int8"]["mAP50"] == pytest.approx(ev.stats[1], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--calibration-count", "0", "--calibration-count"),
        ("--calibration-count", "-2", "--calibration-count"),
        ("--calibration", "no_such_folder", "no_such_folder"),
    ],  # fmt: skip
)
def test_int8_export_refuses_bad_calibration_options_before_exporting(
    trained_run, tmp_path, capsys, option, value, message
):
    """A count below 1 gave a numpy traceback (negative) or "no image could be decoded" (0); a
    missing folder was found only after the export and its parity check."""
    out = tmp_path / "int8.onnx"
    with pytest.raises(SystemExit) as exit_info:
        run_tool_in_process("export.py", "--checkpoint", trained_run / "best.pt", "--format", "onnx", "--int8",
                            option, tmp_path / value if option == "--calibration" else value, "--output", out)  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_openvino_export_refuses_an_output_not_ending_in_xml(trained_run, tmp_path, capsys):
    """It was a ValueError traceback after the ONNX export (after calibrating, with --int8)."""
    with pytest.raises(SystemExit) as exit_info:
        run_tool_in_process("export.py", "--checkpoint", trained_run / "best.pt", "--format", "openvino",
                            "--output", tmp_path / "model.onnx")  # fmt: skip
    assert exit_info.value.code == 2
    assert "model.onnx" in capsys.readouterr().err and not list(tmp_path.iterdir())
