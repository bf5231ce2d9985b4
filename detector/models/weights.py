"""Our weights file (best.pt / last.pt): written and read here (``build.load_model`` rebuilds the model).

The file holds plain data only (``torch.load(path, weights_only=True)`` reads it): the state
dict without ``module.``, the resolved config, the label map, input-size settings, metrics,
epoch, step, library versions, a format tag, and the model's structure as it was trained
(which norm layers were frozen BatchNorm and which parameters were frozen), so that a model
rebuilt from it, for inference or for a second fine-tune, is the model that was trained.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detector.core.errors import WeightsError, write_error

FORMAT = "detector.weights/2"
READABLE = ("detector.weights/1", FORMAT)


def versions() -> dict[str, str]:
    import torchvision

    return {
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
    }


def structure(model: nn.Module) -> dict[str, list[str]]:
    """What a rebuild needs beyond the architecture: frozen norm layers and frozen parameters."""
    return {
        "frozen_norm": [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)],
        "frozen_params": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def apply_structure(model: nn.Module, struct: dict[str, list[str]]) -> None:
    """Make a freshly built model frozen where the trained one was, and only there: BatchNorm and
    FrozenBatchNorm2d as the trained model had them, parameters that did not train frozen."""
    frozen_norm = set(struct.get("frozen_norm", []))
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if name in frozen_norm and isinstance(module, nn.BatchNorm2d):
            setattr(parent, child, FrozenBatchNorm2d(module.num_features, eps=module.eps))
        elif name not in frozen_norm and isinstance(module, FrozenBatchNorm2d):  # it trained its BatchNorm
            setattr(parent, child, nn.BatchNorm2d(module.weight.numel(), eps=module.eps))
    frozen = set(struct.get("frozen_params", []))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)


def payload(
    model: nn.Module,
    config: dict[str, Any],
    label_map: dict[str, list],
    metrics: dict[str, Any],
    epoch: int,
    step: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of a weights file (plain data only).

    Args:
        model: the unwrapped model whose weights are written.
        config: the resolved config (config.to_dict).
        label_map: LabelMap.to_dict().
        metrics: numbers of the epoch the weights are from.
        epoch, step: where in training.
        extra: more plain data (e.g. "ema": True when the weights are the EMA's).
    """
    model_cfg = config.get("model", {})
    return {
        "format": FORMAT,
        "model": {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()},
        "structure": structure(model),
        "model_config": model_cfg,
        "config": config,
        "label_map": label_map,
        "input": {
            "min_size": model_cfg.get("min_size"),
            "max_size": model_cfg.get("max_size"),
            "scale": "images are float RGB in [0, 1]; the model normalises and resizes them itself",
        },
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        "epoch": int(epoch),
        "step": int(step),
        "versions": versions(),
        # the architecture where model.name alone does not give it (a hub model's config): a
        # rebuild then needs no network
        **({"architecture": model.architecture()} if hasattr(model, "architecture") else {}),
        **(extra or {}),
    }


def save(obj: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temporary file, flushed and fsynced, renamed over ``path``.

    Raises:
        WriteError: the disk is full, over quota, read-only or failing; the temporary file is
            removed and the file at ``path`` (if any) is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None


def read(path: str | Path) -> dict[str, Any]:
    """Load a weights file with ``weights_only=True``: ours (format checked) or a plain state dict.

    Raises:
        WeightsError: missing, truncated or corrupt files, files holding pickled objects, and
            files of a format this version cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"cannot read {path}: {text}. It is truncated, corrupt, or holds pickled Python objects "
            "(only plain tensors and containers are loaded)."
        ) from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict or a detector checkpoint)")
    fmt = data.get("format")
    if isinstance(fmt, str) and fmt.startswith("detector.weights/") and fmt not in READABLE:
        raise WeightsError(f"{path}: format {fmt} is newer than this version of detector reads ({', '.join(READABLE)})")
    return data


def is_ours(data: dict[str, Any]) -> bool:
    return data.get("format") in READABLE and "label_map" in data and "model" in data
