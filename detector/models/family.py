"""Model families: what differs between Faster R-CNN, Mask R-CNN, RetinaNet, FCOS and SSD, one file each.

A ``Family`` declares its builders and torchvision weights enums, the config keys it takes, how
its classification head is replaced for K classes (and which state-dict keys that drops), and
how one pass yields the validation loss and the detections together. The training loop,
evaluation, the Predictor, reports, plots and export only call the functions here; none of them
names a family's internals.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torchvision.models._api import WeightsEnum

from detector.config import ConfigError, ModelConfig

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


def loss_key(name: str) -> str:
    """One naming for loss parts across families: torchvision's RetinaNet says "classification",
    Faster R-CNN "loss_classifier"; records and plots use loss_<part> for every family."""
    return name if name.startswith("loss") else f"loss_{name}"


def _families() -> tuple[Family, ...]:
    from detector.models import fcos, maskrcnn, rcnn, retinanet, ssd

    # Mask R-CNN before Faster R-CNN: its models are FasterRCNN instances too
    return (maskrcnn.FAMILY, rcnn.FAMILY, retinanet.FAMILY, fcos.FAMILY, ssd.FAMILY)


def all_models() -> dict[str, Family]:
    """model.name -> its family, for every model of the zoo."""
    return {name: fam for fam in _families() for name in fam.models}


def family_of(name: str) -> Family:
    """The family of a model name; ConfigError with the closest names for an unknown one."""
    models = all_models()
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown model.name '{name}'{hint}; available: {', '.join(models)}")
    return models[name]


def family_of_model(model: nn.Module) -> Family:
    """The family of a built model (unwrapped)."""
    for fam in _families():
        if isinstance(model, fam.model_type):
            return fam
    raise TypeError(f"{type(model).__name__} is not a detector of a known family")


def check_keys(cfg: ModelConfig) -> None:
    """A model.* key set for a family that does not take it is an error naming the family."""
    fam = family_of(cfg.name)
    own = cfg.name in fam.own_models
    for f in fields(cfg):
        if f.name in COMMON_KEYS or getattr(cfg, f.name) is None:
            continue
        if f.name in fam.keys or (own and f.name in fam.own_keys):
            continue
        users = sorted({x.name for x in _families() if f.name in x.keys or f.name in x.own_keys})
        where = f"; it applies to {', '.join(users)}" if users else ""
        extra = " (our from-scratch builders only)" if f.name in fam.own_keys else ""
        raise ConfigError(f"model.{f.name} does not apply to {cfg.name} ({fam.name}){extra}{where}")


def applicable(cfg: ModelConfig) -> ModelConfig:
    """The config with the keys that do not apply to its family set to null (for configs read
    back from checkpoints of earlier versions, which wrote every key)."""
    from dataclasses import replace

    fam = family_of(cfg.name)
    own = cfg.name in fam.own_models
    drop = {
        f.name: None
        for f in fields(cfg)
        if f.name not in COMMON_KEYS and not (f.name in fam.keys or (own and f.name in fam.own_keys))
    }
    return replace(cfg, **drop)


def loss_and_detections(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]] | None,
    autocast: Callable[[], Any] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Validation losses and detections of any family's model (eval mode) in one pass.

    The backbone runs under ``autocast``; heads, box decoding and post-processing in float32,
    so that boxes are not rounded to bf16's 8-bit mantissa.

    Args:
        model: an unwrapped detector in eval mode.
        images: float images in [0, 1].
        targets: boxes and labels per image, or None for detections only.
        autocast: a context manager factory for the backbone (mixed precision), or None.

    Returns:
        (losses keyed loss_<part>, per-image boxes/labels/scores in the input images' pixels).
    """
    import contextlib

    fam = family_of_model(model)
    return fam.loss_and_detections(model, images, targets, autocast or contextlib.nullcontext)


def set_keys(cfg: ModelConfig, names: Mapping[str, str]) -> dict[str, Any]:
    """The builder's keyword arguments for the model.* keys in ``names`` (model key -> keyword)
    that are set; a key left at null keeps torchvision's own default."""
    return {arg: getattr(cfg, key) for key, arg in names.items() if getattr(cfg, key) is not None}


def float32(device: torch.device) -> Any:
    """A context with autocast off (heads and box decoding in float32)."""
    return torch.autocast(device_type=device.type, enabled=False)
