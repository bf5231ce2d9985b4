"""The edges where a run used to train, evaluate or predict something else than the user thinks.

One test (or a few) per case; each failed before its fix. The slow ones launch training.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector import config
from detector.core import progress
from detector.core.errors import DatasetError
from detector.data import check_files
from detector.data.coco import CocoDetection, CocoIndex
from detector.evaluation.cocoeval import detections_to_coco
from detector.train import checkpoint, engine, optim
from detector.train import process as runtime
from detector.train.state import RunState
from tests.conftest import (
    ROOT,
    TINY,
    data_overrides,
    launch,
    launch_cmd,
    read_jsonl,
    run_cmd,
    run_tool_in_process,
    tool_env,
    write_coco,
)

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def _image(path: Path, size: tuple[int, int], exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (90, 120, 150))
    if exif_orientation is None:
        img.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(path, exif=exif)
    return path


# -- 1 and 6: overhanging boxes ------------------------------------------------------------------


def _cvat_like(tmp_path: Path) -> Path:
    """A 640x360 image with one box ending at y=365.7 (5.7 px past the edge) and one overhanging
    by 0.5 px whose json area is not its clipped area."""
    _image(tmp_path / "img" / "a.jpg", (640, 360))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 300.5, 50, 65.2], "area": 3260.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [600.5, 10, 40, 20], "area": 777.0, "iscrowd": 0},
    ]
    return write_coco(tmp_path / "ann.json", [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 360}], anns, CATS)


def test_overhanging_box_is_clipped_for_training_and_scored_as_written(tmp_path):
    path = _cvat_like(tmp_path)
    idx = CocoIndex(path)  # the default: data.on_invalid=clip
    boxes, _, _ = idx.annotations(0)
    np.testing.assert_allclose(boxes, [[100, 300.5, 150, 360], [600.5, 10, 640, 30]], rtol=0, atol=1e-4)
    assert sum(n for k, n in idx.repairs.items() if "clipped for training" in k) == 2
    assert "clipped for training" in idx.summary()
    gt = idx.to_coco_gt()["annotations"]
    assert [a["bbox"] for a in gt] == [[100, 300.5, 50, 65.2], [600.5, 10, 40, 20]]  # as written
    assert [a["area"] for a in gt] == [3260.0, 777.0]  # the json's area (case 6), not the clipped one
    with pytest.raises(DatasetError, match="leaves the 640x360 image"):
        CocoIndex(path, on_invalid="error")  # the strict mode stays


def test_json_area_kept_in_error_mode_too(tmp_path):
    path = _cvat_like(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]  # only the 0.5 px overhang: accepted in error mode
    path.write_text(json.dumps(data))
    gt = CocoIndex(path, on_invalid="error").to_coco_gt()["annotations"]
    assert gt[0]["area"] == 777.0 and gt[0]["bbox"] == [600.5, 10, 40, 20]


def test_evaluate_predictions_scores_overhanging_ground_truth(tmp_path, capsys):
    path = _cvat_like(tmp_path)
    rows = [
        {"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in json.loads(path.read_text())["annotations"]
    ]
    (tmp_path / "res.json").write_text(json.dumps(rows))
    code = run_tool_in_process("evaluate.py", "--predictions", tmp_path / "res.json", "--annotations", path,
                               "--output", tmp_path / "m.json")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text())["mAP"] == pytest.approx(1.0)


# -- 2: categories matched by name ------------------------------------------------------------------


def _split(tmp_path: Path, name: str, cats: list[dict], cat_of_ann: list[int]) -> Path:
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": 100, "height": 80} for i in range(len(cat_of_ann))]
    anns = [
        {"id": i + 1, "image_id": i + 1, "category_id": c, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0}
        for i, c in enumerate(cat_of_ann)
    ]
    return write_coco(tmp_path / name, images, anns, cats)


def test_same_ids_other_order_are_mapped_by_name(tmp_path):
    train = CocoIndex(_split(tmp_path, "train.json", CATS, [1, 2]))
    swapped = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    val = CocoIndex(_split(tmp_path, "val.json", swapped, [1, 2]), label_map=train.label_map, label_source="train.json")
    # val's first object is a dog (its id 1): the model's dog label, and the training id of dogs
    assert val.labels.tolist() == [2, 1]
    assert [a["category_id"] for a in val.to_coco_gt()["annotations"]] == [2, 1]
    assert val.category_remap == {1: 2, 2: 1}
    assert "matched to the training classes by name" in val.summary()


def test_disagreeing_names_stop_naming_both_files(tmp_path):
    train = CocoIndex(_split(tmp_path, "train.json", CATS, [1, 2]))
    other = [{"id": 1, "name": "cat"}, {"id": 2, "name": "horse"}]
    with pytest.raises(DatasetError) as err:
        CocoIndex(_split(tmp_path, "val.json", other, [1, 2]), label_map=train.label_map, label_source="train.json")
    text = str(err.value)
    assert "val.json" in text and "train.json" in text and "category 2 'horse'" in text and "'dog'" in text


@pytest.mark.slow
def test_evaluate_checkpoint_on_a_renumbered_val_json(trained_run, tiny_dataset, tmp_path):
    """The same val set with its category ids permuted scores exactly the same."""
    data = json.loads(Path(tiny_dataset["val"]).read_text())
    perm = {3: 12, 7: 3, 12: 7}
    for c in data["categories"]:
        c["id"] = perm.get(c["id"], c["id"])
    for a in data["annotations"]:
        a["category_id"] = perm[a["category_id"]]
    renum = tmp_path / "val_renumbered.json"
    renum.write_text(json.dumps(data))
    out = {}
    for name, ann in (("orig", tiny_dataset["val"]), ("renum", renum)):  # 1 process: no launcher needed
        code = run_tool_in_process("evaluate.py", "--checkpoint", trained_run / "best.pt", "--annotations", ann,
                                   "--images", tiny_dataset["root"] / "val", "--score-threshold", "0.01",
                                   "--num-workers", "0", "--output", tmp_path / f"{name}.json",
                                   "--results", tmp_path / f"{name}_res.json", threads=1)  # fmt: skip
        assert code == 0
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert out["orig"]["mAP50"] > 0  # a comparison of real detections
    for k in ("mAP", "mAP50", "AR100"):
        assert out["renum"][k] == pytest.approx(out["orig"][k], abs=1e-12), k
    # results are written in each file's own category ids
    orig = json.loads((tmp_path / "orig_res.json").read_text())
    renum_rows = json.loads((tmp_path / "renum_res.json").read_text())
    assert [perm[r["category_id"]] for r in orig] == [r["category_id"] for r in renum_rows]


# -- 3: the Predictor sees what evaluation saw ----------------------------------------------------------


@pytest.mark.slow
def test_predictor_detections_equal_evaluate_detections(trained_run, tiny_dataset, tmp_path):
    from detector.inference.predictor import Predictor

    code = run_tool_in_process("evaluate.py", "--checkpoint", trained_run / "best.pt", "--annotations",
                               tiny_dataset["val"], "--images", tiny_dataset["root"] / "val", "--score-threshold",
                               "0.05", "--batch-size", "1", "--num-workers", "0", "--results", tmp_path / "res.json",
                               threads=1)  # fmt: skip
    assert code == 0
    evaluated = json.loads((tmp_path / "res.json").read_text())
    val = json.loads(Path(tiny_dataset["val"]).read_text())
    big = [im for im in val["images"] if max(im["width"], im["height"]) >= 2 * 128]
    assert big, "no image large enough to be decoded at reduced scale"
    predictor = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", score_threshold=0.05, batch_size=1)
    files = [tiny_dataset["root"] / "val" / im["file_name"] for im in val["images"]]
    dets = predictor.predict(files)
    rows = []
    for im, d in zip(val["images"], dets):
        for b, c, s in zip(d.boxes.tolist(), d.category_ids.tolist(), d.scores.tolist()):
            rows.append((im["id"], c, [b[0], b[1], b[2] - b[0], b[3] - b[1]], s))
    assert len(rows) == len(evaluated) > 0
    key = lambda r: (r[0], -r[3])  # noqa: E731
    for p, e in zip(sorted(rows, key=key), sorted(((r["image_id"], r["category_id"], r["bbox"], r["score"])
                                                    for r in evaluated), key=key)):  # fmt: skip
        assert p[0] == e[0] and p[1] == e[1]
        assert p[3] == pytest.approx(e[3], abs=1e-5)
        np.testing.assert_allclose(p[2], e[2], atol=2e-3)  # evaluate rounds to 3 decimals


# -- 4: resume with another number of processes -------------------------------------------------------


def test_mid_epoch_state_with_another_batch_size_is_refused():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    pos = RunState(epoch=1, batch=3, step=11, world_size=2, batch_size=4, grad_accum_steps=1)
    with pytest.raises(checkpoint.CheckpointError, match="batch_size 4 -> 8"):
        checkpoint.adapt_position(pos, {"world_size": 2, "batch_size": 8, "grad_accum_steps": 1}, 5, 0.1, opt, sched)
    with pytest.raises(checkpoint.CheckpointError, match="do not divide among 2 processes"):
        checkpoint.adapt_position(replace(pos, world_size=1), {"world_size": 2, "batch_size": 4, "grad_accum_steps": 1},
                                  5, 0.1, opt, sched)  # fmt: skip


def test_end_of_epoch_state_takes_the_new_global_batch_lr():
    model = torch.nn.Linear(2, 2)
    cfg = config.OptimConfig(warmup_steps=0, schedule="cosine")
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    sched = optim.build_scheduler(opt, cfg, total_steps=40)
    for _ in range(10):
        opt.step()
        sched.step()
    pos = RunState(epoch=1, batch=0, step=10, world_size=2, batch_size=4, grad_accum_steps=1)
    new = checkpoint.adapt_position(pos, {"world_size": 1, "batch_size": 4, "grad_accum_steps": 1}, 20, 0.2, opt,
                                    sched, lambda _: None)  # fmt: skip
    # 1 process: 20 steps per epoch; after one epoch the schedule is at step 20 of 2 x 20
    assert new.world_size == 1 and sched.last_epoch == 20
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * optim.lr_factor(20, 40, cfg))


def _proc_or_none(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_resume_on_one(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    common = ["train.epochs=2", "train.checkpoint_every_steps=1", "train.keep_checkpoints=20", "logging.plots=false",
              "optim.warmup_steps=0", *data_overrides(tiny_dataset)]  # fmt: skip
    args = ["--config", str(TINY), f"output_dir={run}", *common]
    proc = subprocess.Popen(launch_cmd("train.py", args, nproc=2), env=tool_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    # 16 images, batch 2 per process, 2 processes: 4 steps per epoch; kill once the mid-epoch state
    # of step 3 is written, and resume from it by its path (train.keep_checkpoints=20 keeps it),
    # so the kill need not land within the two steps before the end of the epoch
    state = run / checkpoint.STATE_DIR / "step_00000003"
    while time.time() < deadline and proc.poll() is None and not (state / checkpoint.COMPLETE).is_file():
        time.sleep(0.02)
    # torchrun starts the workers in sessions of their own: kill the launcher and each of them
    import psutil

    family = (
        [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))] if proc.poll() is None else []
    )
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in map(_proc_or_none, family) if p], timeout=30)
    logged_before = len(read_jsonl(run / "metrics.jsonl"))
    assert state in checkpoint.list_states(run), "no state at step 3"

    res = launch("train.py", [*args, f"train.resume={state}"], nproc=1)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    used = Path(re.search(r"resumed from (\S+):", res.stdout).group(1))
    assert used == state, res.stdout[-2000:]
    meta = json.loads((used / checkpoint.COMPLETE).read_text())
    assert meta["epoch"] == 0 and 0 < meta["batch"] < 4 and meta["world_size"] == 2, meta
    consumed = meta["batch"] * 2  # global batches of epoch 1 already trained
    assert f"continuing epoch 1 after {consumed} global batches" in res.stdout
    after = [r for r in read_jsonl(run / "metrics.jsonl")[logged_before:] if r["kind"] == "step"]
    # the rest of epoch 1 on one process: the 8 global batches minus those already trained
    assert sum(r["epoch"] == 0 for r in after) == 8 - consumed
    assert sum(r["epoch"] == 1 for r in after) == 8
    assert after[0]["step"] == meta["step"] + 1
    # the lr of the new global batch (2 instead of 4: half the peak), at the same point of the run
    cfg = config.load(TINY, ["optim.warmup_steps=0", *data_overrides(tiny_dataset)])
    peak = optim.scaled_lr(cfg.optim, 2)
    first = after[0]
    sched_step = consumed + 1  # 1 process: one optimizer step per global batch, then one more taken
    assert first["lr"] == pytest.approx(peak * optim.lr_factor(sched_step, 16, cfg.optim), rel=1e-6)


# -- 5: evaluate checks image sizes against the json -------------------------------------------------------


@pytest.mark.slow
def test_evaluate_checkpoint_refuses_resized_images(trained_run, tiny_dataset, tmp_path, capsys):
    import shutil

    images = tmp_path / "val"
    shutil.copytree(tiny_dataset["root"] / "val", images)
    first = json.loads(Path(tiny_dataset["val"]).read_text())["images"][0]["file_name"]
    with Image.open(images / first) as im:
        im.resize((im.width // 2, im.height // 2)).save(images / first)  # resized after labelling
    capsys.readouterr()
    code = run_tool_in_process("evaluate.py", "--checkpoint", trained_run / "best.pt", "--annotations",
                               tiny_dataset["val"], "--images", images, "--num-workers", "0")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]  # the tool's own exit code (accelerate launch reported it as 1)
    assert first in err and "differs from the json" in err


# -- 7: the scored model is the saved model; 11: mixed precision from the launcher; 14: plain progress -------


@pytest.mark.slow
def test_two_process_validation_scores_the_saved_model(two_process_run, tiny_dataset, tmp_path):
    """Trainable BatchNorm on 2 processes: the val loss logged in training equals evaluate.py's on
    last.pt (1 process), so validation scored the model that was saved. (The 1-epoch run with
    eval.batch_size=2 shared with test_train and test_storage.)"""
    run = two_process_run["run"]
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    code = run_tool_in_process("evaluate.py", "--checkpoint", run / "last.pt", "--annotations", tiny_dataset["val"],
                               "--images", tiny_dataset["root"] / "val", "--batch-size", "2",
                               "--num-workers", "0", "--output", tmp_path / "m.json", threads=1)  # fmt: skip
    assert code == 0
    scored = json.loads((tmp_path / "m.json").read_text())
    assert torch.load(run / "last.pt", weights_only=True)["model"]["backbone.body.bn1.running_mean"].abs().sum() > 0
    assert scored["loss"] == pytest.approx(logged["val/loss"], abs=1e-9)
    for part in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert scored[part] == pytest.approx(logged[f"val/{part}"], abs=1e-9), part


@pytest.mark.slow
def test_launcher_precision_and_plain_progress_off_a_terminal(tiny_dataset, tmp_path):
    """No train.mixed_precision in the run config: the launcher's bf16 is used. stderr is a pipe:
    plain progress lines, no carriage-return frames. The warmup resolved is printed."""
    run = tmp_path / "run"
    res = run_cmd(
        [sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(TINY), f"output_dir={run}",
         "train.epochs=1", "logging.plots=false", "logging.progress=true", "logging.progress_interval_s=0",
         "optim.warmup_steps=null", *data_overrides(tiny_dataset)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=tool_env({"ACCELERATE_MIXED_PRECISION": "bf16"}),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mixed precision bf16" in res.stdout
    assert "\r" not in res.stderr
    assert "epoch 1/1: 8/8 (100%)" in res.stderr and "evaluate: 4/4 (100%)" in res.stderr
    assert "8 optimizer steps over 1 epochs, 0 of them warmup" in res.stdout  # 5% of 8 steps rounds to 0


def test_mixed_precision_has_one_source_of_truth():
    assert runtime.resolve_mixed_precision(None, "bf16") == "bf16"
    assert runtime.resolve_mixed_precision(None, None) == "no"
    assert runtime.resolve_mixed_precision("bf16", "no") == "bf16"
    assert runtime.resolve_mixed_precision("bf16", "bf16") == "bf16"
    with pytest.raises(config.ConfigError, match="launcher asks for fp16"):
        runtime.resolve_mixed_precision("bf16", "fp16")
    for name in ("frcnn.yaml", "demo.yaml"):  # the shipped configs defer to the launcher
        assert config.load(ROOT / "configs" / name, ["data.train.annotations=a", "data.train.images=b",
                                                     "data.val.annotations=c", "data.val.images=d"]
                           ).train.mixed_precision is None  # fmt: skip


def test_plain_progress_prints_lines_at_an_interval(capsys):
    bar = progress.PlainProgress(total=4, desc="epoch 1/2", interval=3600)
    bar.set_postfix(loss="0.5")
    for _ in range(4):
        bar.update(1)
    assert capsys.readouterr().err == ""  # nothing before the interval
    bar.close()
    err = capsys.readouterr().err
    assert err.startswith("epoch 1/2: 4/4 (100%)") and "loss=0.5" in err and "\r" not in err


# -- 8: validation leaves the CUDA generators alone -------------------------------------------------------------


def test_validation_does_not_reseed_cuda(tiny_dataset, monkeypatch, cpu_accelerator):
    from detector.data.loader import EvalBatchSampler, build_loader
    from detector.models.build import build_model

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("one", seed)))
    cfg = config.load(TINY, data_overrides(tiny_dataset))
    index = CocoIndex(tiny_dataset["val"])
    model = build_model(cfg.model, index.label_map.num_classes)
    ds = CocoDetection(index, tiny_dataset["root"] / "val")
    sampler = EvalBatchSampler(index.aspect_ratios()[:4], 2)
    acc = cpu_accelerator
    state = torch.get_rng_state()
    metrics, _, _ = engine.evaluate(model, build_loader(ds, sampler, 0), sampler.batch_ids(), acc, index.label_map,
                                    index.to_coco_gt(), seed=3)  # fmt: skip
    assert calls == []  # torch.manual_seed would have reseeded every CUDA device
    assert torch.equal(state, torch.get_rng_state())  # the CPU stream is restored too
    assert metrics["val/images"] == 4


# -- 9: reduced-scale decoding: the exact scale, and predictions clipped to the image -----------------------


def test_draft_scale_is_libjpegs_and_predictions_are_clipped(tmp_path):
    from detector.core.images import load_image

    path = _image(tmp_path / "odd.jpg", (1001, 751))
    arr, sx, sy = load_image(path, (300, 226))
    assert arr.shape[:2] == (376, 501)  # ceil(751 / 2) x ceil(1001 / 2): the last block is partial
    assert (sx, sy) == (0.5, 0.5)  # the content scale is exactly 1/2, not 501/1001
    from detector.core.labels import LabelMap

    det = {"boxes": torch.tensor([[400.0, 300.0, 501.0, 376.0]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.9])}  # fmt: skip
    rows = detections_to_coco([det], [{"image_id": 5, "scale": (sx, sy), "size": (1001, 751)}],
                              LabelMap((4,), ("x",)))  # fmt: skip
    assert rows[0]["bbox"] == [800.0, 600.0, 201.0, 151.0]  # 1002 x 752 clipped to the 1001 x 751 image


# -- 10: best_metric names and modes -------------------------------------------------------------------------------


def test_best_mode_follows_the_metric_and_names_are_checked():
    assert config.best_mode(config.EvalConfig(best_metric="val/loss")) == "min"
    assert config.best_mode(config.EvalConfig(best_metric="val/loss_classifier")) == "min"
    assert config.best_mode(config.EvalConfig(best_metric="val/mAP50")) == "max"
    assert config.best_mode(config.EvalConfig(best_metric="val/loss", best_mode="max")) == "max"
    config.check_metric_name("val/AP/cat", ["cat", "dog"])
    with pytest.raises(config.ConfigError, match="did you mean 'val/AP/dog'"):
        config.check_metric_name("val/AP/dgo", ["cat", "dog"])


def test_summary_does_not_promise_a_best_pt_that_was_never_written(tmp_path):
    cfg = config.load(TINY, ["data.synthetic.enabled=true"])
    rows = dict(runtime.summary_rows({"epoch": 2}, RunState(world_size=1, batch_size=4, grad_accum_steps=1), cfg,
                                     tmp_path))  # fmt: skip
    assert rows["best weights"].startswith("none written")


# -- 12: a process whose whole batch failed to decode -------------------------------------------------------------


@pytest.mark.slow
def test_all_undecodable_batch_on_one_process_does_not_break_the_step(tiny_dataset, tmp_path):
    """2 processes, batch 1: three training images and one validation image fail to decode in the
    workers and two boxes are too small to survive augmentation; the epoch's counts are the run's
    totals (each process counts its own batches), not the main process's."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset["root"], root)
    data = json.loads((root / "train.json").read_text())
    broken = [(root / "train" / im["file_name"]) for im in data["images"][:3]]
    broken.append(root / "val" / json.loads((root / "val.json").read_text())["images"][0]["file_name"])
    for path in broken:  # readable headers, truncated data: they fail in the workers
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) * 6 // 10])
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for k, im in enumerate(data["images"][5:7]):  # 0.4 px boxes: dropped after decoding (counted)
        data["annotations"].append({"id": next_id + k, "image_id": im["id"], "category_id": data["categories"][0]["id"],
                                    "bbox": [3, 3, 0.4, 0.4], "area": 0.16, "iscrowd": 0})  # fmt: skip
    (root / "train.json").write_text(json.dumps(data))
    ds = {"root": root, "train": root / "train.json", "val": root / "val.json"}
    res = launch("train.py", ["--config", TINY, f"output_dir={tmp_path / 'run'}", "train.epochs=1",
                              "train.batch_size=1", "data.on_corrupt_image=skip", "logging.plots=false",
                              *data_overrides(ds)], nproc=2, timeout=600, warm=True)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    epoch = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    # 16 images in 16 batches of 1, 8 per process (no padding): every image once
    assert epoch["train/skipped_images"] == 3 and epoch["train/images"] == 16 - 3, epoch
    assert epoch["train/dropped_boxes"] == 2, epoch
    assert epoch["val/skipped_images"] == 1 and epoch["val/images"] == 7 - 1, epoch
    assert np.isfinite(epoch["train/loss"])


# -- 13: EXIF: the json's size is the stored size before the rotation ------------------------------------------


def test_label_studio_stored_size_with_rotated_boxes(tmp_path):
    _image(tmp_path / "img" / "r.jpg", (40, 20), exif_orientation=6)  # displayed 20 wide, 40 high
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 25, 10, 10], "area": 100, "iscrowd": 0}
    path = write_coco(tmp_path / "ann.json", [{"id": 1, "file_name": "r.jpg", "width": 40, "height": 20}], [ann],
                      CATS)  # fmt: skip
    idx = CocoIndex(path, images_root=tmp_path / "img", on_invalid="error")
    assert (int(idx.widths[0]), int(idx.heights[0])) == (20, 40)
    np.testing.assert_allclose(idx.annotations(0)[0], [[2, 25, 12, 35]])  # not clipped to a 40x20 frame
    assert check_files(idx, tmp_path / "img", config.DataConfig()) == []  # no size mismatch
    summary = idx.summary()
    assert "1 image(s) carry an EXIF orientation" in summary and "sizes swapped" in summary
    image, target = CocoDetection(idx, tmp_path / "img")[0]
    assert tuple(image.shape[1:]) == (40, 20)


def test_real_size_mismatch_still_found(tmp_path):
    _image(tmp_path / "img" / "a.jpg", (40, 20))
    path = write_coco(tmp_path / "ann.json", [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 40}], [], CATS)
    idx = CocoIndex(path, images_root=tmp_path / "img")
    with pytest.raises(DatasetError, match="differs from the json's 20x40"):
        check_files(idx, tmp_path / "img", config.DataConfig())


# -- 15: W&B charts against our step, which a resume continues ------------------------------------------------


def test_wandb_logs_against_global_step_without_wandb_steps(tmp_path):
    from detector.runs.tracking import STEP_KEY, RunLogger

    calls = []

    class FakeRun:
        def log(self, data, step=None, **kw):
            calls.append((data, step))

    logger = RunLogger(tmp_path, enabled=True)
    logger.wandb_run = FakeRun()
    logger.log({"train/loss": 1.0}, "step", 40)
    logger.log({"train/loss": 0.9}, "step", 31)  # after a resume from step 30: replayed, not dropped
    assert [c[1] for c in calls] == [None, None]  # W&B's own step is left to grow
    assert [c[0][STEP_KEY] for c in calls] == [40, 31]


# -- 16: warmup scales with the run ----------------------------------------------------------------------------------


def test_warmup_is_a_fraction_of_short_runs():
    cfg = config.load(ROOT / "configs" / "frcnn.yaml", ["data.train.annotations=a", "data.train.images=b",
                                                         "data.val.annotations=c", "data.val.images=d"])  # fmt: skip
    # 50 images, batch 4: 13 steps per epoch x 24 epochs
    assert optim.warmup_steps(cfg.optim, 13 * 24) == 16
    assert optim.warmup_steps(cfg.optim, 90_000) == 1000  # capped on long runs
    assert optim.warmup_steps(config.OptimConfig(warmup_steps=50), 312) == 50  # an explicit count stays
    factors = [optim.lr_factor(s, 312, cfg.optim) for s in range(40)]
    assert factors[16] == pytest.approx(1.0, abs=1e-3) and factors[0] < 0.01


def test_phone_mpo_jpeg_orientation_agrees_on_every_path(tmp_path):
    """Phones write multi-picture JPEGs (PIL: format MPO): the header check, the full-size decode
    and the reduced-scale decode must all apply (or all ignore) the same EXIF orientation."""
    from detector.core.images import header_info, load_image

    im = Image.new("RGB", (100, 60), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "p.jpg", format="MPO", exif=exif, save_all=True, append_images=[im])
    w, h, orientation = header_info(tmp_path / "p.jpg")
    assert (w, h, orientation) == (60, 100, 6)
    assert load_image(tmp_path / "p.jpg")[0].shape[:2] == (h, w)
    small = load_image(tmp_path / "p.jpg", (30, 50))[0]
    assert small.shape[1] / small.shape[0] == pytest.approx(w / h)


def test_stored_size_with_boxes_on_the_stored_image_is_refused(tmp_path):
    """The size swap is a guess: boxes drawn on the unrotated image do not fit the rotated one."""
    _image(tmp_path / "img" / "r.jpg", (40, 20), exif_orientation=6)  # displayed 20 wide, 40 high
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [25, 2, 10, 10], "area": 100, "iscrowd": 0}
    path = write_coco(tmp_path / "ann.json", [{"id": 1, "file_name": "r.jpg", "width": 40, "height": 20}], [ann],
                      CATS)  # fmt: skip
    with pytest.raises(DatasetError, match="do not fit the rotated image") as err:
        CocoIndex(path, images_root=tmp_path / "img")  # entirely outside the rotated frame
    ann["bbox"] = [15, 2, 10, 10]  # partly outside: clipping would hide it
    path.write_text(json.dumps({**json.loads(path.read_text()), "annotations": [ann]}))
    with pytest.raises(DatasetError, match="do not fit the rotated image") as err:
        CocoIndex(path, images_root=tmp_path / "img")
    assert "r.jpg" in str(err.value)


@pytest.mark.parametrize(
    "ann, key",
    [
        ({"iscrowd": 2}, "annotations with a malformed iscrowd dropped"),
        ({"bbox": [True, 1, 20, 20]}, "annotations with a malformed bbox dropped"),
    ],
)
def test_fast_and_item_by_item_parsers_agree(tmp_path, ann, key):
    """The vectorised parser hands anything unusual to the item-by-item one: both say the same."""
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}]
    good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400}
    path = write_coco(tmp_path / "a.json", images, [{**good, **ann}], CATS)
    with pytest.raises(DatasetError):
        CocoIndex(path)
    assert CocoIndex(path, on_invalid="repair").repairs[key] == 1
    # overhang counts: one within 1 px, one beyond, counted apart by both parsers
    anns = [{**good, "bbox": [99.5, 10, 1, 5]}, {**good, "id": 2, "bbox": [95, 10, 10, 5]}]
    fast = CocoIndex(write_coco(tmp_path / "b.json", images, anns, CATS)).repairs
    slow = CocoIndex(write_coco(tmp_path / "c.json", images, [*anns, {"id": 3, "image_id": 1, "category_id": 1,
                                                                       "bbox": "x"}], CATS), on_invalid="repair").repairs  # fmt: skip
    del slow["annotations with a malformed bbox dropped"]
    assert fast == slow and sum(fast.values()) == 2
