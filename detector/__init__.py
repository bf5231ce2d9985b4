"""detector: fine-tune torchvision detectors on your own COCO data; the public API is importable from here.

Each name also lives in its stage's package (``detector.inference.Predictor`` is
``detector.Predictor``). The names load on first use, so ``import detector`` (and every tool's
``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the stage package that holds it
_PUBLIC = {
    "load_config": "detector.config",
    "Config": "detector.config",
    "Detections": "detector.core.detections",
    "run_main": "detector.core.errors",
    "build_model": "detector.models",
    "load_model": "detector.models",
    "Predictor": "detector.inference",
    "SliceSpec": "detector.inference",
    "ExportedPredictor": "detector.deploy",
    "exported_predictor": "detector.deploy",
    "make_accelerator": "detector.train",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'detector' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
