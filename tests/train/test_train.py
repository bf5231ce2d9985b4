"""End-to-end runs through `accelerate launch` on CPU: run directory, 1 vs 2 processes, shards."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image

from detector.evaluation.cocoeval import STAT_NAMES
from tests.conftest import (
    ROOT,
    TINY,
    data_overrides,
    epoch_records,
    launch,
    launch_cmd,
    read_jsonl,
    run_cmd,
    run_tool_in_process,
    tool_env,
)

pytestmark = pytest.mark.slow


def test_run_directory(trained_run):
    for name in ("config.yaml", "metrics.jsonl", "results.csv", "best.pt", "last.pt"):
        assert (trained_run / name).is_file(), name
    records = read_jsonl(trained_run / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6]
    for key in ("val/mAP", "val/mAP50", "val/mAP75", "val/AR100", "val/loss", "train/loss", "lr"):
        assert key in epochs[-1], key
    assert any(r["kind"] == "step" and "train/loss_classifier" in r for r in records)
    with open(trained_run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6] and "val/mAP50" in rows[0]
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    assert ckpt["label_map"] == {"category_ids": [3, 7, 12], "names": ["circle", "square", "triangle"]}
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["model_config"]["name"] == "fasterrcnn_resnet18_fpn"
    assert ckpt["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4  # 3 classes + background
    assert {"torch", "torchvision"} <= set(ckpt["versions"])
    for png in ("loss.png", "map.png", "pr_curves.png", "per_class_ap.png", "val_predictions.png"):
        path = trained_run / "plots" / png
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
            assert len(set(im.convert("L").getdata())) > 10  # not a blank canvas
    for png in ("loss.png", "map.png"):  # drawn after the last epoch's metrics were logged: its point is on them
        assert (trained_run / "plots" / png).stat().st_mtime >= epochs[-1]["time"], png


def _evaluate(ckpt, ds, nproc, out, batch_size):
    args = [
        "--checkpoint", str(ckpt), "--annotations", str(ds["val"]), "--images", str(ds["root"] / "val"),
        "--batch-size", str(batch_size), "--score-threshold", "0.001", "--num-workers", "0", "--output", str(out),
    ]  # fmt: skip
    if nproc == 1:  # in this process, on one thread like a launched process: no launcher needed
        assert run_tool_in_process("evaluate.py", *args, threads=1) == 0
    else:
        res = launch("evaluate.py", args, nproc=nproc, warm=True)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_one_and_two_processes_evaluate_identically(trained_run, tiny_dataset, tmp_path):
    # 7 val images with batch 2 on 2 processes: 4 batches, the last one short; no padding counted.
    one = _evaluate(trained_run / "best.pt", tiny_dataset, 1, tmp_path / "one.json", 2)
    two = _evaluate(trained_run / "best.pt", tiny_dataset, 2, tmp_path / "two.json", 2)
    stats = list(STAT_NAMES)
    assert set(stats) <= set(one)
    assert one["images"] == two["images"] == 7
    assert one["AR100"] > 0 and one["mAP50"] > 0  # objects were found: the comparison is not of zeros
    for key in stats + ["loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]:
        assert one[key] == pytest.approx(two[key], abs=1e-9), key


def test_two_process_shards_disjoint_and_complete(tiny_dataset, tmp_path):
    out = tmp_path / "shards.json"
    res = launch("../tests/scripts/shards.py", [str(tiny_dataset["train"]), str(out)], nproc=2, warm=True)
    assert res.returncode == 0, res.stderr[-3000:]
    shards = json.loads(out.read_text())
    first, second = shards["epoch0"]
    assert len(first) == len(second)  # the same number of steps on both processes
    a, b = ({i for batch in s for i in batch} for s in (first, second))
    assert a | b == set(range(shards["num_images"]))  # complete
    images = sum(len(batch) for s in (first, second) for batch in s)
    assert images == shards["num_images"] + shards["padded"]  # nothing seen twice but the padding
    assert len(a & b) <= shards["padded"]  # disjoint, but for the batches repeated to pad
    assert shards["epoch0"] != shards["epoch1"]  # reshuffled per epoch


def test_two_process_training_run(two_process_run):
    out = two_process_run["run"]  # 1 epoch on 2 processes (shared with test_edges and test_storage)
    rec = epoch_records(out)
    assert rec[-1]["val/images"] == 7
    assert "global batch 4" in two_process_run["stdout"]  # 2 processes x batch 2
    for png in ("loss.png", "map.png"):  # a 1-epoch run has its curves (of one point)
        assert (out / "plots" / png).is_file(), png
    torch.load(out / "best.pt", weights_only=True)


def test_bad_config_is_one_clear_line(tmp_path):
    # as the README launches: `accelerate launch -q` shows the tool's error without the launcher's
    # CalledProcessError traceback, which repeats the message (25 lines for one)
    cmd = launch_cmd("train.py", ["--config", str(TINY), "train.epoch=3"])
    cmd.insert(cmd.index("accelerate.commands.launch") + 1, "-q")
    res = run_cmd(cmd, timeout=600, env=tool_env(), cwd=ROOT, warm=False)  # the launcher's own output
    assert res.returncode != 0
    line = "error: override 'train.epoch=3': unknown config key 'train.epoch' (did you mean 'train.epochs'?)"
    assert res.stderr.count("train.epoch=3") == 1 and line in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "CalledProcessError" not in res.stderr, res.stderr


def test_missing_images_listed_before_training(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(tiny_dataset["root"] / "train", root)
    for name in ("train_00003.jpg", "train_00011.jpg"):
        (root / name).unlink()
    args = [
        "--config",
        str(TINY),
        f"output_dir={tmp_path / 'r'}",
        *data_overrides(tiny_dataset),
        f"data.train.images={root}",
    ]
    res = launch("train.py", args)
    assert res.returncode != 0
    assert "2 of 16 image files are missing" in res.stderr
    assert "train_00003.jpg" in res.stderr and "train_00011.jpg" in res.stderr


def test_demo_config_smoke(tmp_path):
    """The demo config itself (generation on first use included), cut down to a few steps."""
    res = launch(
        "train.py",
        [
            "--config", str(ROOT / "configs" / "demo.yaml"), f"output_dir={tmp_path / 'demo'}",
            f"data.synthetic.root={tmp_path / 'data'}", "data.synthetic.num_train=8", "data.synthetic.num_val=4",
            "train.epochs=1", "logging.plots=false", "data.num_workers=0",
        ],
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "data" / "train.json").is_file()
    assert (tmp_path / "demo" / "best.pt").is_file()


def test_bf16_training_on_cpu(tiny_dataset, tmp_path):
    out = tmp_path / "bf16"
    res = launch("train.py", ["--config", str(TINY), f"output_dir={out}", "train.epochs=1", "train.mixed_precision=bf16",
                              "train.grad_accum_steps=2", "train.clip_grad_norm=5.0", *data_overrides(tiny_dataset)])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mixed precision bf16" in res.stdout
    epoch = epoch_records(out)[-1]
    assert math.isfinite(epoch["train/loss"]) and math.isfinite(epoch["val/loss"])  # neither NaN nor inf
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())  # weights stay float32
