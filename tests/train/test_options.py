"""Options that change what a run does, each with its effect asserted: data repair and empty
images, aspect-ratio grouping, norm weight decay, checkpoint frequency and pruning, the time
limit, resuming from a given state, and the evaluate tool's backend and repair flags."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from detector.core.errors import DatasetError
from detector.data.coco import CocoIndex
from tests.conftest import (
    TINY,
    assert_same_weights,
    data_overrides,
    epoch_records,
    read_jsonl,
    run_tool,
    run_tool_in_process,
    step_records,
    train,
)

pytestmark = [pytest.mark.xdist_group("options")]  # its module fixtures are built once, on one xdist worker

# -- one training run with many options -------------------------------------------------------------


def _group(w: int, h: int) -> str:
    """Aspect group of an image, by hand: portrait below 0.8, landscape above 1.25."""
    r = w / h
    return "portrait" if r < 0.8 else "landscape" if r > 1.25 else "square"


@pytest.fixture(scope="module")
def options_run(tiny_dataset, tmp_path_factory) -> dict[str, Any]:
    """tiny.yaml for 6 epochs on a training json with one unusable annotation (negative width) and
    one more image emptied, with data.on_invalid=repair, data.drop_empty=true,
    data.aspect_ratio_grouping=false, optim.norm_weight_decay, a state every 2 epochs, keeping 2,
    evaluation every 3 epochs with best.pt by the highest val/loss (mode max: the worst epoch, so
    that "the best" is not simply the last one).
    The batches the sampler yields are recorded (tests/scripts/train_spy.py)."""
    tmp = tmp_path_factory.mktemp("options")
    data = json.loads(tiny_dataset["train"].read_text())
    per_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    broken = next(anns[0] for anns in per_image.values() if len(anns) >= 2)
    broken["bbox"] = [10, 10, -5, 5]
    emptied = next(i for i, anns in per_image.items() if len(anns) == 1)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != emptied]
    ann = tmp / "train.json"
    ann.write_text(json.dumps(data))
    with_objects = {a["image_id"] for a in data["annotations"] if a is not broken}
    kept = [im for im in data["images"] if im["id"] in with_objects]
    spy = tmp / "batches.jsonl"
    out = tmp / "run"
    stdout = train(
        out, {**tiny_dataset, "train": ann}, "train.epochs=6", "train.checkpoint_every_epochs=2",
        "train.keep_checkpoints=2", "data.on_invalid=repair", "data.drop_empty=true",
        "data.aspect_ratio_grouping=false", "optim.weight_decay=0.0005", "optim.norm_weight_decay=0.01",
        "eval.every_epochs=3", "eval.best_metric=val/loss", "eval.best_mode=max", "logging.plots=false",
        script="../tests/scripts/train_spy.py", env={"SPY_BATCHES": str(spy)},
    )  # fmt: skip
    return {
        "out": out, "stdout": stdout, "ann": ann, "data": data, "kept": kept,
        "num_annotations": len(data["annotations"]), "empty": len(data["images"]) - len(kept),
        "batches": read_jsonl(spy),
    }  # fmt: skip


@pytest.mark.slow
def test_on_invalid_repair_trains_without_the_unusable_annotation(options_run):
    for mode in ("error", "clip"):  # without repair, the same file stops a run (clip is the default)
        with pytest.raises(DatasetError, match="width and height must be > 0"):
            CocoIndex(options_run["ann"], on_invalid=mode)
    out = options_run["stdout"]
    assert "repaired: annotations with zero or negative width/height dropped: 1" in out
    summary = next(line for line in out.splitlines() if line.startswith(str(options_run["ann"])))
    assert int(re.search(r"(\d+) annotations", summary).group(1)) == options_run["num_annotations"] - 1


@pytest.mark.slow
def test_drop_empty_trains_on_images_with_objects_only(options_run):
    n_kept, n_empty = len(options_run["kept"]), options_run["empty"]
    assert n_empty == 2  # the demo data's own empty image, and the one emptied above
    assert f"repaired: images without annotations dropped (data.drop_empty): {n_empty}" in options_run["stdout"]
    for epoch in range(6):
        seen = [i for r in options_run["batches"] if r["epoch"] == epoch for i in r["batch"]]
        assert sorted(seen) == list(range(n_kept)), epoch  # each kept image once an epoch, nothing else


@pytest.mark.slow
def test_aspect_ratio_grouping_off_mixes_groups(options_run):
    groups = [_group(im["width"], im["height"]) for im in options_run["kept"]]
    assert len(set(groups)) == 3
    mixed = [len({groups[i] for i in r["batch"]}) > 1 for r in options_run["batches"]]
    # Grouped, only the leftovers of the 3 groups (at most 3 images with batch 2) may share a
    # batch: at most 2 mixed batches an epoch. Ungrouped, pairs are drawn from the whole set.
    assert sum(mixed) > 2 * 6, f"{sum(mixed)} mixed batches of {len(mixed)}"


@pytest.mark.slow
def test_checkpoint_every_epochs_and_keep_checkpoints(options_run):
    steps_per_epoch = sum(1 for r in options_run["batches"] if r["epoch"] == 0)
    states = sorted(p for p in (options_run["out"] / "checkpoints").iterdir() if (p / "COMPLETE.json").is_file())
    # written after epochs 2, 4 and 6 (every 2), the oldest pruned (keep 2)
    assert [json.loads((p / "COMPLETE.json").read_text())["epoch"] for p in states] == [4, 6]
    assert [p.name for p in states] == [f"step_{4 * steps_per_epoch:08d}", f"step_{6 * steps_per_epoch:08d}"]


@pytest.mark.slow
def test_norm_weight_decay_param_groups(options_run):
    from detector.inference.predictor import load_model

    model, _, _ = load_model(options_run["out"] / "last.pt")
    model.train()
    norm_or_bias = other = 0
    for module in model.modules():
        is_norm = isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                if is_norm or name == "bias":
                    norm_or_bias += 1
                else:
                    other += 1
    last = sorted((options_run["out"] / "checkpoints").glob("step_*"))[-1]
    groups = torch.load(last / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0005, 0.01]
    assert [len(g["params"]) for g in groups] == [other, norm_or_bias]
    assert norm_or_bias > 0 and other > 0


@pytest.mark.slow
def test_best_pt_by_mode_max_on_every_third_epoch(options_run):
    evaluated = [r for r in epoch_records(options_run["out"]) if "val/loss" in r]
    assert [r["epoch"] for r in evaluated] == [3, 6]
    worst = max(evaluated, key=lambda r: r["val/loss"])  # the first of equals, as a strict improvement keeps
    ckpt = torch.load(options_run["out"] / "best.pt", weights_only=True)
    assert ckpt["epoch"] == worst["epoch"]
    assert ckpt["metrics"]["val/loss"] == pytest.approx(worst["val/loss"], abs=1e-12)


# -- time limit, then resume from a given state ---------------------------------------------------


@pytest.mark.slow
def test_time_limit_preempts_then_resume_from_path_is_exact(tiny_dataset, tmp_path):
    common = ["train.epochs=1", "logging.plots=false"]
    ref = tmp_path / "ref"
    train(ref, tiny_dataset, *common)
    total = len(step_records(ref))

    limited = tmp_path / "limited"  # plain python: the exit code is the script's own
    res = run_tool("train.py", "--config", TINY, f"output_dir={limited}", *data_overrides(tiny_dataset), *common,
                   "train.time_limit_minutes=0.00001")  # fmt: skip
    assert res.returncode == 75, res.stdout[-2000:] + res.stderr[-2000:]
    assert "time limit" in (limited / "PREEMPTED").read_text()
    assert "stopped by time limit" in res.stdout
    states = sorted((limited / "checkpoints").glob("step_*"))
    assert len(states) == 1
    pos = json.loads((states[0] / "COMPLETE.json").read_text())
    assert pos["epoch"] == 0 and 0 < pos["batch"] < total and pos["step"] == pos["batch"]  # stopped mid-epoch
    assert not [r for r in read_jsonl(limited / "metrics.jsonl") if r["kind"] == "epoch"]
    assert not (limited / "best.pt").exists()

    resumed = tmp_path / "resumed"  # another directory: only the explicit path can lead there
    out = train(resumed, tiny_dataset, *common, f"train.resume={states[0]}")
    assert f"resumed from {states[0]}" in out
    assert [r["step"] for r in step_records(resumed)] == list(range(pos["step"] + 1, total + 1))
    assert_same_weights(ref / "last.pt", resumed / "last.pt")  # as if never interrupted


# -- the evaluate tool's options (scoring a results file: no model) --------------------------------


def _gt_rows(gt: dict[str, Any], score: float = 1.0) -> list[dict[str, Any]]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
        for a in gt["annotations"]
    ]


def _jittered_rows(gt: dict[str, Any]) -> list[dict[str, Any]]:
    """Detections of the ground truth shifted by 0-40% of their size, with decreasing scores, so
    that the stats are far from 0 and 1."""
    rows = []
    for k, a in enumerate(gt["annotations"]):
        x, y, w, h = a["bbox"]
        f = (k % 5) * 0.1
        rows.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + f * w, y + f * h / 2, w, h], "score": 1 - k / 100})  # fmt: skip
    return rows


def _pycocotools_stats(gt: dict[str, Any], rows: list[dict[str, Any]]) -> list[float]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(rows), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def test_evaluate_backend_faster_coco_eval(tiny_dataset, tmp_path, monkeypatch):
    gt = json.loads(tiny_dataset["val"].read_text())
    rows = _jittered_rows(gt)
    (tmp_path / "r.json").write_text(json.dumps(rows))
    args = ["--predictions", tmp_path / "r.json", "--annotations", tiny_dataset["val"], "--output", tmp_path / "m.json"]
    assert run_tool_in_process("evaluate.py", *args, "--backend", "faster_coco_eval") == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    names = ["mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
             "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large"]  # fmt: skip
    expected = dict(zip(names, _pycocotools_stats(gt, rows)))
    assert 0.05 < expected["mAP"] < 0.95
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    # the flag really selects faster_coco_eval: where it cannot be imported, the tool says so
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import faster_coco_eval -> ImportError
    with pytest.raises(RuntimeError, match="needs the faster-coco-eval package"):
        run_tool_in_process("evaluate.py", *args, "--backend", "faster_coco_eval")
    assert run_tool_in_process("evaluate.py", *args) == 0  # pycocotools, the default, does not need it


def test_evaluate_on_invalid_repair(tiny_dataset, tmp_path, capsys):
    gt = json.loads(tiny_dataset["val"].read_text())
    rows = _gt_rows(gt)  # every real object found exactly
    bad = copy.deepcopy(gt)
    image_id = gt["annotations"][0]["image_id"]
    bad["annotations"].append({"id": 999, "image_id": image_id, "category_id": 3, "bbox": [10, 10, -5, 5],
                               "area": 25, "iscrowd": 0})  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "r.json").write_text(json.dumps(rows))
    args = [
        "--predictions",
        tmp_path / "r.json",
        "--annotations",
        tmp_path / "bad.json",
        "--output",
        tmp_path / "m.json",
    ]
    assert run_tool_in_process("evaluate.py", *args) == 2
    assert "width and height must be > 0" in capsys.readouterr().err
    assert run_tool_in_process("evaluate.py", *args, "--on-invalid", "repair") == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    # the unusable annotation is dropped, not kept as an object nobody could find: a perfect score
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)


def test_shared_data_helper_fails_under_ci(monkeypatch, tmp_path):
    from tests import conftest

    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        conftest.shared_data("cocoeval_fixtures")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        conftest.shared_data("cocoeval_fixtures")
    (tmp_path / "absent" / "x").mkdir(parents=True)
    assert conftest.shared_data("x") == Path(tmp_path / "absent" / "x")
