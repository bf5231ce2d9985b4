"""FCOS: ResNet50-FPN with COCO weights, and a narrow ResNet-18/34 FPN from scratch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import detection as D
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead

from detector.config import ModelConfig
from detector.core.errors import ConfigError
from detector.models.backbones import stage_strides
from detector.models.dense import (
    KEYS,
    OWN_KEYS,
    SIZE_KEYS,
    cls_logits_module,
    detect_per_level,
    one_pass,
    replace_cls_logits,
    small_fpn,
)
from detector.models.family import Family, set_keys


def _points(sizes_per_level: list[list[int]] | list[int]) -> AnchorGenerator:
    # FCOS has one "anchor" per location, as large as the level's stride: it sets the object
    # sizes each level is responsible for (4x to 8x of it).
    levels = [list(level) if isinstance(level, (list, tuple)) else [level] for level in sizes_per_level]
    if any(len(level) != 1 for level in levels):
        raise ConfigError(f"model.anchor_sizes for FCOS: one size per level (its stride-scale), got {sizes_per_level}")
    return AnchorGenerator(tuple((int(level[0]),) for level in levels), ((1.0,),) * len(levels))


def _resnet_fpn(depth: int) -> Callable[..., D.FCOS]:
    """FCOS on our ResNet-{depth} + FPN (stages 2-4 by default, P6/P7 on top)."""

    def build(*, weights: Any, weights_backbone: Any, num_classes: int, trainable_backbone_layers: int | None,
              returned_layers: list[int] | None = None, fpn_channels: int | None = None, **kw: Any) -> D.FCOS:  # fmt: skip
        backbone, layers, width = small_fpn(f"fcos_resnet{depth}_fpn", weights, weights_backbone,
                                            trainable_backbone_layers, returned_layers, fpn_channels)  # fmt: skip
        anchors = kw.pop("anchor_generator", None) or _points(stage_strides(layers, 2))
        head = FCOSHead(width, anchors.num_anchors_per_location()[0], num_classes)
        return D.FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **kw)

    return build


MODELS = {
    "fcos_resnet50_fpn": (D.fcos_resnet50_fpn, D.FCOS_ResNet50_FPN_Weights),
    "fcos_resnet18_fpn": (_resnet_fpn(18), None),
    "fcos_resnet34_fpn": (_resnet_fpn(34), None),
}
OWN = frozenset({"fcos_resnet18_fpn", "fcos_resnet34_fpn"})


def build(cfg: ModelConfig, weights: Any, weights_backbone: Any, num_classes: int) -> nn.Module:
    kw = set_keys(cfg, {**KEYS, **SIZE_KEYS, **(OWN_KEYS if cfg.name in OWN else {})})
    if cfg.anchor_sizes is not None:
        kw["anchor_generator"] = _points(cfg.anchor_sizes)
    builder, _ = MODELS[cfg.name]
    return builder(weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                   trainable_backbone_layers=cfg.trainable_backbone_layers, **kw)  # fmt: skip


def _loss(model, targets, head_outputs, anchors, features):
    per_level = [x.size(2) * x.size(3) for x in features]
    return model.compute_loss(targets, head_outputs, anchors, per_level)


def loss_and_detections(model, images, targets, autocast):
    """FCOS's losses and detections with one backbone pass."""
    return one_pass(model, images, targets, autocast, _loss, detect_per_level)


FAMILY = Family(
    name="FCOS",
    model_type=D.FCOS,
    models=MODELS,
    own_models=OWN,
    keys=frozenset(KEYS) | frozenset(SIZE_KEYS) | {"anchor_sizes"},
    own_keys=frozenset(OWN_KEYS),
    build=build,
    head_modules=cls_logits_module,
    replace_head=replace_cls_logits,
    loss_and_detections=loss_and_detections,
)
