"""The zoo: every model name and its family, the model.* keys a family takes, one validation pass for any model."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from detector.config import ModelConfig
from detector.core.errors import ConfigError
from detector.models.family import COMMON_KEYS, Family


def _families() -> tuple[Family, ...]:
    from detector.models import detr, fcos, maskrcnn, rcnn, retinanet, ssd

    # Mask R-CNN before Faster R-CNN: its models are FasterRCNN instances too
    return (maskrcnn.FAMILY, rcnn.FAMILY, retinanet.FAMILY, fcos.FAMILY, ssd.FAMILY, detr.FAMILY)


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


def recipe(name: str) -> dict[str, Any]:
    """The training defaults of model.name's family (dotted keys -> values; {} for none, or for
    an unknown name, which check_keys then reports)."""
    fam = all_models().get(name)
    return dict(fam.recipe(name)) if fam is not None and fam.recipe is not None else {}


def recipe_line(cfg: Any) -> str | None:
    """The start-up line with the family recipe as this run resolved it (None: no recipe)."""
    keys = recipe(cfg.model.name)
    if not keys:
        return None

    def value(key: str) -> Any:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        return node

    resolved = {k: value(k) for k in keys}
    said = ", ".join(
        f"{k}={resolved[k]}" + (" (not the recipe's)" if resolved[k] != v else "") for k, v in keys.items()
    )
    return f"recipe of {family_of(cfg.model.name).name} (for the keys your config leaves unset): {said}"
