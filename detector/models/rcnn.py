"""Two-stage R-CNN: Faster R-CNN (MobileNetV3-FPN, MobileNetV3-320, ResNet50-FPN, -FPN-v2, and our
ResNet-18/34 FPN from scratch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models import detection as D
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detector.config import ModelConfig
from detector.core.errors import ConfigError
from detector.models.backbones import resnet_fpn
from detector.models.family import Family, float32, set_keys


def scratch_parts(
    name: str,
    depth: int,
    *,
    weights: Any,
    weights_backbone: Any,
    num_classes: int,
    trainable_backbone_layers: int | None,
    returned_layers: list[int] | None = None,
    fpn_channels: int | None = None,
    representation_size: int | None = None,
    **kw: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone and the R-CNN keywords (anchors, box head and predictor) of our from-scratch
    ResNet-{depth} + FPN models; Faster and Mask R-CNN build on them."""
    if weights is not None:
        raise ValueError(f"{name} has no pretrained detection weights")
    backbone = resnet_fpn(depth, weights_backbone, trainable_backbone_layers, returned_layers, fpn_channels,
                          LastLevelMaxPool())  # fmt: skip
    if "rpn_anchor_generator" not in kw:  # 32 px at stride 4, doubling per level
        stages = list(returned_layers) if returned_layers else [1, 2, 3, 4]
        sizes = tuple((32 * 2 ** (k - 1),) for k in [*stages, stages[-1] + 1])
        kw["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    width = representation_size or 1024
    kw["box_head"] = TwoMLPHead(backbone.out_channels * 7 * 7, width)
    kw["box_predictor"] = FastRCNNPredictor(width, num_classes)
    return backbone, kw


def _resnet_fpn(depth: int) -> Callable[..., D.FasterRCNN]:
    """Faster R-CNN on our ResNet-{depth} + FPN; the box head's width is a setting (a narrow FPN
    on stages 2-4 with a 256-wide head is several times cheaper on a CPU: the demo's model)."""

    def build(**kw: Any) -> D.FasterRCNN:
        backbone, kw = scratch_parts(f"fasterrcnn_resnet{depth}_fpn", depth, **kw)
        return D.FasterRCNN(backbone, num_classes=None, **kw)

    return build


MODELS = {
    "fasterrcnn_mobilenet_v3_large_fpn": (
        D.fasterrcnn_mobilenet_v3_large_fpn,
        D.FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        D.fasterrcnn_mobilenet_v3_large_320_fpn,
        D.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    ),
    "fasterrcnn_resnet50_fpn": (D.fasterrcnn_resnet50_fpn, D.FasterRCNN_ResNet50_FPN_Weights),
    "fasterrcnn_resnet50_fpn_v2": (D.fasterrcnn_resnet50_fpn_v2, D.FasterRCNN_ResNet50_FPN_V2_Weights),
    "fasterrcnn_resnet18_fpn": (_resnet_fpn(18), None),
    "fasterrcnn_resnet34_fpn": (_resnet_fpn(34), None),
}

# model.* keys that are also the builder's keywords
_KEYS = {k: k for k in (
    "box_score_thresh", "box_nms_thresh", "box_detections_per_img", "box_batch_size_per_image",
    "rpn_batch_size_per_image", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "min_size", "max_size",
    "returned_layers", "fpn_channels", "representation_size",
)}  # fmt: skip


def build(cfg: ModelConfig, weights: Any, weights_backbone: Any, num_classes: int, models: Any = None) -> nn.Module:
    """Build a model of ``models`` (this family's by default; Mask R-CNN passes its own)."""
    models = models or MODELS
    kw = set_keys(cfg, _KEYS)
    anchors = None
    if cfg.anchor_sizes is not None:
        sizes = tuple(tuple(int(s) for s in level) for level in cfg.anchor_sizes)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        if models[cfg.name][1] is None:  # ours build the RPN head for the anchors they are given
            kw["rpn_anchor_generator"] = anchors
    builder, _ = models[cfg.name]
    model = builder(weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                    trainable_backbone_layers=cfg.trainable_backbone_layers, **kw)  # fmt: skip
    if anchors is not None and "rpn_anchor_generator" not in kw:  # torchvision's builders set their own
        want = model.rpn.head.cls_logits.out_channels
        levels = len(model.rpn.anchor_generator.sizes)
        if len(cfg.anchor_sizes) != levels or any(n != want for n in anchors.num_anchors_per_location()):
            raise ConfigError(
                f"model.anchor_sizes for {cfg.name}: {levels} levels of {want // 3} size(s) each (x 3 aspect "
                f"ratios), as its RPN head predicts {want} anchors per location; got {cfg.anchor_sizes}"
            )
        model.rpn.anchor_generator = anchors
    return model


def head_modules(model: nn.Module) -> list[str]:
    return ["roi_heads.box_predictor"]


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A fresh box predictor for num_classes objects (+ background)."""
    head = model.roi_heads.box_predictor
    model.roi_heads.box_predictor = FastRCNNPredictor(head.cls_score.in_features, num_classes + 1)


def loss_and_detections(model, images, targets, autocast, extra_losses=None):
    """Faster R-CNN's losses and detections with one backbone pass.

    The losses use the test-time proposals (what the model will see when it is used); their
    random anchor/proposal sampling follows the caller's RNG state. ``extra_losses`` (Mask
    R-CNN's mask loss) gets (model, features, sampled proposals, their matched targets, their
    labels, image sizes, targets) and returns more loss parts.
    """
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    with autocast():
        image_list, targets_t = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
    with float32(image_list.tensors.device):
        features = {k: v.float() for k, v in features.items()}
        image_list.tensors = image_list.tensors.float()
        rpn = model.rpn
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(image_list, feats)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, num_anchors_per_level)
        heads = model.roi_heads
        detections, _ = heads(features, boxes, image_list.image_sizes)
        detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        losses: dict[str, torch.Tensor] = {}
        if targets_t is not None:
            labels, matched = rpn.assign_targets_to_anchors(anchors, targets_t)
            reg_targets = rpn.box_coder.encode(matched, anchors)
            loss_obj, loss_rpn = rpn.compute_loss(objectness, deltas, labels, reg_targets)
            props, matched, cls_labels, box_targets = heads.select_training_samples(boxes, targets_t)
            feats_roi = heads.box_head(heads.box_roi_pool(features, props, image_list.image_sizes))
            class_logits, box_regression = heads.box_predictor(feats_roi)
            loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, cls_labels, box_targets)
            losses = {
                "loss_classifier": loss_cls,
                "loss_box_reg": loss_box,
                "loss_objectness": loss_obj,
                "loss_rpn_box_reg": loss_rpn,
            }
            if extra_losses is not None:
                losses.update(extra_losses(model, features, props, matched, cls_labels, image_list.image_sizes,
                                           targets_t))  # fmt: skip
    return losses, detections


FAMILY = Family(
    name="Faster R-CNN",
    model_type=D.FasterRCNN,
    models=MODELS,
    own_models=frozenset({"fasterrcnn_resnet18_fpn", "fasterrcnn_resnet34_fpn"}),
    keys=frozenset(_KEYS) - {"returned_layers", "fpn_channels", "representation_size"} | {"anchor_sizes"},
    own_keys=frozenset({"returned_layers", "fpn_channels", "representation_size"}),
    build=build,
    head_modules=head_modules,
    replace_head=replace_head,
    loss_and_detections=loss_and_detections,
    outputs=("boxes", "labels", "scores"),
)
