"""The model zoo: builders, heads for K classes, weights files, the offline message."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detector.config import ModelConfig
from detector.core.errors import WeightsError
from detector.models.build import build_model
from detector.models.zoo import all_models, family_of


def outputs(model: torch.nn.Module) -> int:
    """The width of a built model's classification layers (K + 1), whatever its family."""
    name = type(model).__name__
    if name == "DetrDetector":  # sigmoid class logits, no background: K, said as K + 1 like the others
        return model.num_classes + 1
    if name in ("FasterRCNN", "MaskRCNN"):
        return model.roi_heads.box_predictor.cls_score.out_features
    if name in ("RetinaNet", "FCOS"):
        head = model.head.classification_head
        assert head.cls_logits.out_channels == head.num_anchors * head.num_classes
        return head.num_classes
    return model.head.classification_head.num_columns


# the models whose architecture is known without a network: the hub's D-FINE and RT-DETRv2 take it
# from the hub (tests/models/test_detr.py plants them in a cache)
OFFLINE = sorted(n for n, f in all_models().items() if f.pretrained is None or n in f.own_models)


@pytest.mark.parametrize("name", OFFLINE)
def test_every_model_builds_with_k_classes(name):
    sizes = {"min_size": 64, "max_size": 96}
    if name.startswith(("ssd", "dfine")):  # fixed squares: SSD its own, D-FINE model.image_size
        sizes = {"image_size": 128} if name.startswith("dfine") else {}
    cfg = ModelConfig(name=name, weights=None, weights_backbone=None, **sizes)
    model = build_model(cfg, num_classes=5)
    assert outputs(model) == 6
    assert family_of(name).model_type is not None and isinstance(model, family_of(name).model_type)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])
    assert set(out[0]) == set(family_of(name).outputs)  # boxes, labels, scores (+ masks: Mask R-CNN)


def test_offline_default_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the download must be tried
    import urllib.request

    def no_network(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cfg = ModelConfig(name="fasterrcnn_mobilenet_v3_large_fpn", weights="DEFAULT")
    with pytest.raises(WeightsError) as err:
        build_model(cfg, num_classes=2)
    text = str(err.value)
    assert "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth" in text
    assert str(tmp_path / "hub" / "checkpoints") in text
    assert "model.weights=null" in text


def test_default_weights_from_cache_replace_the_head(tmp_path, monkeypatch):
    """With the weights file in torch's cache (no network needed), DEFAULT loads it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_320_FPN_Weights as W

    coco = build_model(ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", weights=None), num_classes=90)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(coco.state_dict(), cache / W.DEFAULT.url.rsplit("/", 1)[1])
    model = build_model(ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", weights="DEFAULT"), num_classes=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    key = "backbone.body.0.0.weight"
    assert torch.equal(model.state_dict()[key], coco.state_dict()[key])


def test_unknown_model_and_weights():
    with pytest.raises(WeightsError, match="did you mean 'fasterrcnn_resnet50_fpn'"):
        build_model(ModelConfig(name="fasterrcnn_resnet50_fnp"), 2)
    with pytest.raises(WeightsError, match="not a file and not one of DEFAULT"):
        build_model(ModelConfig(name="fasterrcnn_resnet50_fpn", weights="IMAGENET"), 2)


def _small(name="fasterrcnn_resnet18_fpn", **kw):
    return ModelConfig(name=name, weights=None, weights_backbone=None, min_size=64, max_size=96,
                       returned_layers=[3, 4], fpn_channels=16, representation_size=32, **kw)  # fmt: skip


def test_own_best_pt_with_other_classes_reinitialises_head(tmp_path):
    src = build_model(_small(), 3)
    torch.save({"model": src.state_dict(), "label_map": {"category_ids": [1, 2, 3], "names": ["a", "b", "c"]}},
               tmp_path / "best.pt")  # fmt: skip
    warnings = []
    same = build_model(replace(_small(), weights=str(tmp_path / "best.pt")), 3, ["a", "b", "c"], warnings.append)
    assert not warnings
    assert torch.equal(same.roi_heads.box_predictor.cls_score.weight, src.roi_heads.box_predictor.cls_score.weight)
    other = build_model(replace(_small(), weights=str(tmp_path / "best.pt")), 2, ["x", "y"], warnings.append)
    assert "re-initialised for 2 classes" in warnings[0]
    assert other.roi_heads.box_predictor.cls_score.out_features == 3
    assert torch.equal(other.backbone.body.layer4[0].conv1.weight, src.backbone.body.layer4[0].conv1.weight)


def test_weights_of_another_architecture_refused(tmp_path):
    torch.save(build_model(_small(), 3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="do not fit"):
        build_model(ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", weights=str(tmp_path / "w.pt")), 3)


def test_bf16_boxes_are_float32_and_precise():
    """Pitfall 12: under bf16 autocast, box decoding must stay float32 (bf16 would snap ~600 px
    coordinates to multiples of 4 px)."""
    from detector.models.zoo import loss_and_detections

    torch.manual_seed(0)
    # the boxes are decoded by the R-CNN heads whatever the backbone: MobileNetV3's, 14x faster than
    # ResNet-18's under CPU bf16 at 640x800 (4.8 s against 67 s on the 2-core machine)
    cfg = ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None,
                      min_size=640, max_size=800, box_score_thresh=0.0)  # fmt: skip
    model = build_model(cfg, 2).eval()
    img = torch.rand(3, 640, 800)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        _, dets = loss_and_detections(model, [img], None, autocast)
    boxes = dets[0]["boxes"]
    assert boxes.dtype == torch.float32 and len(boxes) > 10
    far = boxes[boxes > 512]
    assert far.numel() > 0
    # bf16 has 8 bits of mantissa: values in [512, 1024) would all be multiples of 4.
    assert (torch.remainder(far, 4) != 0).float().mean() > 0.5


def test_trainable_backbone_layers_from_scratch_is_one_note_not_torchvisions_warning(recwarn):
    # configs/frcnn.yaml sets trainable_backbone_layers: 3; trained with model.weights=null torchvision warns
    # "Changing trainable_backbone_layers has no effect..." on every run
    said: list[str] = []
    cfg = ModelConfig(name="fasterrcnn_mobilenet_v3_large_fpn", weights=None, trainable_backbone_layers=3)
    model = build_model(cfg, num_classes=2, log=said.append)
    assert not [w for w in recwarn if "trainable_backbone_layers" in str(w.message)]
    assert [s for s in said if "trainable_backbone_layers=3 has no effect" in s]
    assert all(p.requires_grad for p in model.backbone.parameters())  # as torchvision builds it from scratch


def test_trainable_backbone_layers_still_freezes_our_own_scratch_builders():
    said: list[str] = []
    cfg = ModelConfig(name="fasterrcnn_resnet18_fpn", weights=None, trainable_backbone_layers=2)
    model = build_model(cfg, num_classes=2, log=said.append)
    assert not [s for s in said if "no effect" in s]
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer4.parameters())
