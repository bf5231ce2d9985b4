"""What the one-stage (dense) families share: their config keys, the one-pass validation, the
per-level post-processing of RetinaNet and FCOS, their classification-layer replacement, and the
from-scratch ResNet FPN with P6/P7 of our small RetinaNet and FCOS."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detector.core.errors import ConfigError
from detector.models.backbones import resnet_fpn
from detector.models.family import float32, loss_key

# model.* key -> the keyword of torchvision's RetinaNet, FCOS and SSD
KEYS = {
    "box_score_thresh": "score_thresh",
    "box_nms_thresh": "nms_thresh",
    "box_detections_per_img": "detections_per_img",
    "topk_candidates": "topk_candidates",
}
SIZE_KEYS = {"min_size": "min_size", "max_size": "max_size"}  # not SSD: fixed size
OWN_KEYS = {"returned_layers": "returned_layers", "fpn_channels": "fpn_channels"}


def small_fpn(name: str, weights: Any, weights_backbone: Any, trainable_layers: int | None,
              returned_layers: list[int] | None, fpn_channels: int | None):  # fmt: skip
    """Our ResNet FPN for a one-stage head: stages 2-4 by default, P6/P7 on top, as wide as the
    head. Returns (backbone, stages, width).

    Raises:
        ValueError: pretrained detection weights were asked for (there are none).
        ConfigError: a width the heads' GroupNorm(32) cannot take on a 1x1 level.
    """
    if weights is not None:
        raise ValueError(f"{name} has no pretrained detection weights")
    layers = returned_layers or [2, 3, 4]
    width = fpn_channels or 256
    if width % 32 or width < 64:  # GroupNorm(32): >= 2 channels per group on a 1x1 level
        raise ConfigError(f"model.fpn_channels for {name}: a multiple of 32, at least 64 (got {width})")
    depth = int(name.split("_resnet")[1].split("_")[0])
    backbone = resnet_fpn(depth, weights_backbone, trainable_layers, layers, width, LastLevelP6P7(width, width))
    return backbone, layers, width


def replace_cls_logits(model: nn.Module, num_classes: int) -> None:
    """A fresh classification layer for num_classes objects (+ background, unused by the focal
    loss but kept so labels 1..K index it like every family's), with the prior-probability bias
    init of RetinaNet and FCOS; the pretrained conv tower stays."""
    head = model.head.classification_head
    old = head.cls_logits
    new = nn.Conv2d(old.in_channels, head.num_anchors * (num_classes + 1), kernel_size=3, stride=1, padding=1)
    nn.init.normal_(new.weight, std=0.01)
    nn.init.constant_(new.bias, -math.log((1 - 0.01) / 0.01))
    head.cls_logits = new
    head.num_classes = num_classes + 1


def cls_logits_module(model: nn.Module) -> list[str]:
    return ["head.classification_head.cls_logits"]


def detect_per_level(model, head_outputs, anchors, features, image_sizes):
    """RetinaNet's and FCOS's post-processing, which takes head outputs and anchors per level."""
    hw = [x.size(2) * x.size(3) for x in features]
    per_loc = head_outputs["cls_logits"].size(1) // sum(hw)
    sizes = [n * per_loc for n in hw]
    split = {k: list(v.split(sizes, dim=1)) for k, v in head_outputs.items()}
    return model.postprocess_detections(split, [list(a.split(sizes)) for a in anchors], image_sizes)


def one_pass(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]] | None,
    autocast: Callable[[], Any],
    loss: Callable[..., dict[str, torch.Tensor]],
    detect: Callable[..., list[dict[str, torch.Tensor]]],
):
    """Losses and detections of a dense model with one backbone pass: what its forward does in
    training and in eval, together. The backbone runs under ``autocast``; the heads, the losses
    and the box decoding in float32.

    Args:
        loss: (model, targets, head_outputs, anchors, features) -> torchvision's loss dict.
        detect: (model, head_outputs, anchors, features, image_sizes) -> detections in the
            resized images' pixels.
    """
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
            raw = loss(model, targets_t, head_outputs, anchors, features)
            losses = {loss_key(k): v for k, v in raw.items()}
        detections = detect(model, head_outputs, anchors, features, image_list.image_sizes)
        detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    return losses, detections
