"""CPU runtimes of an exported model (detector/deploy/runtimes.py, detector/deploy/quantize.py): the OpenVINO
export against eager PyTorch, and the int8 export, whose accuracy is measured (box AP50 on the
val set) rather than compared with fp32's. The trained tiny Faster R-CNN of conftest; the two
int8 exports (slow) are made once each and shared by the tests of this module."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from detector.core.errors import ConfigError
from detector.deploy import export, quantize, runtimes
from detector.inference.predictor import Predictor
from detector.models import weights
from tests.conftest import run_tool_in_process, write_coco


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

    from detector.inference.predictor import load_model

    model, _, _ = load_model(trained_run / "best.pt", box_score_thresh=1.0)  # no score reaches 1.0
    onnx_path = export.export_onnx(model, tmp_path / "none.onnx")
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert len(model([image])[0]["scores"]) == 0
    assert len(runtimes.ort_runner(onnx_path, threads=1)(image)["scores"]) == 0
    xml = runtimes.export_openvino(onnx_path, tmp_path / "none.xml")
    out = runtimes.openvino_runner(xml, threads=1)(image)
    assert {k: v.shape[0] for k, v in out.items()} == {"boxes": 0, "scores": 0, "labels": 0}
    with runtimes.keeping_signal_stack():  # see test_openvino_models_freed_in_any_order_leave_signals_working
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": 1})  # the IR as written
    result = compiled.create_infer_request().infer({0: image.numpy()})
    assert [result[o].shape[0] for o in compiled.outputs] == [0, 0, 0]
    # the ONNX graph read directly by the runner gets the same repair
    assert len(runtimes.openvino_runner(onnx_path, threads=1)(image)["scores"]) == 0


def free_two_openvino_models_then_take_a_signal(folder: str) -> dict[str, bool]:
    """Two OpenVINO runners of one tiny IR, freed in the order they were made, then a signal (run
    by in_subprocess: without keeping_signal_stack the signal kills the process with SIGSEGV)."""
    import gc
    import os
    import signal

    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 3, 4, 4], np.float32, name="x")
    xml = Path(folder) / "relu.xml"
    ov.save_model(ov.Model([ops.relu(x)], [x], "relu"), str(xml))

    def stack() -> tuple[int | None, int, int]:
        s = runtimes.signal_stack()
        assert s is not None
        return s.ss_sp, s.ss_flags, s.ss_size

    before = stack()
    first, second = runtimes.openvino_runner(xml), runtimes.openvino_runner(xml)
    ran = [float(out.min()) for out in first(np.ones((1, 3, 4, 4), np.float32)).values()] == [1.0]
    del first, second
    gc.collect()
    handled = []
    signal.signal(signal.SIGUSR1, lambda *_: handled.append(True))
    os.kill(os.getpid(), signal.SIGUSR1)
    return {"same_stack": stack() == before, "handled": handled == [True], "ran": ran}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack's struct is Linux's here")
def test_openvino_models_freed_in_any_order_leave_signals_working(tmp_path):
    """OpenVINO's CPU plugin swaps the compiling thread's signal stack and restores it per model;
    freed first-made-first, the thread was left on a freed stack and the next signal (here
    SIGUSR1; in the suite a child process's exit) was a segmentation fault (rc -11)."""
    from tests.conftest import in_subprocess

    result, _ = in_subprocess("tests.deploy.test_runtimes:free_two_openvino_models_then_take_a_signal", tmp_path)
    assert result == {"same_stack": True, "handled": True, "ran": True}


def with_data(checkpoint: Path, out: Path, **splits: tuple[Path, Path]) -> Path:
    """A copy of a weights file whose training config names other (annotations, images) splits."""
    data = weights.read(checkpoint)
    for split, (ann, img) in splits.items():
        data["config"]["data"][split] = {**data["config"]["data"][split], "annotations": str(ann), "images": str(img)}
    weights.save(data, out)
    return out


def shared_root_run(trained_run: Path, tiny_dataset: dict[str, Path], folder: Path) -> Path:
    """The trained checkpoint as if tools/split_dataset.py had made its data: train.json and
    val.json over one image root, the folder that holds the train/ and val/ images."""
    root = tiny_dataset["root"]
    splits = {}
    for split in ("train", "val"):
        coco = json.loads(Path(tiny_dataset[split]).read_text())
        for im in coco["images"]:
            im["file_name"] = f"{split}/{im['file_name']}"
        splits[split] = (write_coco(folder / f"{split}.json", **coco), root)
    return with_data(trained_run / "best.pt", folder / "best.pt", **splits)


def export_int8(*args: object) -> tuple[int, str, list]:
    """tools/export.py in this process on one thread: (exit code, stderr, warnings, all recorded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    err = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err):
            warnings.simplefilter("always")  # every warning, even those torch hides by default
            code = run_tool_in_process("export.py", "--int8", *args)
    finally:
        torch.set_num_threads(threads)
    return code, err.getvalue(), caught


@pytest.fixture(scope="module")
def int8_default(trained_run, tiny_dataset, tmp_path_factory) -> dict:
    """The int8 ONNX export with the default calibration and val set, of a run whose train and
    val jsons share one image folder, written into a folder that does not exist yet."""
    tmp = tmp_path_factory.mktemp("int8_default")
    checkpoint = shared_root_run(trained_run, tiny_dataset, tmp / "run")
    out = tmp / "new" / "folder" / "int8.onnx"
    samples = sorted((tiny_dataset["root"] / "val").glob("*.jpg"))[:4]  # the run's val folder holds two folders
    code, err, caught = export_int8("--checkpoint", checkpoint, "--format", "onnx", "--calibration-count", 8,
                                    "--output", out, "--score-threshold", 0.05, "--samples", *samples)  # fmt: skip
    assert code == 0, err[-3000:]
    return {"out": out, "run": tmp / "run", "err": err, "warnings": caught,
            "meta": json.loads(Path(f"{out}.json").read_text())}  # fmt: skip


@pytest.fixture(scope="module")
def int8_options(trained_run, tiny_dataset, tmp_path_factory) -> dict:
    """The int8 OpenVINO export calibrated on --calibration DIR (all seven val images: three overlap),
    scored on --val-annotations/--val-images (three of the val images), with a --max-ap50-drop no
    model can meet (-1: int8 must gain the whole AP50 scale)."""
    tmp = tmp_path_factory.mktemp("int8_options")
    coco = json.loads(Path(tiny_dataset["val"]).read_text())
    keep = {im["id"] for im in coco["images"][:3]}
    subset = write_coco(tmp / "val3.json", [im for im in coco["images"] if im["id"] in keep],
                        [a for a in coco["annotations"] if a["image_id"] in keep], coco["categories"])  # fmt: skip
    val_images = tiny_dataset["root"] / "val"
    out = tmp / "int8.xml"
    code, err, _ = export_int8("--checkpoint", trained_run / "best.pt", "--format", "openvino", "--output", out,
                               "--calibration", val_images, "--calibration-count", 7, "--val-annotations", subset,
                               "--val-images", val_images, "--max-ap50-drop", -1, "--score-threshold", 0.05)  # fmt: skip
    return {"code": code, "err": err, "out": out, "subset": subset, "val_images": val_images,
            "meta": json.loads(Path(f"{out}.json").read_text())}  # fmt: skip


@pytest.mark.slow
def test_int8_export_is_quantized_and_its_ap50_is_cocoeval_of_its_detections(int8_default, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out, meta = int8_default["out"], int8_default["meta"]
    assert out.is_file()  # its folder did not exist: the export made it
    assert meta["precision"] == "int8" and meta["int8"]["calibration"]["images"] == 8
    # int8 convolutions and fully connected layers: quantize/dequantize pairs in the graph, and
    # OpenVINO runs the same graph's layers as 8-bit integers
    ops = quantize.onnx_op_counts(out)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= ops["Conv"] > 0
    layers = runtimes.runtime_layers(runtimes.export_openvino(out, tmp_path / "int8.xml"))
    assert layers and all(k.endswith((":u8", ":i8")) for k in layers), layers

    val = meta["int8"]["val"]
    # the training run's own val set (the checkpoint's config)
    val_json, val_images = Path(val["annotations"]), Path(val["images"])
    assert val_json == int8_default["run"] / "val.json" and val["int8"]["detections"] > 0
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
def test_int8_calibrates_on_the_training_jsons_images_not_their_shared_folder(int8_default, tiny_dataset):
    """The default calibration was every image file under the training image folder: with train
    and val jsons over one root (tools/split_dataset.py), the val images too, so the AP50 cost
    measured on them was optimistic. Now: the images the training json lists."""
    calibration = int8_default["meta"]["int8"]["calibration"]
    assert calibration["annotations"] == str(int8_default["run"] / "train.json")
    assert calibration["folder"] == str(tiny_dataset["root"])  # the root holds train/ and val/
    assert calibration["images"] == 8 and calibration["val_images"] == 0
    assert "val set" not in int8_default["err"]


@pytest.mark.slow
def test_export_shows_no_tracer_warning(int8_default):
    """torchvision's own TracerWarnings under the ONNX trace (about ten, torch hides most of
    them by default; all are recorded here) are silenced; see tests/deploy/test_export_tool.py for the
    filter keeping every other warning."""
    tracer = [f"{w.filename}:{w.lineno}: {w.message}" for w in int8_default["warnings"]
              if issubclass(w.category, torch.jit.TracerWarning)]  # fmt: skip
    assert not tracer, tracer[:3]


@pytest.mark.slow
def test_int8_export_fails_when_it_loses_more_ap50_than_allowed(int8_options):
    meta, err = int8_options["meta"], int8_options["err"]
    assert int8_options["code"] == 1
    drop = meta["int8"]["val"]["ap50_drop"]
    assert drop > -1 and f"loses {drop:.4f} box AP50" in err and "--max-ap50-drop -1.0" in err
    assert int8_options["out"].is_file()  # written, with what it measured, for a look at it


@pytest.mark.slow
def test_int8_with_a_calibration_folder_says_it_overlaps_the_val_set(int8_options):
    calibration, err = int8_options["meta"]["int8"]["calibration"], int8_options["err"]
    assert calibration["folder"] == str(int8_options["val_images"]) and "annotations" not in calibration
    assert calibration["images"] == 7 and calibration["val_images"] == 3  # the folder's 7, the subset's 3
    assert f"warning: 3 of the 7 calibration images are images of the val set {int8_options['subset']}" in err


@pytest.mark.slow
def test_int8_is_scored_on_the_val_set_given(int8_options, trained_run):
    """--val-annotations/--val-images: the fp32 model's AP50 there is eager PyTorch's on those
    three images (the graph matches eager PyTorch), not on the run's seven."""
    from detector.inference.predictor import load_model
    from detector.models.build import model_input_size

    val = int8_options["meta"]["int8"]["val"]
    assert val["annotations"] == str(int8_options["subset"]) and val["images"] == str(int8_options["val_images"])
    assert val["runtime"] == "openvino"
    model, label_map, _ = load_model(trained_run / "best.pt")
    eager = quantize.evaluate_runner(quantize.eager_runner(model), int8_options["subset"], int8_options["val_images"],
                                     label_map, model_input_size(model))  # fmt: skip
    assert val["fp32"]["mAP50"] == pytest.approx(eager["mAP50"], abs=1e-3)
    assert val["fp32"]["detections"] == eager["detections"]


@pytest.mark.slow
def test_max_ap50_drop_without_a_val_set_is_refused_before_exporting(trained_run, tiny_dataset, tmp_path, capsys):
    """The limit was not checked at all when the run's val set was gone ("AP50 not measured",
    exit 0)."""
    gone = (tmp_path / "gone.json", tmp_path / "gone")
    checkpoint = with_data(trained_run / "best.pt", tmp_path / "best.pt", val=gone)
    out = tmp_path / "out" / "int8.onnx"
    code = run_tool_in_process("export.py", "--checkpoint", checkpoint, "--format", "onnx", "--int8",
                               "--calibration-count", 1, "--max-ap50-drop", 0.02, "--output", out)  # fmt: skip
    assert code == 2
    assert "--max-ap50-drop needs a val set" in capsys.readouterr().err and not out.parent.exists()


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
