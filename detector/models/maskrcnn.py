"""Mask R-CNN: Faster R-CNN with a mask head (ResNet50-FPN, -FPN-v2, and our ResNet-18 FPN from
scratch). It shares Faster R-CNN's config keys, builder and validation pass; it adds the mask
predictor to the replaced head, the mask loss to validation, and ``masks`` to the detections."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models import detection as D
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss

from detector.config import ModelConfig
from detector.models import rcnn
from detector.models.family import Family


def _resnet18_fpn(*, num_classes: int, **kw: Any) -> D.MaskRCNN:
    """Mask R-CNN on our ResNet-18 + FPN: from scratch on a CPU (tests, the demo). The mask head
    is torchvision's four 3x3 convolutions, as wide as the FPN."""
    backbone, kw = rcnn.scratch_parts("maskrcnn_resnet18_fpn", 18, num_classes=num_classes, **kw)
    c = backbone.out_channels
    return D.MaskRCNN(
        backbone,
        num_classes=None,
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
