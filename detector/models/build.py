"""Building a detector by name: the family's builder, pretrained weights, a new head for K classes.

``build_model`` finds the family of ``model.name`` (see detector/families), builds the model,
loads the requested weights (torchvision's pretrained COCO weights, a weights file, or one of
our own best.pt files, rebuilt frozen where it was frozen) and gives it classification layers
for the dataset's K classes (+ background).
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models._api import WeightsEnum

from detector.config import ModelConfig
from detector.core.errors import ConfigError, WeightsError
from detector.models.weights import apply_structure, is_ours, read
from detector.models.zoo import applicable, check_keys, family_of, family_of_model

__all__ = ["build_model", "load_model", "model_input_size", "read_checkpoint"]

read_checkpoint = read  # the weights module reads every weights file


def _is_file(weights: str | None) -> bool:
    return weights is not None and weights.upper() != "DEFAULT" and ("/" in weights or os.path.exists(weights))


def _cache_path(entry: WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)


def _offline_message(entry: WeightsEnum, what: str, exc: BaseException) -> str:
    path = _cache_path(entry)
    return (
        f"{what}: cannot download {entry.url} ({type(exc).__name__}: {exc}).\n"
        f"  torch caches it as {path} (the folder comes from $TORCH_HOME, default ~/.cache/torch/hub).\n"
        f"  Fix one of: connect to the internet once; copy the file there from a machine that has it;\n"
        f"  set model.weights=/path/to/{path.name}; or train from scratch with model.weights=null "
        f"model.weights_backbone=null."
    )


def _load_file(
    model: nn.Module, path: str, num_classes: int, class_names: list[str] | None, log, data: dict | None = None
) -> None:
    """Load a weights file (or its ``data``, already read) into a built model: ours (rebuilt
    frozen where it was frozen) or a plain state dict; classification layers for other classes
    are re-initialised, with a warning."""
    data = read(path) if data is None else data
    if isinstance(data.get("structure"), dict):
        apply_structure(model, data["structure"])
        log(f"{path}: frozen layers and BatchNorm as in the run that trained it")
    state = data.get("model", data)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head = tuple(m + "." for m in family_of_model(model).head_modules(model))
    theirs_names = data.get("label_map", {}).get("names") if isinstance(data.get("label_map"), dict) else None
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if theirs_names is not None and class_names is not None and list(theirs_names) != list(class_names):
        skipped = sorted(set(skipped) | {k for k in state if k.startswith(head)})
    if skipped:
        bad = [k for k in skipped if not k.startswith(head)]
        if bad:
            raise WeightsError(f"{path}: weights do not fit model (shape mismatch in {bad[:5]}); wrong model.name?")
        log(
            f"warning: {path} was trained for other classes "
            f"({theirs_names if theirs_names is not None else 'a different number'}); "
            f"the classification layers are re-initialised for {num_classes} classes"
        )
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: weights do not fit {type(model).__name__} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); wrong model.name?"
        )


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    class_names: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """Build a detector for ``num_classes`` object classes.

    Args:
        cfg: model.* settings (name, weights, sizes, family settings).
        num_classes: K, the dataset's classes; the model predicts K + 1 (with background).
        class_names: the dataset's class names, to tell whether a best.pt matches them.
        log: where warnings go (the main process's print).

    Raises:
        WeightsError: unknown model, weights that cannot be downloaded (with what to do about
            it) or that do not fit.
    """
    try:
        fam = family_of(cfg.name)
        check_keys(cfg)
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None
    _, weights_enum = fam.models[cfg.name]
    weights, from_file = cfg.weights, _is_file(cfg.weights)
    pretrained = weights is not None and not from_file
    backbone = cfg.weights_backbone if weights is None else None  # a weights file holds the backbone too
    if from_file and (cfg.weights_backbone or cfg.trainable_backbone_layers is not None):
        log(
            f"note: model.weights={weights} is a weights file: model.weights_backbone and "
            "model.trainable_backbone_layers are not used; layers are frozen as the file says (ours) or as built"
        )
    # torchvision's builders (not our own) train every layer from scratch whatever the key says, and
    # warn about it on every run: say it once, plainly, instead
    tv_scratch = cfg.name not in fam.own_models and not pretrained and backbone is None and not from_file
    if tv_scratch and cfg.trainable_backbone_layers is not None:
        n = cfg.trainable_backbone_layers
        log(f"note: model.trainable_backbone_layers={n} has no effect from scratch: every layer trains")
        cfg = dataclasses.replace(cfg, trainable_backbone_layers=None)
    if fam.pretrained is not None and (pretrained or (from_file and Path(str(weights)).is_dir())):
        return fam.pretrained(cfg, num_classes, log)  # the hub's checkpoint or a save_pretrained folder
    if from_file and fam.rebuild is not None and "architecture" in (data := read(str(weights))):
        model = fam.rebuild(data["architecture"], cfg, num_classes + 1)  # as the file records it
        _load_file(model, str(weights), num_classes, class_names, log, data)
        return model
    entry = None
    if pretrained:
        if weights_enum is None:
            raise WeightsError(f"{cfg.name} has no pretrained detection weights; use model.weights=null")
        try:
            entry = weights_enum.verify(weights)
        except (KeyError, ValueError):
            names = ", ".join(["DEFAULT"] + [w.name for w in weights_enum])
            raise WeightsError(f"model.weights={weights}: not a file and not one of {names}") from None
    try:
        model = fam.build(cfg, entry, backbone, len(entry.meta["categories"]) if entry is not None else num_classes + 1)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        if entry is not None and not _cache_path(entry).is_file():
            raise WeightsError(_offline_message(entry, f"model.weights={weights}", exc)) from None
        if backbone is not None:
            raise WeightsError(
                f"model.weights_backbone={backbone}: cannot download the backbone weights ({exc}); "
                "connect once, or set model.weights_backbone=null"
            ) from None
        raise
    if entry is not None:
        fam.replace_head(model, num_classes)
    if from_file:
        _load_file(model, str(weights), num_classes, class_names, log)
    return model


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(min_size, max_size) of the model's own resize, for reduced-scale decoding.

    A fixed-size model (SSD) stretches every image to its square: both sides must stay at least
    that large, which (size, unbounded) gives.
    """
    t = model.transform
    fixed = getattr(t, "fixed_size", None)
    if fixed:
        return int(max(fixed)), 1 << 30
    return int(t.min_size[-1]), int(t.max_size)


def describe(model: nn.Module) -> dict[str, Any]:
    """Family, parameter counts: for the start-up line."""
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"family": family_of_model(model).name, "parameters": n, "trainable": trainable}


def load_model(path: str | Path, **model_overrides: Any):
    """Rebuild the model of one of our weights files (best.pt / last.pt) the way it was trained.

    Args:
        path: the weights file.
        model_overrides: model.* settings to change (e.g. box_score_thresh).

    Returns:
        (model in eval mode, LabelMap, the file's data without the weights).
    """
    from detector.config import from_dict
    from detector.core.labels import LabelMap

    data = read(path)
    if not is_ours(data):
        raise WeightsError(f"{path} is not a detector weights file (no label map); use one written by tools/train.py")
    label_map = LabelMap.from_dict(data["label_map"])
    cfg = applicable(from_dict({"model": data.get("model_config", {})}).model)
    cfg = dataclasses.replace(cfg, weights=None, weights_backbone=None, **model_overrides)
    fam = family_of(cfg.name)
    if fam.rebuild is not None and "architecture" in data:
        model = fam.rebuild(data["architecture"], cfg, label_map.num_classes + 1)
    else:
        model = build_model(cfg, label_map.num_classes, list(label_map.names))
    if "structure" in data:
        apply_structure(model, data["structure"])
    model.load_state_dict(data["model"])
    model.eval()
    return model, label_map, {k: v for k, v in data.items() if k != "model"}
