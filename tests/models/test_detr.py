"""D-FINE and RT-DETRv2 from transformers behind the Family seam: our input policy, targets and
post-processing against the models' own image processor, one forward for loss and detections,
weights from a planted hub cache or a save_pretrained folder, the offline message, training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from detector.config import ModelConfig
from detector.core.errors import WeightsError
from detector.models import detr
from detector.models.build import build_model, load_model, model_input_size
from detector.models.zoo import family_of, loss_and_detections
from detector.train import checkpoint
from tests.conftest import ROOT, data_overrides, killed_mid_run_then_resumed, launch, run_tool_in_process, tool_env

TINY = ModelConfig(name="dfine_tiny", weights=None, image_size=128)


def _model(num_classes: int = 3, **kw) -> detr.DetrDetector:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY.__dict__, **kw}), num_classes)


def test_targets_become_class_labels_from_0_and_normalised_centre_boxes():
    targets = [
        {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [0.0, 0.0, 200.0, 100.0]]), "labels": torch.tensor([2, 1])}
    ]
    out = detr.to_hf_targets(targets, [(100, 200)])  # an image 100 high, 200 wide
    assert out[0]["class_labels"].tolist() == [1, 0]
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]]))


def test_postprocess_takes_the_top_query_class_pairs_in_the_images_pixels():
    logits = torch.tensor([[[2.0, -3.0], [-1.0, 1.0], [-4.0, -5.0]]])  # 3 queries, 2 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]])
    (out,) = detr.postprocess(logits, boxes, [(100, 200)], score_thresh=0.5, top_k=3)
    assert out["labels"].tolist() == [1, 2]  # query 0 class 0 (0.88), query 1 class 1 (0.73); the rest < 0.5
    torch.testing.assert_close(out["scores"], torch.sigmoid(torch.tensor([2.0, 1.0])))
    torch.testing.assert_close(out["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]]))
    (two,) = detr.postprocess(logits, boxes, [(100, 200)], score_thresh=0.0, top_k=2)
    assert two["labels"].tolist() == [1, 2]  # the cap


def test_preprocessing_and_postprocessing_match_the_models_own_image_processor():
    """Our decode path + SquareResize against RTDetrImageProcessor (the processor of both model
    families on the hub) on the same RGB arrays, and our post-processing against its
    post_process_object_detection on the same outputs."""
    processor = transformers.RTDetrImageProcessor(size={"height": 96, "width": 96})
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((120, 200), (75, 60), (96, 96))]
    theirs = processor(images=arrays, return_tensors="pt")["pixel_values"]
    ours = detr.SquareResize(96)([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1.5 / 255  # the processor rounds its resized image to uint8

    logits, boxes = torch.randn(3, 20, 4), torch.rand(3, 20, 4) * 0.5 + 0.25
    sizes = [(a.shape[0], a.shape[1]) for a in arrays]
    outputs = transformers.models.rt_detr.modeling_rt_detr.RTDetrObjectDetectionOutput(logits=logits, pred_boxes=boxes)
    want = processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=sizes)
    got = detr.postprocess(logits, boxes, sizes, score_thresh=0.3, top_k=20)
    for g, w in zip(got, want):
        torch.testing.assert_close(g["scores"], w["scores"])
        assert torch.equal(g["labels"], w["labels"] + 1)
        torch.testing.assert_close(g["boxes"], w["boxes"])


def test_loss_parts_sum_to_the_models_loss():
    model = _model().train()
    images = [torch.rand(3, 70, 90), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 64.0, 64.0]]), "labels": torch.tensor([3, 2])}]  # fmt: skip
    torch.manual_seed(1)
    out, _ = model.run(images, targets)
    parts = detr.loss_parts(out.loss_dict)
    assert {"loss_vfl", "loss_bbox", "loss_giou"} <= set(parts) and all(k.startswith("loss_") for k in parts)
    torch.testing.assert_close(sum(parts.values()), out.loss)
    assert all(torch.isfinite(v) for v in parts.values())


def test_one_eval_pass_gives_the_loss_and_the_detections_of_the_model():
    model = _model().eval()
    images = [torch.rand(3, 70, 90), torch.rand(3, 50, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # fmt: skip
    with torch.no_grad():
        losses, dets = loss_and_detections(model, images, targets)
        plain = model(images)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    for d, p in zip(dets, plain):
        assert set(d) == {"boxes", "scores", "labels"}
        assert torch.equal(d["boxes"], p["boxes"]) and torch.equal(d["labels"], p["labels"])
        assert d["labels"].min() >= 1 and d["labels"].max() <= 3
    assert model_input_size(model) == (128, 1 << 30)  # a fixed square: decode at least that large
    assert family_of("dfine_tiny") is detr.FAMILY


def test_bf16_autocast_on_cpu_gives_float32_boxes():
    model = _model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (out,) = model([torch.rand(3, 64, 64)])
    assert out["boxes"].dtype == torch.float32 and torch.isfinite(out["boxes"]).all()


def test_config_keys_of_other_families_are_refused():
    with pytest.raises(WeightsError, match="min_size does not apply to dfine_tiny"):
        build_model(ModelConfig(name="dfine_tiny", weights=None, min_size=64), 3)
    with pytest.raises(WeightsError, match="multiple of 32"):
        build_model(ModelConfig(name="dfine_tiny", weights=None, image_size=100), 3)
    with pytest.raises(WeightsError, match="20 positions at strides \\[16, 32\\], fewer than the 50 queries"):
        build_model(ModelConfig(name="dfine_tiny", weights=None, image_size=64), 3)
    with pytest.raises(WeightsError, match="no pretrained weights"):
        build_model(ModelConfig(name="dfine_tiny", weights="DEFAULT"), 3)


def test_a_save_pretrained_folder_loads_with_new_classification_layers(tmp_path):
    coco = _model(num_classes=5)
    coco.model.save_pretrained(tmp_path / "ckpt")
    said = []
    model = build_model(
        ModelConfig(name="dfine_tiny", weights=str(tmp_path / "ckpt"), image_size=128), 3, log=said.append
    )
    assert model.num_classes == 3
    assert any("new classification layers for 3 classes" in s for s in said), said
    heads = tuple(m + "." for m in family_of("dfine_tiny").head_modules(model))
    theirs, ours = coco.state_dict(), model.state_dict()
    kept = [k for k in ours if not k.startswith(heads) and ours[k].shape == theirs[k].shape]
    assert len(kept) > 100 and all(torch.equal(ours[k], theirs[k]) for k in kept if "num_batches" not in k)
    assert any(ours[k].shape != theirs[k].shape for k in ours if k.startswith(heads))


def test_rtdetr_v2_from_a_save_pretrained_folder_trains_and_detects(tmp_path):
    """RT-DETRv2 through the same seam: a small one (ResNet-18-like, 32 wide) saved for 80
    classes, loaded as rtdetr_v2_r18 with new classification layers for 3, one training step's
    losses and the one-pass detections."""
    backbone = transformers.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                               layer_type="basic", out_indices=[2, 3, 4])  # fmt: skip
    config = transformers.RTDetrV2Config(
        backbone_config=backbone, num_labels=80, freeze_backbone_batch_norms=False, encoder_in_channels=[32, 64, 128],
        d_model=32, encoder_hidden_dim=32, decoder_in_channels=[32, 32, 32], encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4, decoder_layers=2, num_queries=30, num_denoising=10,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.RTDetrV2ForObjectDetection(config).save_pretrained(tmp_path / "rtdetr")
    said = []
    cfg = ModelConfig(name="rtdetr_v2_r18", weights=str(tmp_path / "rtdetr"), image_size=128)
    model = build_model(cfg, 3, log=said.append)
    assert type(model.model).__name__ == "RTDetrV2ForObjectDetection" and model.num_classes == 3
    assert any("new classification layers for 3 classes" in x for x in said), said
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2])}]
    losses = model.train()([torch.rand(3, 70, 90)], targets)
    assert {"loss_vfl", "loss_bbox", "loss_giou"} == set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        val_losses, dets = loss_and_detections(model, [torch.rand(3, 70, 90)], targets)
    assert set(val_losses) == set(losses) and len(dets[0]["boxes"]) == 30 * 3  # every (query, class) pair above 0


# The hub's models in a process of their own: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE
# when it is imported. A small D-FINE is planted in an empty cache as the hub's dfine_nano.
HUB_CHILD = r"""
import json, sys
from pathlib import Path
import torch
from detector.config import ModelConfig
from detector.core.errors import WeightsError
from detector.models.build import build_model
from detector.models import detr

cache = Path(sys.argv[1])
out = {}
try:
    build_model(ModelConfig(name="dfine_nano", weights="DEFAULT"), 3)
except WeightsError as exc:
    out["offline"] = str(exc)
torch.manual_seed(0)
coco = build_model(ModelConfig(name="dfine_tiny", weights=None, image_size=128), 80)
snapshot = cache / "hub" / "models--ustc-community--dfine-nano-coco" / "snapshots" / "planted"
coco.model.save_pretrained(snapshot)
(snapshot.parent.parent / "refs").mkdir()
(snapshot.parent.parent / "refs" / "main").write_text("planted")
said = []
model = build_model(ModelConfig(name="dfine_nano", weights="DEFAULT", image_size=128), 3, log=said.append)
theirs, ours = coco.model.state_dict(), model.model.state_dict()
out["said"] = said
out["num_classes"] = model.num_classes
out["same_backbone"] = all(torch.equal(ours[k], theirs[k]) for k in ours if "backbone" in k)
fresh = build_model(ModelConfig(name="dfine_nano", weights=None, image_size=128), 3)
out["null_num_classes"] = fresh.num_classes
# our weights file of a hub model records its architecture: rebuilt with the cache gone
import shutil
from detector.config import Config, to_dict
from detector.core.labels import LabelMap
from detector.models import weights
from detector.models.build import load_model
config = to_dict(Config(model=ModelConfig(name="dfine_nano", weights="DEFAULT", image_size=128)))
labels = LabelMap((1, 2, 3), ("a", "b", "c"))
weights.save(weights.payload(model, config, labels.to_dict(), {}, 1, 1), cache / "best.pt")
shutil.rmtree(cache / "hub")
again, _, _ = load_model(cache / "best.pt")
image = [torch.rand(3, 90, 120)]
model.eval()
with torch.no_grad():
    a, b = model(image)[0], again(image)[0]
out["rebuilt_equal"] = torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
print(json.dumps(out))
"""


@pytest.mark.slow  # a python process of its own that trains or builds several models
def test_hub_weights_offline_say_what_to_do_and_load_from_a_planted_cache(tmp_path):
    env = tool_env({"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    res = subprocess.run([sys.executable, "-c", HUB_CHILD, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    offline = out["offline"]
    assert "ustc-community/dfine-nano-coco" in offline and "HF_HOME" in offline and "model.name=dfine_tiny" in offline
    assert "\n  Fix one of" in offline and "Traceback" not in offline
    assert out["num_classes"] == 3 and out["same_backbone"]
    assert any("new classification layers for 3 classes" in s for s in out["said"]), out["said"]
    assert out["null_num_classes"] == 3  # null: the hub's architecture (from the cache), random weights
    assert out["rebuilt_equal"]  # our best.pt of a hub model is rebuilt offline, from what it records


# dfine_tiny runs: 2 epochs of 8 steps (16 images, batch 2), weight EMA, a state every 3 steps
DFINE_ARGS = ["--config", str(ROOT / "tests" / "configs" / "tiny_dfine.yaml"), "train.ema=true",
              "train.checkpoint_every_steps=3", "train.keep_checkpoints=10", "model.box_score_thresh=0.01",
              "logging.plots=false"]  # fmt: skip


@pytest.fixture(scope="module")
def dfine_run(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dfine_run")
    res = launch("train.py", [*DFINE_ARGS, *data_overrides(tiny_dataset), f"output_dir={out}"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (out.parent / f"{out.name}.printed").write_text(res.stdout)
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("detr")
def test_dfine_tiny_trains_and_its_best_pt_is_rebuilt_as_trained(dfine_run):
    records = [json.loads(line) for line in (dfine_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= e["val/mAP50"] <= 1 and np.isfinite(e["val/loss"]) for e in epochs)
    assert {"train/loss_vfl", "train/loss_bbox", "train/loss_giou", "val/loss_vfl"} <= set(epochs[-1])
    printed = (dfine_run.parent / f"{dfine_run.name}.printed").read_text()
    assert "recipe of DETR (D-FINE, RT-DETRv2) (for the keys your config leaves unset): optim.name=adamw" in printed
    assert "train.ema=True," in printed  # the tests' config says false; the run's arguments say true
    model, label_map, data = load_model(dfine_run / "best.pt")  # weights_only=True, rebuilt offline
    assert isinstance(model, detr.DetrDetector) and model.num_classes == label_map.num_classes == 3
    assert data["ema"] is True and "transformers_config" in data["architecture"]
    with torch.no_grad():
        (out,) = model([torch.rand(3, 80, 100)])
    assert set(out) == {"boxes", "scores", "labels"}


@pytest.mark.slow
@pytest.mark.xdist_group("detr")
def test_dfine_evaluates_identically_on_one_and_two_processes(dfine_run, tiny_dataset, tmp_path):
    """7 validation images in batches of 2 over 2 processes: one process has a batch more (and
    one image has no objects): no collective inside the model's loss may wait for the other."""
    stats, rows = {}, {}
    for n in (1, 2):
        args = ["--checkpoint", dfine_run / "best.pt", "--annotations", tiny_dataset["val"], "--images",
                tiny_dataset["root"] / "val", "--batch-size", "2", "--workers", "0", "--output",
                tmp_path / f"{n}.json", "--results", tmp_path / f"{n}_rows.json"]  # fmt: skip
        if n == 1:
            assert run_tool_in_process("evaluate.py", *args, threads=1) == 0
        else:
            res = launch("evaluate.py", args, nproc=2, warm=True)
            assert res.returncode == 0, res.stderr[-3000:]
        stats[n] = json.loads((tmp_path / f"{n}.json").read_text())
        rows[n] = json.loads((tmp_path / f"{n}_rows.json").read_text())
    assert len(rows[1]) > 0 and stats[1]["loss"] > 0
    assert rows[1] == rows[2]
    for k in stats[1]:
        assert stats[1][k] == pytest.approx(stats[2][k], abs=1e-9), k


@pytest.mark.slow
@pytest.mark.xdist_group("detr")
def test_dfine_sigkill_resume_is_exact_with_ema(dfine_run, tiny_dataset, tmp_path):
    """SIGKILL mid-epoch 2, resume: bitwise the weights of the uninterrupted run (EMA's too):
    the denoising queries' random draws and the matcher are restored with the RNGs."""
    # 2 epochs of 8 steps: killed from the first state of epoch 2 (step 9), before the last (16)
    killed_mid_run_then_resumed([*DFINE_ARGS, *data_overrides(tiny_dataset)], tmp_path / "killed", dfine_run, 9, 16)


def test_transformers_stays_out_of_the_torchvision_families():
    code = ("import sys; from detector.models.build import build_model; from detector.config import ModelConfig; "
            "build_model(ModelConfig(name='fasterrcnn_resnet18_fpn', weights=None, min_size=64, max_size=96), 2); "
            "print('transformers' in sys.modules)")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=tool_env())
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(WeightsError, match=r"pip install 'detector\[transformers\]'"):
        build_model(TINY, 3)


def test_the_family_recipe_fills_only_the_keys_a_config_leaves_unset(tmp_path):
    from detector import config
    from detector.models.zoo import recipe, recipe_line

    yaml = tmp_path / "c.yaml"
    yaml.write_text(
        "model: {name: dfine_small}\ntrain: {ema: false}\ndata: {train: {annotations: a.json, images: i}, val: {annotations: v.json, images: i}}\n"
    )
    cfg = config.load(yaml, ["optim.weight_decay=0.05"], recipe)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.reference_batch_size, cfg.optim.backbone_lr_factor) == (
        "adamw",
        1e-4,
        16,
        0.1,
    )
    assert cfg.train.clip_grad_norm == 0.1 and cfg.data.aspect_ratio_grouping is False
    assert cfg.train.ema is False and cfg.optim.weight_decay == 0.05  # the file's and the override's win
    line = recipe_line(cfg)
    assert line.startswith("recipe of DETR") and "optim.backbone_lr_factor=0.1," in line
    assert "train.ema=False (not the recipe's)" in line and "optim.weight_decay=0.05 (not the recipe's)" in line
    # the torchvision families have none: their configs load as before
    demo = ROOT / "configs" / "demo.yaml"
    assert config.load(demo, [], recipe) == config.load(demo, []) and recipe_line(config.load(demo)) is None


def test_the_backbone_trains_at_its_lr_factor_through_warmup_schedule_and_a_resume_on_fewer_processes():
    from detector import config
    from detector.train import optim
    from detector.train.state import RunState

    model = _model()
    cfg = config.load(None, ["model.name=dfine_small", "data.train.annotations=a", "data.train.images=i", "data.val.annotations=v", "data.val.images=i"],
                      detr.FAMILY.recipe).optim  # fmt: skip
    opt = optim.build_optimizer(model, cfg, 1e-4)
    backbone = {id(p) for n, p in model.named_parameters() if ".backbone." in f".{n}"}
    for g in opt.param_groups:
        inside = {id(p) for p in g["params"]} <= backbone
        assert g.get("lr_factor", 1.0) == (0.1 if inside else 1.0) and (
            inside or not {id(p) for p in g["params"]} & backbone
        )
    assert sum(len(g["params"]) for g in opt.param_groups if "lr_factor" in g) == len(backbone) > 0
    sched = optim.build_scheduler(opt, cfg, 100)
    for _ in range(30):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[2] == pytest.approx(0.1 * lrs[0]) and lrs[0] > 0
    # a state of 2 processes resumed on 1: the new global batch's lr, the backbone still at a tenth
    pos = RunState(epoch=1, batch=0, step=30, world_size=2, batch_size=4, grad_accum_steps=1)
    checkpoint.adapt_position(pos, {"world_size": 1, "batch_size": 4, "grad_accum_steps": 1}, 15, 5e-5, opt, sched,
                              log=lambda s: None)  # fmt: skip
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[2] == pytest.approx(0.1 * lrs[0]) and lrs[0] < 5e-5


def test_torchvision_models_keep_their_two_parameter_groups():
    from detector.train import optim

    model = build_model(ModelConfig(name="fasterrcnn_resnet18_fpn", weights=None, min_size=64, max_size=96), 2)
    groups = optim.param_groups(model, 1e-4, 0.0)
    assert len(groups) == 2 and not any("lr_factor" in g for g in groups)


@pytest.mark.slow  # a python process of its own that trains or builds several models
def test_a_batch_without_objects_trains_under_distributed_data_parallel(tmp_path):
    """No objects: no denoising queries, so their class embedding would get no gradient and DDP
    (find_unused_parameters off) would fail at the next step. One gloo process, in a child."""
    code = f"""
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{_port()}")
dist.init_process_group("gloo", rank=0, world_size=1)
from detector.config import ModelConfig
from detector.models.build import build_model
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(build_model(ModelConfig(name="dfine_tiny", weights=None, image_size=128), 3))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
empty = {{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}}
some = {{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1])}}
for targets in ([empty, empty], [some, empty], [empty, empty]):
    loss = sum(model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets).values())
    opt.zero_grad(); loss.backward(); opt.step()
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=tool_env({"PYTHONPATH": str(ROOT)}), timeout=300)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def _port() -> int:
    from tests.conftest import _free_port

    return _free_port()


def test_non_finite_predicted_boxes_give_non_finite_losses_the_loop_skips():
    model = _model().train()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "encoder_input_proj" in n).fill_(float("nan"))
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]
    losses = model([torch.rand(3, 64, 64)], targets)  # HF's GIoU raised on the NaN boxes
    assert set(losses) == {"loss_vfl", "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf"}
    assert not torch.isfinite(sum(losses.values()))


def test_a_folder_is_checked_and_made_ours(tmp_path):
    coco = _model(num_classes=3)
    coco.model.config.anchor_image_size = [128, 128]  # a fixed anchor grid would break another size in eval
    coco.model.save_pretrained(tmp_path / "ckpt")
    said: list[str] = []
    cfg = ModelConfig(name="dfine_tiny", weights=str(tmp_path / "ckpt"), image_size=160, num_queries=30)
    model = build_model(cfg, 3, log=said.append).eval()  # as many classes as the checkpoint: heads re-created
    assert model.model.config.num_queries == 30 and model.model.config.anchor_image_size is None
    with torch.no_grad():
        (out,) = model([torch.rand(3, 100, 120)])
    assert len(out["boxes"]) == 90  # 30 queries x 3 classes
    assert said and "new classification layers for 3 classes" in said[0]
    heads = tuple(m + "." for m in family_of("dfine_tiny").head_modules(model))
    theirs = coco.state_dict()
    assert all(
        not torch.equal(v, theirs[k]) for k, v in model.state_dict().items() if k.startswith(heads) and "weight" in k
    )
    with pytest.raises(WeightsError, match="holds a 'd_fine' model, not the 'rt_detr_v2' of model.name=rtdetr_v2_r18"):
        build_model(ModelConfig(name="rtdetr_v2_r18", weights=str(tmp_path / "ckpt"), image_size=128), 3)
    with pytest.raises(WeightsError, match="hidden_dim shapes dfine_tiny built from scratch"):
        build_model(ModelConfig(name="dfine_tiny", weights=str(tmp_path / "ckpt"), image_size=128, hidden_dim=32), 3)
    with pytest.raises(WeightsError, match="trainable_backbone_layers does not apply"):
        build_model(ModelConfig(name="dfine_tiny", weights=None, image_size=128, trainable_backbone_layers=2), 3)
    with pytest.raises(WeightsError, match="hidden_dim=30: a multiple of 4"):
        build_model(ModelConfig(name="dfine_tiny", weights=None, image_size=128, hidden_dim=30), 3)
    with pytest.raises(WeightsError, match="decoder_layers=1: at least 2"):
        build_model(ModelConfig(name="dfine_tiny", weights=None, image_size=128, decoder_layers=1), 3)


def test_an_lr_given_without_the_recipes_optimizer_and_batch_keeps_its_own_reference(tmp_path):
    from detector import config
    from detector.models.zoo import recipe

    data = ["data.train.annotations=a", "data.train.images=i", "data.val.annotations=v", "data.val.images=i"]
    cfg = config.load(None, ["model.name=dfine_tiny", "optim.name=sgd", "optim.lr=0.02", *data], recipe)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.reference_batch_size) == ("sgd", 0.02, 16)  # the schema's 16
    assert cfg.train.clip_grad_norm == 0.1  # the rest of the recipe still applies


def test_only_the_feature_extractor_is_the_backbone():
    from detector.train.optim import is_backbone

    assert is_backbone("backbone.body.layer1.0") and is_backbone("model.model.backbone.model.embedder")
    assert is_backbone("backbone.features.3")  # SSD's VGG
    assert not is_backbone("backbone.fpn.inner_blocks.0") and not is_backbone("backbone.extra.0")
    assert not is_backbone("roi_heads.box_head") and not is_backbone("model.model.encoder")


@pytest.mark.slow
@pytest.mark.xdist_group("detr")
def test_dfine_through_the_predictor_and_infer(dfine_run, tiny_dataset, tmp_path):
    """The user's tools on a D-FINE best.pt: infer.py writes the dataset's category ids and as
    many detections as the Predictor finds, boxes within the images."""
    from detector.inference.predictor import Predictor

    out = tmp_path / "pred"
    code = run_tool_in_process("infer.py", "--checkpoint", dfine_run / "best.pt", "--score-threshold", "0.05",
                               "--output", out, "--annotations", tiny_dataset["val"], tiny_dataset["root"] / "val")  # fmt: skip
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= {3, 7, 12}  # the dataset's category ids
    files = sorted((tiny_dataset["root"] / "val").glob("*.jpg"))
    p = Predictor.from_checkpoint(dfine_run / "best.pt", device="cpu", score_threshold=0.05, batch_size=4)
    dets = p.predict(files)
    assert sum(len(d.boxes) for d in dets) == len(rows)
    for d, f in zip(dets, files):
        w, h = Image.open(f).size
        boxes = np.asarray(d.boxes).reshape(-1, 4)
        assert (boxes[:, 2:] <= np.array([w, h]) + 1).all() and (boxes[:, :2] >= -1).all()
