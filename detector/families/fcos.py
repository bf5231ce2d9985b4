"""FCOS: ResNet50-FPN with COCO weights, and a narrow ResNet-18/34 FPN from scratch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import detection as D
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detector.config import ConfigError, ModelConfig
from detector.families import Family, float32, loss_key
from detector.families.backbones import resnet_fpn, stage_strides
from detector.families.retinanet import replace_head, split_levels


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
        if weights is not None:
            raise ValueError(f"fcos_resnet{depth}_fpn has no pretrained detection weights")
        layers = returned_layers or [2, 3, 4]
        width = fpn_channels or 256
        if width % 32 or width < 64:  # the head's GroupNorm(32): >= 2 channels per group on a 1x1 level
            raise ConfigError(
                f"model.fpn_channels for fcos_resnet{depth}_fpn: a multiple of 32, at least 64 (got {width})"
            )
        backbone = resnet_fpn(depth, weights_backbone, trainable_backbone_layers, layers, width,
                              LastLevelP6P7(width, width))  # fmt: skip
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

_RENAMED = {
    "box_score_thresh": "score_thresh",
    "box_nms_thresh": "nms_thresh",
    "box_detections_per_img": "detections_per_img",
    "topk_candidates": "topk_candidates",
    "min_size": "min_size",
    "max_size": "max_size",
}
_OWN_KEYS = {"returned_layers": "returned_layers", "fpn_channels": "fpn_channels"}


def build(cfg: ModelConfig, weights: Any, weights_backbone: Any, num_classes: int) -> nn.Module:
    kw = {arg: getattr(cfg, key) for key, arg in _RENAMED.items() if getattr(cfg, key) is not None}
    if cfg.name in OWN:
        kw.update({arg: getattr(cfg, key) for key, arg in _OWN_KEYS.items() if getattr(cfg, key) is not None})
    if cfg.anchor_sizes is not None:
        kw["anchor_generator"] = _points(cfg.anchor_sizes)
    builder, _ = MODELS[cfg.name]
    return builder(weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                   trainable_backbone_layers=cfg.trainable_backbone_layers, **kw)  # fmt: skip


def head_modules(model: nn.Module) -> list[str]:
    return ["head.classification_head.cls_logits"]


def loss_and_detections(model, images, targets, autocast):
    """FCOS's losses and detections with one backbone pass."""
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    with autocast():
        image_list, targets_t = model.transform(images, targets)
        features = list(model.backbone(image_list.tensors).values())
    with float32(image_list.tensors.device):
        features = [f.float() for f in features]
        image_list.tensors = image_list.tensors.float()
        head_outputs = model.head(features)
        anchors = model.anchor_generator(image_list, features)
        losses = {}
        if targets_t is not None:
            per_level = [x.size(2) * x.size(3) for x in features]
            raw = model.compute_loss(targets_t, head_outputs, anchors, per_level)
            losses = {loss_key(k): v for k, v in raw.items()}
        split, split_anchors = split_levels(head_outputs, anchors, features)
        detections = model.postprocess_detections(split, split_anchors, image_list.image_sizes)
        detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    return losses, detections


FAMILY = Family(
    name="FCOS",
    model_type=D.FCOS,
    models=MODELS,
    own_models=OWN,
    keys=frozenset(_RENAMED) | {"anchor_sizes"},
    own_keys=frozenset(_OWN_KEYS),
    build=build,
    head_modules=head_modules,
    replace_head=replace_head,
    loss_and_detections=loss_and_detections,
)
