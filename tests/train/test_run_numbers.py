"""The numbers a real run records: best.pt holds the best epoch, the evaluate tool reproduces
its val/mAP, and the logged learning rate follows the scaled warmup + cosine schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import epoch_records, run_tool_in_process, step_records, train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("run_numbers"),
]  # every test here needs a training run (built once, on one xdist worker)

STATS = ["mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
         "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large"]  # fmt: skip


def _best(values: list[float], mode: str) -> int:
    """Index of the first strictly best value (a later tie does not replace it)."""
    best = 0
    for i, v in enumerate(values):
        if (v > values[best]) if mode == "max" else (v < values[best]):
            best = i
    return best


# -- the default: best.pt by val/mAP ------------------------------------------------------------------


def test_best_pt_holds_the_epoch_with_the_best_val_map(trained_run):
    epochs = epoch_records(trained_run)
    maps = [r["val/mAP"] for r in epochs]
    assert max(maps) > 0  # objects were found: the choice is not among zeros only
    best = epochs[_best(maps, "max")]
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    assert ckpt["epoch"] == best["epoch"]
    for key, value in best.items():
        if key.startswith("val/"):
            assert ckpt["metrics"][key] == pytest.approx(value, abs=1e-12), key


@pytest.fixture(scope="module")
def evaluated(trained_run, tiny_dataset, tmp_path_factory) -> dict[str, Any]:
    """tools/evaluate.py --checkpoint best.pt on the run's val split, with the run's eval batch size."""
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    out = tmp_path_factory.mktemp("evaluate") / "m.json"
    # in this process, on one thread like the training process (tiny.yaml's train.threads: 1)
    code = run_tool_in_process("evaluate.py", "--checkpoint", trained_run / "best.pt", "--annotations",
                               tiny_dataset["val"], "--images", tiny_dataset["root"] / "val", "--num-workers", "0",
                               "--output", out, "--batch-size", ckpt["config"]["eval"]["batch_size"], threads=1)  # fmt: skip
    assert code == 0
    record = next(r for r in epoch_records(trained_run) if r["epoch"] == ckpt["epoch"])
    return {"metrics": json.loads(out.read_text()), "record": record}


def test_evaluate_tool_reproduces_the_recorded_val_stats(evaluated):
    """Same weights, same images, same batches (the batch composition changes the padding, so the
    eval batch size must be the run's), same score threshold: the same detections, so every COCO
    stat and per-class AP equals what training recorded for that epoch."""
    metrics, record = evaluated["metrics"], evaluated["record"]
    assert record["val/mAP50"] > 0
    assert metrics["images"] == record["val/images"]
    per_class = [k.removeprefix("val/") for k in record if k.startswith("val/AP/")]
    assert len(per_class) == 3
    for key in STATS + per_class:
        assert metrics[key] == pytest.approx(record[f"val/{key}"], abs=1e-9), key


def test_evaluate_tool_reproduces_the_recorded_val_loss(evaluated):
    """The loss samples anchors and proposals at random: the tool must seed that sampling as
    training did (train.seed of the checkpoint's config)."""
    assert evaluated["metrics"]["loss"] == pytest.approx(evaluated["record"]["val/loss"], abs=1e-9)


# -- best.pt by val/loss (min), evaluated every 2 epochs; the lr schedule ----------------------------

LR, REF, BATCH, ACCUM = 0.004, 8, 2, 2  # peak lr = 0.004 * (1 process x 2 x 2) / 8 = 0.002
WARMUP, WARMUP_FACTOR, MIN_RATIO, EPOCHS = 3, 0.1, 0.2, 4


@pytest.fixture(scope="module")
def loss_run(tiny_dataset, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("loss_run")
    stdout = train(
        out, tiny_dataset, f"train.epochs={EPOCHS}", "eval.every_epochs=2", "eval.best_metric=val/loss",
        "eval.best_mode=min", "train.keep_checkpoints=10", f"train.batch_size={BATCH}",
        f"train.grad_accum_steps={ACCUM}", f"optim.lr={LR}", f"optim.reference_batch_size={REF}",
        "optim.schedule=cosine", f"optim.warmup_steps={WARMUP}", f"optim.warmup_factor={WARMUP_FACTOR}",
        f"optim.min_lr_ratio={MIN_RATIO}", "logging.log_every_steps=1", "logging.plots=false",
    )  # fmt: skip
    return {"out": out, "stdout": stdout}


def test_only_evaluated_epochs_have_val_metrics(loss_run):
    epochs = epoch_records(loss_run["out"])
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert [r["epoch"] for r in epochs if any(k.startswith("val/") for k in r)] == [2, 4]


def test_best_pt_holds_the_evaluated_epoch_with_the_lowest_val_loss(loss_run):
    out: Path = loss_run["out"]
    evaluated = [r for r in epoch_records(out) if "val/loss" in r]
    best = evaluated[_best([r["val/loss"] for r in evaluated], "min")]
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["epoch"] == best["epoch"] and ckpt["metrics"]["val/loss"] == pytest.approx(best["val/loss"], abs=1e-12)
    # and its weights are the model at the end of that epoch (the state saved then)
    steps_per_epoch = len(step_records(out)) // EPOCHS
    state = torch.load(out / "checkpoints" / f"step_{best['epoch'] * steps_per_epoch:08d}" / "state.pt",
                       weights_only=True)  # fmt: skip
    assert state["position"]["epoch"] == best["epoch"]
    for k, v in ckpt["model"].items():
        assert torch.equal(v, state["model"][k]), k


def _lr_by_hand(step: int, total: int, peak: float) -> float:
    """The lr in force after `step` optimizer steps: linear warmup from WARMUP_FACTOR x peak over
    WARMUP steps, then a cosine from peak down to MIN_RATIO x peak at the last step."""
    if step < WARMUP:
        return peak * (WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / WARMUP)
    progress = (step - WARMUP) / (total - WARMUP)
    return peak * (MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * progress)) / 2)


def test_logged_lr_is_the_scaled_warmup_cosine_schedule(loss_run, tiny_dataset):
    """metrics.jsonl's step records hold the lr after the record's optimizer step (the lr the next
    step uses): step k shows lr(k), so the last one shows the floor, min_lr_ratio x peak."""
    peak = LR * (1 * BATCH * ACCUM) / REF
    n_images = len(json.loads(tiny_dataset["train"].read_text())["images"])
    total = EPOCHS * math.ceil(math.ceil(n_images / BATCH) / ACCUM)  # 16 images: 8 batches, 4 steps an epoch
    assert f"global batch {BATCH * ACCUM} -> lr {peak:.4g}; {total} optimizer steps" in loss_run["stdout"]
    steps = step_records(loss_run["out"])
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    logged = [r["lr"] for r in steps]
    assert logged == pytest.approx([_lr_by_hand(k, total, peak) for k in range(1, total + 1)], rel=1e-9, abs=0)
    assert logged[WARMUP - 1] == pytest.approx(peak, rel=1e-12)  # warmup ends at the scaled peak
    assert logged[-1] == pytest.approx(MIN_RATIO * peak, rel=1e-12)  # the cosine ends at the floor
    for r in epoch_records(loss_run["out"]):  # an epoch's lr is the one in force at its end
        assert r["lr"] == pytest.approx(_lr_by_hand(r["epoch"] * total // EPOCHS, total, peak), rel=1e-9)
