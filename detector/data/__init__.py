"""Data: COCO index and dataset, Albumentations pipelines, samplers, the demo dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from detector.config import Config, DataConfig
from detector.core import storage
from detector.core.errors import MAX_LISTED, DatasetError
from detector.data.coco import CocoDetection, CocoIndex, LabelMap
from detector.data.synthetic import ensure_dataset
from detector.data.transforms import build_transform

__all__ = ["CocoDetection", "CocoIndex", "DatasetError", "LabelMap", "Splits", "build_datasets", "load_splits"]


@dataclass
class Splits:
    """The validated train and val indexes and their image roots."""

    train: CocoIndex
    val: CocoIndex
    train_root: Path | str  # a folder, or an fsspec URL prefix (str)
    val_root: Path | str


def check_files(index: CocoIndex, root: Path | str, cfg: DataConfig) -> list[str]:
    """Act on what the index's file scan found (every missing/unreadable file, size mismatches).

    Returns the problems that were tolerated (and their images dropped, counted); raises
    DatasetError when any is fatal under the config's settings.
    """
    found = index.files
    problems: list[str] = []
    if found.get("missing"):
        listed = "\n".join(f"  - {p}" for _, p in found["missing"][:MAX_LISTED])
        more = f"\n  ... and {len(found['missing']) - MAX_LISTED} more" if len(found["missing"]) > MAX_LISTED else ""
        raise DatasetError(
            f"{index.path}: {len(found['missing'])} of {len(index)} image files are missing under {storage.redact(root)}:\n{listed}{more}"
        )
    for kind, setting in (
        ("too_large", cfg.on_invalid == "repair"),
        ("unreadable", cfg.on_corrupt_image == "skip"),
        ("size_mismatch", cfg.on_invalid == "repair"),
    ):
        items = found.get(kind, [])
        if items and not setting:
            listed = "\n".join(f"  - {m}" for _, m in items[:MAX_LISTED])
            more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            fix = {
                "unreadable": "data.on_corrupt_image=skip",
                "too_large": "data.max_image_pixels higher if they are real, or data.on_invalid=repair (drops them)",
            }.get(kind, "data.on_invalid=repair (drops them)")
            raise DatasetError(
                f"{index.path}: {len(items)} image(s) {kind.replace('_', ' ')}:\n{listed}{more}\n(set {fix})"
            )
        problems.extend(m for _, m in items)
    bad = sorted({i for kind in ("unreadable", "size_mismatch", "too_large") for i, _ in found.get(kind, [])})
    if bad:
        index.drop_images(bad, "images unreadable or of another size than the json says dropped")
    return problems


def _needs_masks(cfg: Config) -> bool:
    """Whether the model trains on instance masks (only then are they read)."""
    from detector.models.zoo import all_models

    fam = all_models().get(cfg.model.name)
    return bool(fam is not None and fam.masks)


def header_progress(enabled: bool, interval: float = 30.0, desc: str = "reading image headers") -> Callable:
    """A progress wrapper for the start-up header scan (``CocoIndex(progress=...)``): one bar per
    split, on the main process (the scan of an object-store prefix takes a while)."""
    from detector.core import progress

    def wrap(iterable, total):
        bar = progress.progress(enabled, total=total, desc=desc, unit="img", interval=interval)
        try:
            for item in iterable:
                bar.update(1)
                yield item
        finally:
            bar.close()

    return wrap


def load_splits(cfg: Config, log: Callable[[str], None] = print, progress: Callable | None = None) -> Splits:
    """Validate both splits (generating the demo data first when configured).

    The label map comes from the training split; the validation split is read with it.
    """
    d = cfg.data
    if d.synthetic.enabled:
        s = d.synthetic
        paths = ensure_dataset(s.root, s.num_train, s.num_val, s.seed)
        train_ann, val_ann = paths["train"], paths["val"]
        train_root, val_root = Path(s.root) / "train", Path(s.root) / "val"
    else:
        train_ann, val_ann = storage.local_or_url(d.train.annotations), storage.local_or_url(d.val.annotations)  # type: ignore[arg-type]
        train_root, val_root = storage.local_or_url(d.train.images), storage.local_or_url(d.val.images)  # type: ignore[arg-type]
    masks = _needs_masks(cfg)
    if cfg.eval.best_metric.startswith("val/segm/") and not masks:
        from detector.core.errors import ConfigError

        raise ConfigError(
            f"eval.best_metric={cfg.eval.best_metric} is a mask (segm) stat, but model.name={cfg.model.name} "
            "predicts no masks; use a box stat (e.g. val/mAP) or a Mask R-CNN model (maskrcnn_*)"
        )
    Image.MAX_IMAGE_PIXELS = d.max_image_pixels  # PIL's own bomb check follows the same limit
    opts = {
        "max_pixels": d.max_image_pixels,
        "on_invalid": d.on_invalid,
        "allow_outside_root": d.allow_outside_root,
        "read_headers": d.check_images,
        "progress": progress,
        "masks": masks,
    }
    train = CocoIndex(train_ann, drop_empty=d.drop_empty, images_root=train_root, **opts)
    val = CocoIndex(val_ann, label_map=train.label_map, label_source=str(train_ann), images_root=val_root, **opts)
    for index, root in ((train, train_root), (val, val_root)):
        for problem in check_files(index, root, d):
            log(f"warning: {problem}")
        log(index.summary())
    return Splits(train, val, train_root, val_root)


def build_datasets(
    splits: Splits, cfg: DataConfig, model_size: tuple[int, int] | None
) -> tuple[CocoDetection, CocoDetection]:
    """Train and val datasets with their Albumentations pipelines."""
    train_tf = build_transform(cfg.augment, cfg.bbox, "data.augment")
    val_tf = build_transform(cfg.val_augment, cfg.bbox, "data.val_augment") if cfg.val_augment else None
    size = model_size if cfg.draft_decode else None
    if cfg.tile.size:  # overlapping full-resolution crops (data/tiles.py); validation keeps whole images
        from detector.data.tiles import TiledDataset

        t = cfg.tile
        args = (t.size, t.overlap, t.min_visibility, cfg.on_corrupt_image, t.cache_images)
        tiled = TiledDataset(splits.train, splits.train_root, train_tf, *args)
        return tiled, CocoDetection(splits.val, splits.val_root, val_tf, size, cfg.on_corrupt_image)  # type: ignore[return-value]
    return (
        CocoDetection(splits.train, splits.train_root, train_tf, size, cfg.on_corrupt_image),
        CocoDetection(splits.val, splits.val_root, val_tf, size, cfg.on_corrupt_image),
    )
