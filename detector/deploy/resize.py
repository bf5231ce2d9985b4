"""The resize of an exported model: the size eager PyTorch resizes to, traced (ONNX) and scripted
(TorchScript) alike.

torchvision's GeneralizedRCNNTransform computes the scale min(min_size / short side, max_size /
long side) in float64 in eager code, but in float32 when traced or scripted, and the ONNX
exporter turns ``max_size / side`` into ``max_size * (1 / side)``: where side * scale is an
integer (400x300, 800x600 or 1600x1200 for min_size 256, max_size 320) the export resizes to a
pixel less than eager PyTorch on each side (239x319 for 240x320), which shifts every box and
score of a dense model. While exporting, ``eager_resize`` gives the model a transform that
computes the size as eager code does.

No ``from __future__ import annotations`` here: TorchScript reads these annotations.
"""

import contextlib
import math
from collections.abc import Iterator

import torch
import torchvision
from torch import Tensor
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    _resize_image_and_masks,
    resize_boxes,
    resize_keypoints,
)


def eager_resized_size(image: Tensor, min_size: int, max_size: int) -> tuple[int, int]:
    """(width, height) eager torchvision resizes ``image`` (3, H, W) to: floor(side * scale) with
    scale = min(min_size / short side, max_size / long side), all in float64 as its Python code
    computes them (an exactly integral product may round down to the integer below: that is what
    the Predictor, training and validation see, and an export must see the same)."""
    h, w = image.shape[-2:]
    scale = min(float(min_size) / float(min(h, w)), float(max_size) / float(max(h, w)))
    return int(math.floor(float(w) * scale)), int(math.floor(float(h) * scale))


@torch.jit.unused
def _traced_resized_size(image: Tensor, min_size: int, max_size: int) -> tuple[int, int]:
    """``eager_resized_size`` as graph operations on the image's dynamic shape (tensors at run
    time, whatever the annotation says), in float64 with true divisions of tensors: torchvision's
    tracing branch computes the scale in float32 and the exporter turns ``max_size / side`` into
    ``max_size * (1 / side)``, so that 300 * (320 * (1 / 400)) floors to 239 where eager gets 240."""
    from torch.onnx import operators

    # 1-d tensors throughout: the exporter casts 0-d float64 tensors (scalars) to float32
    hw = operators.shape_as_tensor(image)[-2:].to(torch.float64)
    lo = torch.tensor([float(min_size)], dtype=torch.float64)
    hi = torch.tensor([float(max_size)], dtype=torch.float64)
    short, long = torch.minimum(hw, hw.flip(0)), torch.maximum(hw, hw.flip(0))  # each side: both the same
    size = torch.floor(hw * torch.minimum(lo / short, hi / long)).to(torch.int64)
    return size[1], size[0]  # type: ignore[return-value]


class EagerSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform whose resize gives, traced (ONNX) and scripted (TorchScript), the
    size its eager code gives (``eager_resized_size``); pixels and the padding are then those of
    eager PyTorch. Eager, it resizes exactly as torchvision's (the same interpolate call on the
    same output size). Used only while exporting (``eager_resize``)."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        h, w = image.shape[-2:]
        if self.training:  # torchvision's random training sizes: its own code
            if self._skip_resize:
                return image, target
            size = self.torch_choice(self.min_size)
            image, target = _resize_image_and_masks(image, size, self.max_size, target, self.fixed_size)
        else:
            fixed: tuple[int, int] | None = self.fixed_size
            if fixed is None:
                if torchvision._is_tracing():
                    fixed = _traced_resized_size(image, self.min_size[-1], self.max_size)
                else:
                    fixed = eager_resized_size(image, self.min_size[-1], self.max_size)
            # a fixed (width, height): interpolate to that size, as eager does after recomputing it
            image, target = _resize_image_and_masks(image, self.min_size[-1], self.max_size, target, fixed)
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(target["keypoints"], (h, w), image.shape[-2:])
        return image, target


@contextlib.contextmanager
def eager_resize(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model with an ``EagerSizeTransform`` of its transform's settings while exporting (its
    own transform is put back after)."""
    t = model.transform
    exact = EagerSizeTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size,
                               _skip_resize=t._skip_resize).train(t.training)  # fmt: skip
    model.transform = exact
    try:
        yield model
    finally:
        model.transform = t
