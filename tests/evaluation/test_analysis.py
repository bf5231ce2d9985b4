"""Error analysis (detector/evaluation/analysis.py): a hand-built case known cell by cell, per-class
P/R/F1 and AP by size by hand, non-blank plots and galleries, the evaluate tool (predictions file
and checkpoint, 1 and 2 processes) and the run directory after training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from detector.evaluation.analysis import CAPTION_PX, _best_f1, analyze, gallery, report, write_json, write_plots
from tests.conftest import launch, run_tool_in_process

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
A, B, C = [10, 10, 20, 20], [50, 50, 20, 20], [10, 60, 20, 20]  # image 1: cat, dog, bird
CROWD, DOG2, BIRD2 = [0, 0, 50, 50], [50, 50, 40, 40], [60, 0, 30, 30]  # image 2: cat crowd, dog, bird


def _ann(k: int, image: int, cat: int, box: list[float], crowd: int = 0) -> dict:
    return {"id": k, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}


def _det(image: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image, "category_id": cat, "bbox": box, "score": score}


def hand_case() -> tuple[dict, list[dict]]:
    images = [{"id": i, "file_name": f"im{i}.png", "width": 100, "height": 100} for i in (1, 2, 3)]
    anns = [
        _ann(1, 1, 1, A), _ann(2, 1, 2, B), _ann(3, 1, 3, C),
        _ann(4, 2, 1, CROWD, crowd=1), _ann(5, 2, 2, DOG2), _ann(6, 2, 3, BIRD2),
    ]  # fmt: skip
    dets = [
        _det(1, 1, A, 0.9),  # cat on the cat: right
        _det(1, 1, B, 0.8),  # cat on the dog: a confusion (dog row, cat column)
        _det(1, 2, [70, 10, 10, 10], 0.7),  # dog on nothing: false alarm
        _det(1, 2, A, 0.3),  # dog on the cat already found: false alarm
        _det(1, 3, C, 0.1),  # bird on the bird, below the score threshold: the bird stays missed
        _det(2, 1, [5, 5, 10, 10], 0.9),  # cat inside the cat crowd: ignored (COCOeval)
        _det(2, 2, [20, 20, 10, 10], 0.6),  # dog inside the cat crowd: ignored too
        _det(2, 2, DOG2, 0.95),  # right
        _det(2, 2, [51, 51, 40, 40], 0.5),  # duplicate of the dog: false alarm
        _det(2, 2, BIRD2, 0.4),  # dog on the bird that the bird detection below found: false alarm
        _det(2, 3, BIRD2, 0.35),  # right (same class first, although the dog scores higher)
        _det(3, 3, [0, 0, 10, 10], 0.99),  # on an image without objects: false alarm
    ]
    return {"images": images, "annotations": anns, "categories": CATS}, dets


def test_confusion_matrix_cell_by_cell():
    gt, dets = hand_case()
    a = analyze(gt, dets, iou_threshold=0.5, score_threshold=0.25)
    assert a.labels == ["cat", "dog", "bird", "background"]
    expected = [
        [1, 0, 0, 0],  # cat: found
        [1, 1, 0, 0],  # dog: once taken for a cat, once found
        [0, 0, 1, 1],  # bird: once found, once missed
        [0, 4, 1, 0],  # background: 4 dog and 1 bird false alarms
    ]
    assert a.confusion.tolist() == expected
    assert a.counts["on_crowd"] == 2 and a.counts["below_threshold"] == 1 and a.counts["tp"] == 3
    assert a.counts["confused"] == 1 and a.counts["false_alarm"] == 5 and a.counts["missed"] == 1
    norm = np.array(a.to_json()["confusion_matrix"]["normalized"])
    assert norm[1].tolist() == [0.5, 0.5, 0, 0] and norm[3].tolist() == [0, 0.8, 0.2, 0]
    # worst images: image 1 has 3 false positives, image 2 has 2, image 3 one; image 1 misses 2 objects
    fps = a.to_json()["worst_images"]["false_positives"]
    assert [(r["image_id"], r["fp"]) for r in fps] == [(1, 3), (2, 2), (3, 1)]
    assert [(r["image_id"], r["fn"]) for r in a.to_json()["worst_images"]["missed"]] == [(1, 2)]
    # at score 0.05 the bird below the threshold is found instead of missed
    low = analyze(gt, dets, iou_threshold=0.5, score_threshold=0.05)
    assert low.confusion[2].tolist() == [0, 0, 2, 0]
    # a stricter IoU: the duplicate dog (IoU 0.91 with the dog) stays a false alarm, nothing else changes
    assert analyze(gt, dets, iou_threshold=0.95, score_threshold=0.25).confusion.tolist() == expected
    # a shifted cat box (IoU 0.6) is a match at 0.5 but not at 0.72 (not one of COCOeval's thresholds):
    # the cat is then free for the dog detection on it (a confusion), and the shifted box is a false alarm
    shifted = [dict(dets[0], bbox=[15, 10, 20, 20])] + dets[1:]
    assert analyze(gt, shifted, 0.5).confusion.tolist() == expected
    strict = analyze(gt, shifted, 0.72).confusion.tolist()
    assert strict[0] == [0, 1, 0, 0] and strict[3] == [1, 3, 1, 0] and strict[1:3] == expected[1:3]


def test_per_class_prf_and_ap_by_size_by_hand():
    gt, dets = hand_case()
    pc = analyze(gt, dets).per_class
    # cat: 0.9 right, (0.9 in the crowd ignored), 0.8 wrong -> best at 0.9: P 1, R 1
    assert pc["cat"] == {"num_gt": 1, "num_detections": 2, "threshold": 0.9, "precision": 1.0, "recall": 1.0,
                         "f1": 1.0, "tp": 1, "fp": 0, "fn": 0}  # fmt: skip
    # dog: 0.95 right, then 0.7 0.6 0.5 0.4 0.3 wrong; 2 dogs -> best at 0.95: P 1, R 1/2, F1 2/3
    assert pc["dog"]["threshold"] == 0.95 and pc["dog"]["f1"] == pytest.approx(2 / 3)
    assert (pc["dog"]["precision"], pc["dog"]["recall"], pc["dog"]["fn"]) == (1.0, 0.5, 1)
    # bird: 0.99 wrong, 0.35 right, 0.1 right; 2 birds -> F1 0, 1/2, 4/5: best at 0.1
    assert pc["bird"]["threshold"] == 0.1 and pc["bird"]["f1"] == pytest.approx(0.8)
    assert pc["bird"]["precision"] == pytest.approx(2 / 3) and pc["bird"]["recall"] == 1.0
    # AP@[.5:.95] by size (the boxes that match are exact, so every IoU threshold agrees)
    size = analyze(gt, dets).ap_by_size
    assert size["cat"] == pytest.approx({"small": 1.0, "medium": -1.0, "large": -1.0})  # the crowd is not an object
    # the small dog was taken for a cat
    assert size["dog"] == pytest.approx({"small": 0.0, "medium": 1.0, "large": -1.0})
    assert size["bird"]["small"] == pytest.approx(2 / 3)  # a false alarm ranked above both birds


def test_best_f1_cuts_only_between_different_scores():
    # two detections of equal score cannot be separated by a threshold: the 1.0 after the first is not reachable
    r = _best_f1(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]), 2)
    assert r["threshold"] == 0.5 and r["f1"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    r = _best_f1(np.array([0.9, 0.9]), np.array([True, False]), 1)
    assert (r["threshold"], r["precision"], r["recall"]) == (0.9, 0.5, 1.0)
    assert _best_f1(np.array([0.4]), np.array([False]), 0)["recall"] is None  # no objects: undefined
    assert _best_f1(np.array([]), np.array([], dtype=bool), 3)["fn"] == 3


def test_no_detections_and_unknown_images():
    gt, dets = hand_case()
    a = analyze(gt, [])
    assert a.confusion[:3, 3].tolist() == [1, 2, 2] and a.confusion.sum() == 5  # every object missed
    assert a.per_class["dog"]["recall"] == 0.0 and a.ap_by_size["dog"]["medium"] == 0.0
    with pytest.raises(ValueError, match="1 image id"):
        analyze(gt, [_det(99, 1, A, 0.5)])
    # a category the ground truth does not have is counted and said, not matched
    odd = analyze(gt, [*dets, _det(1, 42, C, 0.9)])
    assert odd.counts["unknown_category"] == 1 and odd.confusion.tolist() == analyze(gt, dets).confusion.tolist()
    assert "1 detection(s) of categories not in the ground truth left out" in report(odd)
    # COCOeval keeps the 100 best detections per image and class: the 101st is left out, and said
    many = analyze(gt, [_det(3, 1, [k % 90, 0, 5, 5], 0.3 + k / 1000) for k in range(101)])
    assert many.counts["beyond_max_dets"] == 1 and many.confusion[3, 0] == 100
    assert "1 detection(s) beyond COCOeval's 100 per image and class left out" in report(many)


def _write_images(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in (1, 2, 3):
        im = Image.new("RGB", (100, 100), (40 * i, 60, 90))
        ImageDraw.Draw(im).ellipse([20, 20, 60, 60], fill=(200, 200, 30))
        im.save(root / f"im{i}.png")


def assert_non_blank_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 50, path
        arr = np.asarray(im.convert("RGB"))
    colours = np.unique(arr.reshape(-1, 3), axis=0)
    assert len(colours) > 10, f"{path} has {len(colours)} colours"


def test_plots_and_galleries_are_non_blank_pngs(tmp_path):
    gt, dets = hand_case()
    _write_images(tmp_path / "images")
    a = analyze(gt, dets)
    paths = write_plots(a, tmp_path / "plots", tmp_path / "images", gallery_size=2)
    names = {"confusion_matrix", "per_class_prf", "ap_by_size", "worst_false_positives", "worst_missed"}
    assert set(paths) == names
    for p in paths.values():
        assert_non_blank_png(p)
    with Image.open(paths["worst_false_positives"]) as im:  # two 320 px tiles and captions (4 px padding)
        assert im.size == (2 * 320 + 3 * 4, 320 + CAPTION_PX + 2 * 4)
    # the gallery draws the boxes: the tile differs from the plain image scaled up
    tile = np.asarray(Image.open(paths["worst_missed"]).convert("RGB"))  # one image: no grid padding
    assert tile.shape == (320 + CAPTION_PX, 320, 3)
    assert (tile[320:] > 200).sum() > 50  # the caption is written
    tile = tile[:320]
    plain = np.asarray(Image.open(tmp_path / "images" / "im1.png").convert("RGB").resize((320, 320)))
    assert (np.abs(tile.astype(int) - plain.astype(int)).sum(axis=2) > 100).sum() > 500
    saved = json.loads(write_json(a, tmp_path / "analysis.json").read_text())
    assert saved["confusion_matrix"]["counts"] == a.confusion.tolist()
    # a missing image is left out of the gallery with a warning naming it
    (tmp_path / "images" / "im1.png").unlink()
    warnings: list[str] = []
    assert gallery(a, "fn", tmp_path / "images", tmp_path / "missed.png", warn=warnings.append) is None
    assert any("im1.png" in w for w in warnings)


def test_evaluate_tool_predictions_file_plots(tmp_path, capsys):
    gt, dets = hand_case()
    _write_images(tmp_path / "images")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "r.json").write_text(json.dumps(dets))
    code = run_tool_in_process("evaluate.py", "--predictions", tmp_path / "r.json", "--annotations", tmp_path / "gt.json",
                               "--images", tmp_path / "images", "--plots", tmp_path / "plots")  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "error analysis at IoU 0.5, score >= 0.25: 3 right, 1 wrong class, 5 false alarms, 1 missed" in out.out
    saved = json.loads((tmp_path / "plots" / "analysis.json").read_text())
    assert saved["confusion_matrix"]["counts"][3] == [0, 4, 1, 0]
    for name in ("confusion_matrix", "per_class_prf", "ap_by_size", "worst_false_positives", "worst_missed"):
        assert_non_blank_png(tmp_path / "plots" / f"{name}.png")


def log_analysis_to_offline_wandb(folder: str) -> None:
    """The hand case's analysis logged to an offline W&B run in ``folder`` (run by in_subprocess)."""
    import wandb

    from detector.config import WandbConfig
    from detector.evaluation.analysis import log_wandb
    from detector.runs.tracking import RunLogger

    gt, dets = hand_case()
    a = analyze(gt, dets)
    paths = write_plots(a, Path(folder) / "plots", None)
    logger = RunLogger(Path(folder), enabled=True)
    logger.start_wandb(WandbConfig(enabled=True, mode="offline"), {}, None, print_fn=lambda m: None)
    log_wandb(logger, a, paths, step=3)
    logger.close()
    wandb.teardown()  # the service process flushes the run file before it exits


def test_wandb_gets_the_tables_and_pictures(tmp_path):
    """The real wandb library, offline (in a process of its own), read back from its run file."""
    from tests.conftest import in_subprocess
    from tests.runs.test_tracking import _summarise

    in_subprocess("tests.evaluation.test_analysis:log_analysis_to_offline_wandb", tmp_path, env={"WANDB_MODE": None})
    history, _, _ = _summarise(next(tmp_path.glob("wandb/offline-run-*/*.wandb")))
    for key in ("val/confusion_matrix", "val/per_class_prf", "val/analysis"):
        assert any(k.startswith(key + "/") or k == key for k in history), (key, history)
    tables = [json.loads(p.read_text()) for p in tmp_path.glob("wandb/offline-run-*/files/media/table/**/*.json")]
    matrix = next(t for t in tables if t["columns"][0] == "ground truth")
    assert matrix["data"][1] == ["dog", 1, 1, 0, 0] and matrix["data"][3] == ["background", 0, 4, 1, 0]


def test_epoch_analysis_writes_json_every_time_and_pngs_when_asked(tmp_path):
    from detector.config import EvalConfig
    from detector.evaluation.analysis import epoch_analysis

    gt, dets = hand_case()

    def run(best: bool, last: bool, **cfg) -> set[str]:
        epoch_analysis(tmp_path, gt, dets, None, EvalConfig(**cfg), None, 0, best=best, last=last, plots=True)
        return {p.name for p in (tmp_path / "plots" / "analysis").glob("*.png")}

    assert run(best=True, last=False) == set()  # default "last": not drawn at a better, non-final evaluation
    assert json.loads((tmp_path / "analysis_best.json").read_text())["counts"]["tp"] == 3
    assert run(best=False, last=False, analysis_iou=0.95, analysis_plots="best") == set()
    assert json.loads((tmp_path / "analysis.json").read_text())["iou_threshold"] == 0.95
    assert json.loads((tmp_path / "analysis_best.json").read_text())["iou_threshold"] == 0.5  # not the best
    assert run(best=True, last=False, analysis_plots="best") == {"confusion_matrix.png", "per_class_prf.png",
                                                                  "ap_by_size.png"}  # fmt: skip


# -- training and the evaluate tool on the tiny trained run --------------------------------------------


@pytest.mark.slow
def test_run_directory_has_the_analysis(trained_run):
    """tests/configs/tiny.yaml keeps the defaults: the analysis at every evaluation, the PNGs of
    the last one in plots/analysis/."""
    saved = json.loads((trained_run / "analysis.json").read_text())
    best = json.loads((trained_run / "analysis_best.json").read_text())
    counts = np.array(saved["confusion_matrix"]["counts"])
    assert saved["classes"] == ["circle", "square", "triangle"] and counts.shape == (4, 4)
    # every object of the val split is in exactly one cell of its row (22 objects, no crowd)
    assert counts[:3].sum() == saved["counts"]["objects"] == best["counts"]["objects"] > 0
    assert counts[3, 3] == 0
    for name in ("confusion_matrix", "per_class_prf", "ap_by_size"):
        assert_non_blank_png(trained_run / "plots" / "analysis" / f"{name}.png")


@pytest.mark.slow
def test_evaluate_checkpoint_on_2_processes_gives_the_analysis_of_1(trained_run, tiny_dataset, tmp_path):
    """tools/evaluate.py on 2 processes writes the very analysis that 1 process writes (same
    weights, same val batches: the same gathered detections). The tiny model's scores are low:
    the analysis counts detections from 0.05 so that it is not vacuous."""
    common = ["--checkpoint", trained_run / "best.pt", "--annotations", tiny_dataset["val"],
              "--images", tiny_dataset["root"] / "val", "--workers", "0", "--confusion-score", "0.05"]  # fmt: skip
    out = tmp_path / "plots"
    res = launch("evaluate.py", [*common, "--batch-size", "2", "--plots", out], nproc=2, warm=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "error analysis at IoU 0.5" in res.stdout
    assert run_tool_in_process("evaluate.py", *common, "--batch-size", "2", "--plots", tmp_path / "one") == 0
    two = (out / "analysis.json").read_text()
    one = (tmp_path / "one" / "analysis.json").read_text()
    assert json.loads(two)["counts"]["tp"] + json.loads(two)["counts"]["false_alarm"] > 0  # not vacuous
    assert two == one
    for name in ("confusion_matrix", "worst_false_positives", "worst_missed"):
        assert_non_blank_png(out / f"{name}.png")


def test_gallery_reads_images_from_a_url_root(tmp_path):
    """A val image root in object storage (any fsspec URL; memory:// here) gets its galleries too:
    the root must not go through Path(), which folds 'memory://x' into 'memory:/x'."""
    import fsspec

    gt, dets = hand_case()
    _write_images(tmp_path / "images")
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "images").iterdir():
        fs.pipe_file(f"/rev14-gallery/images/{f.name}", f.read_bytes())
    warnings: list[str] = []
    try:
        a = analyze(gt, dets)
        local = gallery(a, "fn", tmp_path / "images", tmp_path / "local.png", n=2)
        remote = gallery(a, "fn", "memory://rev14-gallery/images", tmp_path / "remote.png", n=2, warn=warnings.append)
    finally:
        fs.rm("/rev14-gallery", recursive=True)
    assert warnings == [] and remote is not None
    assert np.array_equal(np.asarray(Image.open(local)), np.asarray(Image.open(remote)))


def test_evaluate_tool_confusion_iou_score_and_gallery_flags_change_what_is_written(tmp_path, capsys):
    """--confusion-iou and --confusion-score reach the analysis, --gallery the galleries."""
    gt, dets = hand_case()
    dets[0]["bbox"] = [12, 12, 20, 20]  # the cat found at IoU 0.68: right at 0.5, not at 0.75
    _write_images(tmp_path / "images")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "r.json").write_text(json.dumps(dets))

    def run(name: str, *flags: object) -> tuple[dict, Path]:
        plots = tmp_path / name
        code = run_tool_in_process("evaluate.py", "--predictions", tmp_path / "r.json", "--annotations",
                                   tmp_path / "gt.json", "--images", tmp_path / "images", "--plots", plots, *flags)  # fmt: skip
        assert code == 0, capsys.readouterr().err
        return json.loads((plots / "analysis.json").read_text()), plots

    default, plots = run("default")
    assert (default["iou_threshold"], default["score_threshold"]) == (0.5, 0.25)
    assert (default["counts"]["tp"], default["counts"]["confused"], default["counts"]["missed"]) == (3, 1, 1)
    strict, _ = run("iou", "--confusion-iou", 0.75)
    assert strict["iou_threshold"] == 0.75 and (strict["counts"]["tp"], strict["counts"]["confused"]) == (2, 2)
    low, _ = run("score", "--confusion-score", 0.05)  # the bird at 0.1 now counts: found, nothing missed
    assert low["score_threshold"] == 0.05 and (low["counts"]["tp"], low["counts"]["missed"]) == (4, 0)
    assert (plots / "worst_false_positives.png").is_file() and (plots / "worst_missed.png").is_file()
    _, none = run("no_gallery", "--gallery", 0)
    assert (none / "confusion_matrix.png").is_file()
    assert not list(none.glob("worst_*.png"))
    _, one = run("gallery_1", "--gallery", 1)
    with Image.open(one / "worst_false_positives.png") as small, Image.open(plots / "worst_false_positives.png") as big:
        assert small.width * small.height < big.width * big.height  # 1 image, not the default 8
