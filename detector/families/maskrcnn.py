"""Mask R-CNN: Faster R-CNN with a mask head (ResNet50-FPN, -FPN-v2, and our ResNet-18 FPN from
scratch). It shares Faster R-CNN's config keys, builder and validation pass; it adds the mask
predictor to the replaced head, the mask loss to validation, and ``masks`` to the detections."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models import detection as D
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detector.config import ModelConfig
from detector.families import Family, rcnn
from detector.families.backbones import resnet_fpn


def _resnet18_fpn(
    *,
    weights: Any,
    weights_backbone: Any,
    num_classes: int,
    trainable_backbone_layers: int | None,
    returned_layers: list[int] | None = None,
    fpn_channels: int | None = None,
    representation_size: int | None = None,
    **kw: Any,
) -> D.MaskRCNN:
    """Mask R-CNN on our ResNet-18 + FPN: from scratch on a CPU (tests, the demo). The mask head
    is torchvision's four 3x3 convolutions, as wide as the FPN."""
    if weights is not None:
        raise ValueError("maskrcnn_resnet18_fpn has no pretrained detection weights")
    backbone = resnet_fpn(18, weights_backbone, trainable_backbone_layers, returned_layers, fpn_channels,
                          LastLevelMaxPool())  # fmt: skip
    if "rpn_anchor_generator" not in kw:  # 32 px at stride 4, doubling per level
        stages = list(returned_layers) if returned_layers else [1, 2, 3, 4]
        sizes = tuple((32 * 2 ** (k - 1),) for k in [*stages, stages[-1] + 1])
        kw["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    width = representation_size or 1024
    c = backbone.out_channels
    return D.MaskRCNN(
        backbone,
        num_classes=None,
        box_head=TwoMLPHead(c * 7 * 7, width),
        box_predictor=FastRCNNPredictor(width, num_classes),
        mask_head=MaskRCNNHeads(c, [c] * 4, 1),
        mask_predictor=MaskRCNNPredictor(c, c, num_classes),
        **kw,
    )


MODELS = {
    "maskrcnn_resnet50_fpn": (D.maskrcnn_resnet50_fpn, D.MaskRCNN_ResNet50_FPN_Weights),
    "maskrcnn_resnet50_fpn_v2": (D.maskrcnn_resnet50_fpn_v2, D.MaskRCNN_ResNet50_FPN_V2_Weights),
    "maskrcnn_resnet18_fpn": (_resnet18_fpn, None),
}


def build(cfg: ModelConfig, weights: Any, weights_backbone: Any, num_classes: int) -> nn.Module:
    return rcnn.build(cfg, weights, weights_backbone, num_classes, MODELS)


def head_modules(model: nn.Module) -> list[str]:
    return ["roi_heads.box_predictor", "roi_heads.mask_predictor"]


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Fresh box and mask predictors for num_classes objects (+ background)."""
    rcnn.replace_head(model, num_classes)
    old = model.roi_heads.mask_predictor
    model.roi_heads.mask_predictor = MaskRCNNPredictor(
        old.conv5_mask.in_channels, old.conv5_mask.out_channels, num_classes + 1
    )


def _mask_loss(model, features, proposals, matched, labels, image_sizes, targets):
    """torchvision's mask loss on the positive proposals of the sampled set."""
    heads = model.roi_heads
    pos = [torch.where(lab > 0)[0] for lab in labels]
    mask_props = [p[k] for p, k in zip(proposals, pos)]
    pos_matched = [m[k] for m, k in zip(matched, pos)]
    feats = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, mask_props, image_sizes)))
    gt_masks = [t["masks"] for t in targets]
    gt_labels = [t["labels"] for t in targets]
    return {"loss_mask": maskrcnn_loss(feats, mask_props, gt_masks, gt_labels, pos_matched)}


def loss_and_detections(model, images, targets, autocast):
    """Faster R-CNN's pass plus the mask loss; detections carry ``masks`` (n, 1, H, W)
    probabilities pasted into the input images' pixels."""
    return rcnn.loss_and_detections(model, images, targets, autocast, _mask_loss)


FAMILY = Family(
    name="Mask R-CNN",
    model_type=D.MaskRCNN,
    models=MODELS,
    own_models=frozenset({"maskrcnn_resnet18_fpn"}),
    keys=rcnn.FAMILY.keys,
    own_keys=rcnn.FAMILY.own_keys,
    build=build,
    head_modules=head_modules,
    replace_head=replace_head,
    loss_and_detections=loss_and_detections,
    outputs=("boxes", "labels", "scores", "masks"),
    masks=True,
)
