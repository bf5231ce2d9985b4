"""Backbones of our own small builders: a ResNet-18/34 + FPN that learns from scratch on a CPU.

torchvision has no detection weights for these; they exist for tests, demos and CPU users. From
scratch their norm layers are trainable BatchNorm; with an ImageNet backbone they are frozen,
as torchvision does for small detection batches.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import models as tv_models
from torchvision.models import get_model_weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d


def resnet_fpn(
    depth: int,
    weights_backbone: Any,
    trainable_layers: int | None,
    returned_layers: list[int] | None,
    fpn_channels: int | None,
    extra_blocks: nn.Module,
) -> BackboneWithFPN:
    """A ResNet-{depth} + FPN over the given stages.

    Args:
        depth: 18 or 34.
        weights_backbone: ImageNet weights (an enum value or name) or None for random init.
        trainable_layers: ResNet stages trained, counted from the top (5 = all); None: all from
            scratch, 3 with ImageNet weights.
        returned_layers: ResNet stages (1-4) fed to the FPN; None: [1, 2, 3, 4].
        fpn_channels: FPN width; None: 256.
        extra_blocks: the FPN's extra levels (max pool for R-CNN, P6/P7 for one-stage heads).
    """
    wb = get_model_weights(f"resnet{depth}").verify(weights_backbone) if weights_backbone else None
    norm = nn.BatchNorm2d if wb is None else FrozenBatchNorm2d
    net = getattr(tv_models, f"resnet{depth}")(weights=wb, norm_layer=norm)
    trainable = trainable_layers if trainable_layers is not None else (5 if wb is None else 3)
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: trainable + (trainable == 5)]
    for name, p in net.named_parameters():
        if not any(name.startswith(t) for t in train_prefixes):
            p.requires_grad_(False)
    stages = list(returned_layers) if returned_layers else [1, 2, 3, 4]
    return BackboneWithFPN(
        net,
        {f"layer{k}": str(i) for i, k in enumerate(stages)},
        [64 * 2 ** (k - 1) for k in stages],
        fpn_channels or 256,
        extra_blocks=extra_blocks,
    )


def stage_strides(returned_layers: list[int] | None, extra_levels: int) -> list[int]:
    """The stride of each FPN level: 4 for stage 1, doubling per stage, then the extra levels."""
    stages = list(returned_layers) if returned_layers else [1, 2, 3, 4]
    strides = [2 ** (k + 1) for k in stages]
    return strides + [strides[-1] * 2 ** (i + 1) for i in range(extra_levels)]
