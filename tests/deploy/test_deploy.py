"""Exported ONNX graphs take images of any size: parity with eager PyTorch on three aspect ratios
at two sizes, and ExportedPredictor on files (EXIF orientation, reduced-scale decoding) giving the
Predictor's detections. The trained tiny Faster R-CNN here; the other families reuse
``exported_like_predictor`` with their own runs (tests/models/test_families.py, tests/train/test_masks_run.py)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.core.detections import Detections
from detector.deploy import export
from detector.inference.predictor import Predictor, load_model
from tests.conftest import run_tool_in_process

# (height, width): portrait 3:4, 4:3 and 16:9, each at two sizes (the tiny models resize to 96..128)
SHAPES = [(128, 96), (96, 128), (90, 160), (256, 192), (192, 256), (180, 320)]
BOX_TOL = 0.05  # px, in the full image's pixels (measured: < 0.01 for every family)


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, as the launched tools run (2 threads on a shared 2-core box spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _val_images(ds: dict[str, Path]) -> list[Path]:
    return sorted((ds["root"] / "val").glob("*.jpg"))


def shaped_images(path: Path) -> list[torch.Tensor]:
    """Centre crops of an image at the SHAPES, resized to them (float CHW in [0, 1])."""
    full = Predictor.to_tensor(path)
    return [export.reshaped(full, s) for s in SHAPES]


def exif_rotated_jpeg(src: Path, dst: Path, upscale: int = 3) -> tuple[int, int]:
    """A JPEG of ``src`` enlarged ``upscale`` times (so that the Predictor decodes it at reduced
    scale), stored rotated with EXIF orientation 6 (a viewer turns it back). Returns its
    (width, height) as oriented."""
    im = Image.open(src).convert("RGB")
    im = im.resize((im.width * upscale, im.height * upscale), Image.BICUBIC)
    stored = im.transpose(Image.Transpose.ROTATE_90)  # orientation 6 rotates it back by 270
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(dst, quality=92, exif=exif)
    return im.size


def _pairs(
    a: Detections, b: Detections, thresh: float, cap: int | None
) -> tuple[bool, float, int, list[tuple[int, int]]]:
    """export._match on two Detections, and the (i, j) pairs of the same label and closest box."""
    ok, box_diff, _, n = export._match({"boxes": a.boxes, "labels": a.labels, "scores": a.scores},
                                       (b.boxes, b.labels, b.scores), thresh, cap=cap)  # fmt: skip
    pairs = []
    for i in np.flatnonzero(a.scores >= thresh):
        cand = [j for j in range(len(b)) if b.labels[j] == a.labels[i]]
        if cand:
            pairs.append((int(i), min(cand, key=lambda j: float(np.abs(b.boxes[j] - a.boxes[i]).max()))))
    return ok, box_diff, n, pairs


def exported_like_predictor(onnx_path: Path, checkpoint: Path, inputs: list, thresh: float) -> dict[str, float]:
    """ExportedPredictor on ``inputs`` (paths, tensors...) against the Predictor of the checkpoint:
    the same detections at or above ``thresh`` (label, box within BOX_TOL px in the full image's
    pixels; masks by IoU). Returns the figures: compared detections, max box diff, min mask IoU."""
    from detector.deploy.exported import ExportedPredictor
    from detector.deploy.mask_parity import _iou

    # one image per forward, as the graph runs: a batch of mixed sizes is padded to its largest,
    # which changes what the RPN's top-n proposals are chosen from
    with one_thread():
        predictor = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=1)
        eager = predictor.predict(inputs)
        exported = ExportedPredictor.from_onnx(onnx_path, threads=1).predict(inputs)
    compared, worst, min_iou = 0, 0.0, 1.0
    cap = export.detections_cap(predictor.model)
    for k, (a, b) in enumerate(zip(eager, exported, strict=True)):
        ok, box_diff, n, pairs = _pairs(a, b, thresh, cap)
        assert ok and box_diff <= BOX_TOL, (k, box_diff, a.boxes[:3], b.boxes[:3])
        compared, worst = compared + n, max(worst, box_diff)
        assert (a.masks is None) == (b.masks is None)
        if a.masks is not None:
            assert b.masks.shape[1:] == a.masks.shape[1:]  # the full image's size
            for i, j in pairs:
                min_iou = min(min_iou, _iou(a.masks[i], b.masks[j]))
    assert compared > 0, "no detection to compare: the check would pass any graph"
    assert min_iou >= 0.95, min_iou
    return {"detections": compared, "max_box_diff": worst, "min_mask_iou": min_iou}


def graph_parity_on_shapes(model: torch.nn.Module, onnx_path: Path, images: list[torch.Tensor], thresh: float):
    """The graph against eager PyTorch on each image at its own size (no resizing)."""
    with one_thread():
        parity = export.check_parity(model, images, export.onnx_runner(onnx_path, threads=1), thresh)
    assert parity.images == len(SHAPES) and parity.ok(BOX_TOL, 1e-4), parity
    return parity


# -- the trained tiny Faster R-CNN ------------------------------------------------------------------


@pytest.fixture(scope="module")
def frcnn_onnx(trained_run, tiny_dataset, tmp_path_factory) -> Path:
    """The trained checkpoint exported once, traced at an odd size, checked on two given samples."""
    out = tmp_path_factory.mktemp("deploy") / "model.onnx"
    samples = _val_images(tiny_dataset)[:2]
    with one_thread():
        code = run_tool_in_process("export.py", "--checkpoint", trained_run / "best.pt", "--format", "onnx", "--output",
                                   out, "--size", 101, 143, "--samples", *samples, "--score-threshold", 0.05)  # fmt: skip
    assert code == 0, json.loads(Path(str(out) + ".json").read_text()).get("parity")
    return out


@pytest.mark.slow
def test_onnx_takes_any_size_and_matches_eager_on_three_aspect_ratios(frcnn_onnx, trained_run, tiny_dataset):
    import onnxruntime as ort

    meta = json.loads(Path(str(frcnn_onnx) + ".json").read_text())
    assert meta["input"]["size_hw"] == "any" and meta["metadata_format"] == "detector.export/2"
    assert meta["class_names"] == ["circle", "square", "triangle"] and meta["category_ids"] == [3, 7, 12]
    assert meta["input"]["decode"]["model_size"] == [96, 128] and meta["input"]["decode"]["draft"] is True
    shape = ort.InferenceSession(str(frcnn_onnx), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    assert shape[0] == 3 and all(isinstance(d, str) for d in shape[1:])  # symbolic height and width
    # the tool checked the 2 samples at their own sizes and crops at 6 shapes (not the traced 101x143)
    assert meta["parity"]["images"] == 12 and len({tuple(s) for s in meta["parity"]["shapes_hw"]}) >= 6
    assert [101, 143] not in meta["parity"]["shapes_hw"]

    model, _, _ = load_model(trained_run / "best.pt")
    parity = graph_parity_on_shapes(model, frcnn_onnx, shaped_images(_val_images(tiny_dataset)[2]), 0.05)
    assert parity.detections > 0
    # boxes are in the given image's pixels: a 16:9 image's boxes reach beyond a 4:3 frame of its height
    run = export.onnx_runner(frcnn_onnx, threads=1)
    wide = shaped_images(_val_images(tiny_dataset)[2])[5]
    boxes, _, _ = run(wide)
    assert (boxes[:, 2] <= 320 + 1e-3).all() and (boxes[:, 3] <= 180 + 1e-3).all()


@pytest.mark.slow
def test_exported_predictor_on_an_exif_rotated_file_gives_the_predictors_detections(
    frcnn_onnx, trained_run, tiny_dataset, tmp_path
):
    from detector.deploy.exported import ExportedPredictor

    src = _val_images(tiny_dataset)[1]
    path = tmp_path / "rotated.jpg"
    w, h = exif_rotated_jpeg(src, path)
    assert Image.open(path).size == (h, w)  # stored the other way round
    p = ExportedPredictor.from_onnx(frcnn_onnx, threads=1)
    tensor, scale, size = p.prepare(path)
    assert size == (w, h) and scale < 1 and tuple(tensor.shape[1:]) == (math.ceil(h * scale), math.ceil(w * scale))
    figures = exported_like_predictor(frcnn_onnx, trained_run / "best.pt", [path, src, *shaped_images(src)], 0.05)
    det = p.predict(path)[0]
    assert len(det) and (det.boxes[:, [2, 3]] <= [w, h]).all()
    assert det.boxes[:, 2].max() > tensor.shape[2]  # in the full image's pixels, not the decoded ones
    assert figures["max_box_diff"] <= BOX_TOL
    # score_threshold only filters; below the exported threshold it refuses
    high = ExportedPredictor.from_onnx(frcnn_onnx, threads=1, score_threshold=0.5).predict(path)[0]
    assert (high.scores >= 0.5).all() and len(high) == int((det.scores >= 0.5).sum())
    with pytest.raises(ValueError, match="below"):
        ExportedPredictor.from_onnx(frcnn_onnx, score_threshold=0.01)


def test_metadata_of_a_fixed_size_export_is_refused(tmp_path):
    from detector.deploy.exported import read_metadata

    (tmp_path / "m.onnx.json").write_text(json.dumps({"format": "onnx", "input": {"size_hw": [480, 640]}}))
    with pytest.raises(ValueError, match="fixed input size"):
        read_metadata(tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="no metadata"):
        read_metadata(tmp_path / "other.onnx")


# -- the parity check itself: a wrong graph must not pass ------------------------------------------


def _dets(boxes: list[list[float]], labels: list[int], scores: list[float]):
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64), np.asarray(scores, np.float32))


def test_parity_pairing_excuses_a_missing_detection_only_where_the_models_cap_cut_the_list():
    b, lab, s = _dets([[10, 10, 50, 50]], [1], [0.9])
    eager = {"boxes": b, "labels": lab, "scores": s}
    empty, extra = _dets([], [], []), _dets([[10, 10, 50, 50], [60, 60, 90, 90]], [1, 2], [0.9, 0.5])
    # one confident detection: a graph that returns nothing, or something eager does not find, fails
    assert not export._match(eager, empty, 0.3, cap=100)[0]
    assert not export._match(eager, extra, 0.3, cap=100)[0]
    assert export._match(eager, (b, lab, s), 0.3, cap=100)[0]
    # the list at the cap (here 1): below its lowest score either side may have kept another one
    assert export._match(eager, extra, 0.3, cap=1)[0]


@pytest.mark.slow
def test_check_parity_fails_a_graph_that_drops_each_images_weakest_detection(trained_run, tiny_dataset):
    # every detection the model returns is above the compared threshold (as for a confident model
    # on sparse images): none of them is a near-tie at the threshold or at the model's cap
    model, _, _ = load_model(trained_run / "best.pt", box_score_thresh=0.1)
    images = shaped_images(_val_images(tiny_dataset)[2])[:3]

    def eager(img: torch.Tensor, drop: int = 0):
        with torch.no_grad():
            d = model([img])[0]
        n = len(d["scores"]) - drop
        return d["boxes"][:n].numpy(), d["labels"][:n].numpy(), d["scores"][:n].numpy()

    assert export.check_parity(model, images, eager, 0.05).ok(BOX_TOL, 1e-4)
    parity = export.check_parity(model, images, lambda img: eager(img, drop=1), 0.05)
    assert parity.detections > 0 and not parity.labels_equal, parity


# -- tools/export.py: what the check looks at, and bad input ------------------------------------------


def _export_tool():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("tool_export_samples", ROOT / "tools" / "export.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_aspect_ratio_crops_are_of_a_sample_with_objects(trained_run, tiny_dataset, tmp_path):
    # a blank first sample has nothing above 0.15 for the trained tiny model, the val image with the
    # most detections has plenty: crops of the first would compare nothing, and any graph would pass
    from PIL import Image

    model, label_map, _ = load_model(trained_run / "best.pt")
    predictor = Predictor(model, label_map, "cpu", 1)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (160, 120), (128, 128, 128)).save(blank)

    def found(im):
        with torch.no_grad():
            return int((model([im])[0]["scores"] >= 0.15).sum())

    vals = [str(p) for p in _val_images(tiny_dataset)]
    counts = [found(predictor.prepare(v)[0]) for v in vals]
    second = vals[counts.index(max(counts))]
    first = str(blank)
    images, names = _export_tool().sample_images([first, second], {}, predictor, score_threshold=0.15)
    assert found(images[0]) == 0 and found(images[1]) > 0  # the premise
    crops = images[2:]
    scaled = export.scaled_shapes(model, tuple(images[1].shape[1:]))
    assert [tuple(im.shape[1:]) for im in crops] == export.parity_shapes(model) + scaled
    assert names[:2] == [first, second] and all(n.startswith(second) for n in names[2:])
    assert all(found(im) > 0 for im in crops[: len(export.parity_shapes(model))])


@pytest.mark.slow
def test_export_tool_refuses_a_bad_size_or_a_missing_sample_clearly(trained_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as exc:
        run_tool_in_process("export.py", "--checkpoint", trained_run / "best.pt", "--format", "onnx", "--output", out,
                            "--size", 0, 96)  # fmt: skip
    assert exc.value.code == 2 and "--size" in capsys.readouterr().err
    code = run_tool_in_process("export.py", "--checkpoint", trained_run / "best.pt", "--format", "onnx", "--output",
                               out, "--samples", tmp_path / "missing.jpg")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "missing.jpg" in err and "Traceback" not in err, err
    assert not out.exists()  # refused before exporting anything


def test_a_failed_check_names_the_image_counts_what_differs_and_tells_cap_ties_apart():
    eager = {"boxes": np.array([[10, 10, 50, 50], [60, 60, 90, 90], [5, 5, 20, 20]], np.float32),
             "labels": np.array([1, 2, 2]), "scores": np.array([0.9, 0.5, 0.2], np.float32)}  # fmt: skip
    moved = (eager["boxes"] + [[0, 0, 0, 0], [30, 0, 30, 0], [0, 0, 0, 0]], eager["labels"], eager["scores"])
    im = export.compare(eager, moved, 0.1, name="val/a.jpg", shape=(60, 80))
    assert im.differing(1.0, 1e-3) == [0.5] and not im.at_cap_ties(1.0, 1e-3)
    line = im.describe(1.0, 1e-3)
    assert "val/a.jpg (60x80)" in line and "1 of 3 detection(s) differ" in line and "30.000 px" in line
    # at the model's cap (3 here) another near-equal weakest detection kept: benign, said so
    swapped = _dets([[10, 10, 50, 50], [60, 60, 90, 90], [30, 30, 40, 40]], [1, 2, 2], [0.9, 0.5, 0.2049])
    tie = export.compare(eager, swapped, 0.1, margin=1e-6, cap=3, name="b.jpg")
    assert tie.differing(1.0, 1e-3) and tie.at_cap_ties(1.0, 1e-3) and "benign" in tie.describe(1.0, 1e-3)


def test_default_samples_are_the_images_the_val_json_lists(tmp_path):
    """A Roboflow folder: its _annotations.coco.json sorts first and an unlisted file is there too."""
    folder = tmp_path / "valid"
    folder.mkdir()
    for n in ("a.jpg", "b.jpg", "unlisted.jpg"):
        Image.new("RGB", (40, 30)).save(folder / n)
    coco = {"images": [{"id": 1, "file_name": "b.jpg", "width": 40, "height": 30},
                       {"id": 2, "file_name": "a.jpg", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "cell"}]}  # fmt: skip
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))
    cfg = {"data": {"val": {"annotations": str(folder / "_annotations.coco.json"), "images": str(folder)}}}
    assert _export_tool().val_samples(cfg) == [str(folder / "a.jpg"), str(folder / "b.jpg")]  # annotated first
