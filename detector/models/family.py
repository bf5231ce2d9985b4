"""The Family seam: what differs between Faster R-CNN, Mask R-CNN, RetinaNet, FCOS and SSD, one file each.

A ``Family`` declares its builders and torchvision weights enums, the config keys it takes, how
its classification head is replaced for K classes (and which state-dict keys that drops), and
how one pass yields the validation loss and the detections together. The training loop,
evaluation, the Predictor, reports, plots and export only call the functions of ``detector.models.zoo``;
none of them names a family's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models._api import WeightsEnum

from detector.config import ModelConfig

# Keys every family takes; any other model.* key must be declared by the family that uses it.
COMMON_KEYS = frozenset({"name", "weights", "weights_backbone", "trainable_backbone_layers"})

Builder = Callable[..., nn.Module]
LossAndDetections = Callable[..., tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]]


@dataclass(frozen=True)
class Family:
    """One model family behind the common commands.

    Attributes:
        name: for messages, e.g. "RetinaNet".
        model_type: the torchvision class its models are (to find a built model's family).
        models: model.name -> (builder taking torchvision's keyword arguments, weights enum or
            None when there are no pretrained detection weights).
        own_models: the names in ``models`` that are our own from-scratch builders.
        keys: model.* keys this family takes (beyond COMMON_KEYS).
        own_keys: model.* keys only our own builders take.
        build: (ModelConfig, weights enum value or None, backbone weights or None, number of
            outputs) -> the model. Only the keys that are set are passed on: None keeps
            torchvision's own tuned default.
        head_modules: model -> the module names of the classification layers ``replace_head``
            re-creates (what a checkpoint for other classes cannot give).
        replace_head: (model, K) -> None: new classification layers for K classes + background.
        loss_and_detections: (model, images, targets, autocast) -> (losses, detections) in one
            pass, eval mode; losses keyed like training's (see ``loss_key``).
        outputs: the keys of the model's detection dicts in their order (an exported graph's
            outputs come in this order and are named by it).
        masks: the family trains on instance masks and its detections carry ``masks``.
        pretrained: for families whose pretrained weights are not torchvision's enums (the
            Hugging Face hub): (ModelConfig, K, log) -> the model with its pretrained weights and
            classification layers for K classes; None: torchvision's enums and ``replace_head``.
        recipe: model.name -> the training defaults of the family (dotted config keys -> values)
            for the keys a config leaves unset (``config.load(recipe=zoo.recipe)``); None: the
            schema's defaults.
        rebuild: for families whose architecture a weights file records (``architecture()`` of
            the model, plain data): (that record, ModelConfig, number of outputs) -> the model
            with random weights, without the network.
    """

    name: str
    model_type: type[nn.Module]
    models: Mapping[str, tuple[Builder, type[WeightsEnum] | None]]
    own_models: frozenset[str]
    keys: frozenset[str]
    own_keys: frozenset[str]
    build: Callable[[ModelConfig, Any, Any, int], nn.Module]
    head_modules: Callable[[nn.Module], list[str]]
    replace_head: Callable[[nn.Module, int], None]
    loss_and_detections: LossAndDetections
    outputs: tuple[str, ...] = ("boxes", "scores", "labels")
    masks: bool = False  # trains on instance masks (the data layer reads them only then)
    pretrained: Callable[[ModelConfig, int, Callable[[str], None]], nn.Module] | None = None
    rebuild: Callable[[dict[str, Any], ModelConfig, int], nn.Module] | None = None
    recipe: Callable[[str], dict[str, Any]] | None = None


def loss_key(name: str) -> str:
    """One naming for loss parts across families: torchvision's RetinaNet says "classification",
    Faster R-CNN "loss_classifier"; records and plots use loss_<part> for every family."""
    return name if name.startswith("loss") else f"loss_{name}"


def set_keys(cfg: ModelConfig, names: Mapping[str, str]) -> dict[str, Any]:
    """The builder's keyword arguments for the model.* keys in ``names`` (model key -> keyword)
    that are set; a key left at null keeps torchvision's own default."""
    return {arg: getattr(cfg, key) for key, arg in names.items() if getattr(cfg, key) is not None}


def float32(device: torch.device) -> Any:
    """A context with autocast off (heads and box decoding in float32)."""
    return torch.autocast(device_type=device.type, enabled=False)
