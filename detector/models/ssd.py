"""SSD: SSD300 (VGG16) and SSDlite320 (MobileNetV3-Large), with COCO weights or from scratch.

Both resize every image to a fixed square (300 or 320 px): model.min_size / max_size do not
apply. SSDlite from scratch is the family's small CPU variant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models import detection as D
from torchvision.ops import boxes as box_ops

from detector.config import ModelConfig
from detector.models.dense import KEYS, one_pass
from detector.models.family import Family, set_keys

MODELS = {
    "ssd300_vgg16": (D.ssd300_vgg16, D.SSD300_VGG16_Weights),
    "ssdlite320_mobilenet_v3_large": (D.ssdlite320_mobilenet_v3_large, D.SSDLite320_MobileNet_V3_Large_Weights),
}


def build(cfg: ModelConfig, weights: Any, weights_backbone: Any, num_classes: int) -> nn.Module:
    kw = set_keys(cfg, KEYS)
    builder, _ = MODELS[cfg.name]
    model = builder(weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                    trainable_backbone_layers=cfg.trainable_backbone_layers)  # fmt: skip
    for arg, value in kw.items():  # set afterwards: SSDlite's builder passes keywords to its backbone too
        setattr(model, arg, value)
    return model


def head_modules(model: nn.Module) -> list[str]:
    """The last convolution of each level's classification predictor."""
    names = []
    for i, block in enumerate(model.head.classification_head.module_list):
        last = f".{len(block) - 1}" if isinstance(block, nn.Sequential) else ""
        names.append(f"head.classification_head.module_list.{i}{last}")
    return names


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Fresh last convolutions of the classification predictors for num_classes (+ background)."""
    head = model.head.classification_head
    old_columns = head.num_columns
    for name in head_modules(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        anchors = old.out_channels // old_columns
        new = nn.Conv2d(old.in_channels, anchors * (num_classes + 1), old.kernel_size, old.stride, old.padding)
        nn.init.xavier_uniform_(new.weight)
        nn.init.zeros_(new.bias)
        setattr(parent, child, new)
    head.num_columns = num_classes + 1


def _loss(model, targets, head_outputs, anchors, features):
    matched = []
    for a, t in zip(anchors, targets):
        if t["boxes"].numel() == 0:
            matched.append(torch.full((a.size(0),), -1, dtype=torch.int64, device=a.device))
        else:
            matched.append(model.proposal_matcher(box_ops.box_iou(t["boxes"], a)))
    return model.compute_loss(targets, head_outputs, anchors, matched)


def _detect(model, head_outputs, anchors, features, image_sizes):
    return model.postprocess_detections(head_outputs, anchors, image_sizes)


def loss_and_detections(model, images, targets, autocast):
    """SSD's losses and detections with one backbone pass."""
    return one_pass(model, images, targets, autocast, _loss, _detect)


FAMILY = Family(
    name="SSD",
    model_type=D.ssd.SSD,
    models=MODELS,
    own_models=frozenset(),
    keys=frozenset(KEYS),
    own_keys=frozenset(),
    build=build,
    head_modules=head_modules,
    replace_head=replace_head,
    loss_and_detections=loss_and_detections,
)
