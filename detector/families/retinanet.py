"""RetinaNet: ResNet50-FPN (v1, v2) with COCO weights, and a narrow ResNet-18/34 FPN from scratch."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models import detection as D
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detector.config import ConfigError, ModelConfig
from detector.families import Family, float32, loss_key
from detector.families.backbones import resnet_fpn, stage_strides


def _anchors(sizes_per_level: list[list[int]] | tuple) -> AnchorGenerator:
    sizes = tuple(tuple(int(s) for s in level) for level in sizes_per_level)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _resnet_fpn(depth: int) -> Callable[..., D.RetinaNet]:
    """RetinaNet on our ResNet-{depth} + FPN (stages 2-4 by default, P6/P7 on top): RetinaNet's
    own anchors (4 strides wide, 3 scales x 3 ratios), a head as wide as the FPN with GroupNorm
    and a GIoU box loss, as torchvision's v2 recipe (both help a model that starts from scratch)."""

    def build(*, weights: Any, weights_backbone: Any, num_classes: int, trainable_backbone_layers: int | None,
              returned_layers: list[int] | None = None, fpn_channels: int | None = None, **kw: Any) -> D.RetinaNet:  # fmt: skip
        if weights is not None:
            raise ValueError(f"retinanet_resnet{depth}_fpn has no pretrained detection weights")
        layers = returned_layers or [2, 3, 4]
        width = fpn_channels or 256
        if width % 32 or width < 64:  # the head's GroupNorm(32): >= 2 channels per group on a 1x1 level
            raise ConfigError(f"model.fpn_channels for retinanet_resnet{depth}_fpn: a multiple of 32, at least 64")
        backbone = resnet_fpn(depth, weights_backbone, trainable_backbone_layers, layers, width,
                              LastLevelP6P7(width, width))  # fmt: skip
        anchors = kw.pop("anchor_generator", None) or _anchors(
            [[4 * s, round(4 * s * 2 ** (1 / 3)), round(4 * s * 2 ** (2 / 3))] for s in stage_strides(layers, 2)]
        )
        head = RetinaNetHead(width, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))  # fmt: skip
        head.regression_head._loss_type = "giou"
        return D.RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **kw)

    return build


MODELS = {
    "retinanet_resnet50_fpn": (D.retinanet_resnet50_fpn, D.RetinaNet_ResNet50_FPN_Weights),
    "retinanet_resnet50_fpn_v2": (D.retinanet_resnet50_fpn_v2, D.RetinaNet_ResNet50_FPN_V2_Weights),
    "retinanet_resnet18_fpn": (_resnet_fpn(18), None),
    "retinanet_resnet34_fpn": (_resnet_fpn(34), None),
}
OWN = frozenset({"retinanet_resnet18_fpn", "retinanet_resnet34_fpn"})

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
            kw["anchor_generator"] = _anchors(cfg.anchor_sizes)
    builder, _ = MODELS[cfg.name]
    model = builder(weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                    trainable_backbone_layers=cfg.trainable_backbone_layers, **kw)  # fmt: skip
    if cfg.anchor_sizes is not None and cfg.name not in OWN:  # the head is built for its anchors: keep their count
        anchors = _anchors(cfg.anchor_sizes)
        want, have = model.head.classification_head.num_anchors, anchors.num_anchors_per_location()
        if len(cfg.anchor_sizes) != 5 or any(n != want for n in have):
            raise ConfigError(
                f"model.anchor_sizes for {cfg.name}: 5 levels of {want // 3} sizes each (x 3 aspect ratios), "
                f"the head's {want} anchors per location; got {cfg.anchor_sizes}"
            )
        model.anchor_generator = anchors
    return model


def head_modules(model: nn.Module) -> list[str]:
    return ["head.classification_head.cls_logits"]


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A fresh classification layer for num_classes objects (+ background, unused by the focal
    loss but kept so labels 1..K index it like every family's), RetinaNet's prior-probability
    bias init; the pretrained conv tower stays."""
    head = model.head.classification_head
    old = head.cls_logits
    new = nn.Conv2d(old.in_channels, head.num_anchors * (num_classes + 1), kernel_size=3, stride=1, padding=1)
    nn.init.normal_(new.weight, std=0.01)
    nn.init.constant_(new.bias, -math.log((1 - 0.01) / 0.01))
    head.cls_logits = new
    head.num_classes = num_classes + 1


def split_levels(head_outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor], features: list[torch.Tensor]):
    """Head outputs and anchors per FPN level, as the dense families' post-processing takes them."""
    hw = [x.size(2) * x.size(3) for x in features]
    per_loc = head_outputs["cls_logits"].size(1) // sum(hw)
    sizes = [n * per_loc for n in hw]
    split = {k: list(v.split(sizes, dim=1)) for k, v in head_outputs.items()}
    return split, [list(a.split(sizes)) for a in anchors]


def loss_and_detections(model, images, targets, autocast):
    """RetinaNet's losses and detections with one backbone pass (what its forward does in
    training and in eval, together)."""
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
            losses = {loss_key(k): v for k, v in model.compute_loss(targets_t, head_outputs, anchors).items()}
        split, split_anchors = split_levels(head_outputs, anchors, features)
        detections = model.postprocess_detections(split, split_anchors, image_list.image_sizes)
        detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    return losses, detections


FAMILY = Family(
    name="RetinaNet",
    model_type=D.RetinaNet,
    models=MODELS,
    own_models=OWN,
    keys=frozenset(_RENAMED) | {"anchor_sizes"},
    own_keys=frozenset(_OWN_KEYS),
    build=build,
    head_modules=head_modules,
    replace_head=replace_head,
    loss_and_detections=loss_and_detections,
)
