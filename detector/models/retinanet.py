"""RetinaNet: ResNet50-FPN (v1, v2) with COCO weights, and a narrow ResNet-18/34 FPN from scratch."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn
from torchvision.models import detection as D
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

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


def _anchors(sizes_per_level: list[list[int]] | tuple) -> AnchorGenerator:
    sizes = tuple(tuple(int(s) for s in level) for level in sizes_per_level)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _resnet_fpn(depth: int) -> Callable[..., D.RetinaNet]:
    """RetinaNet on our ResNet-{depth} + FPN (stages 2-4 by default, P6/P7 on top): RetinaNet's
    own anchors (4 strides wide, 3 scales x 3 ratios), a head as wide as the FPN with GroupNorm
    and a GIoU box loss, as torchvision's v2 recipe (both help a model that starts from scratch)."""

    def build(*, weights: Any, weights_backbone: Any, num_classes: int, trainable_backbone_layers: int | None,
              returned_layers: list[int] | None = None, fpn_channels: int | None = None, **kw: Any) -> D.RetinaNet:  # fmt: skip
        backbone, layers, width = small_fpn(f"retinanet_resnet{depth}_fpn", weights, weights_backbone,
                                            trainable_backbone_layers, returned_layers, fpn_channels)  # fmt: skip
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


def build(cfg: ModelConfig, weights: Any, weights_backbone: Any, num_classes: int) -> nn.Module:
    kw = set_keys(cfg, {**KEYS, **SIZE_KEYS})
    if cfg.name in OWN:
        kw.update(set_keys(cfg, OWN_KEYS))
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


def loss_and_detections(model, images, targets, autocast):
    """RetinaNet's losses and detections with one backbone pass."""
    return one_pass(model, images, targets, autocast, lambda m, t, h, a, f: m.compute_loss(t, h, a), detect_per_level)


FAMILY = Family(
    name="RetinaNet",
    model_type=D.RetinaNet,
    models=MODELS,
    own_models=OWN,
    keys=frozenset(KEYS) | frozenset(SIZE_KEYS) | {"anchor_sizes"},
    own_keys=frozenset(OWN_KEYS),
    build=build,
    head_modules=cls_logits_module,
    replace_head=replace_cls_logits,
    loss_and_detections=loss_and_detections,
)
