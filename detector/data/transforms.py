"""Albumentations pipelines from the config, through Albumentations' own serialisation.

A config lists transforms as ``{Name: {param: value}}`` (or Albumentations' own
``{"__class_fullname__": Name, ...}`` form); nested ``transforms`` lists (OneOf, SomeOf,
Sequential) work the same way. The list becomes an ``A.Compose`` with box-aware
``BboxParams`` via ``A.from_dict``: there is no registry of our own to keep in sync.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np
from albumentations.core.serialization import SERIALIZABLE_REGISTRY

from detector.config import BboxConfig
from detector.core.errors import ConfigError


def _to_album_dict(spec: Any, where: str) -> dict[str, Any]:
    if isinstance(spec, Mapping) and "__class_fullname__" in spec:
        name, params = str(spec["__class_fullname__"]), {k: v for k, v in spec.items() if k != "__class_fullname__"}
    elif isinstance(spec, Mapping) and len(spec) == 1:
        name, params = next(iter(spec.items()))
        params = dict(params or {})
    elif isinstance(spec, str):
        name, params = spec, {}
    else:
        raise ConfigError(f"{where}: a transform is written as {{Name: {{param: value}}}}, got {spec!r}")
    cls = SERIALIZABLE_REGISTRY.get(name) if hasattr(SERIALIZABLE_REGISTRY, "get") else None
    if cls is None:
        try:
            cls = SERIALIZABLE_REGISTRY[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(SERIALIZABLE_REGISTRY), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown Albumentations transform '{name}'{hint}") from None
    if "p" not in params:
        # from_dict would default p to 0.5 for every transform; use the class's own default.
        default = inspect.signature(cls.__init__).parameters.get("p")
        if default is not None and default.default is not inspect.Parameter.empty:
            params["p"] = default.default
    if "transforms" in params:
        params["transforms"] = [
            _to_album_dict(t, f"{where}.{name}.transforms[{i}]") for i, t in enumerate(params["transforms"])
        ]
    return {"__class_fullname__": name, **params}


def build_transform(specs: Sequence[Any], bbox: BboxConfig, where: str = "data.augment") -> A.Compose:
    """Build a box-aware Albumentations pipeline.

    Args:
        specs: the config's list of transforms (may be empty: the pipeline then only checks boxes).
        bbox: BboxParams settings (min_visibility, min_area, clip).
        where: the config key, for error messages.

    Returns:
        An ``A.Compose`` taking ``image``, ``bboxes`` (pascal_voc xyxy, pixels) and ``labels``.

    Raises:
        ConfigError: unknown transforms or parameters, naming the config key.
    """
    transforms = [_to_album_dict(t, f"{where}[{i}]") for i, t in enumerate(specs)]
    serialized = {
        "__version__": A.__version__,
        "transform": {
            "__class_fullname__": "Compose",
            "p": 1.0,
            "transforms": transforms,
            "bbox_params": {
                "format": "pascal_voc",
                "label_fields": ["labels"],
                "min_visibility": bbox.min_visibility,
                "min_area": bbox.min_area,
                "clip": bbox.clip,
                # Clip and filter boxes once, after the last transform, rather than after each one
                # (a third of the cost). min_visibility still compares the final box with the
                # original one; only a box that leaves the image and comes back (a crop followed by
                # a translation) would survive where a per-transform check drops it.
                "check_each_transform": False,
            },
        },
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pipeline = A.from_dict(serialized)
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{where}: cannot build the transform pipeline: {exc}") from None
    for w in caught:
        text = str(w.message)
        if "not valid for transform" in text or "Unknown" in text:
            raise ConfigError(f"{where}: {text}")
    return pipeline  # type: ignore[return-value]


def reseed(pipeline: A.BaseCompose, seed: int) -> None:
    """Seed every transform of the pipeline from one per-sample seed.

    Compose.set_random_seed gives every transform the same seed, which couples their draws
    (a flip with p=0.5 and a jitter with p=0.5 would always fire together); here each
    transform, in depth-first order, gets its own seed derived from the sample's.
    """
    counter = 0

    def visit(t: Any) -> None:
        nonlocal counter
        counter += 1
        t.set_random_seed((seed * 0x9E3779B1 + counter * 0x85EBCA6B) & 0xFFFFFFFF)
        if isinstance(t, A.BaseCompose):
            for child in t.transforms:
                visit(child)

    visit(pipeline)


def apply(
    pipeline: A.BaseCompose | None, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the pipeline on one sample; boxes come back as float32 (n, 4), labels int64 (n,)."""
    if pipeline is None:
        return image, boxes, labels
    if seed is not None:
        reseed(pipeline, seed)
    out = pipeline(image=image, bboxes=boxes, labels=labels)
    return (
        out["image"],
        np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4),
        np.asarray(out["labels"], dtype=np.int64).reshape(-1),
    )
