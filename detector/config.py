"""One typed, frozen configuration for a run: YAML file + ``key=value`` overrides.

The schema is a tree of frozen dataclasses. OmegaConf merges the YAML file and the command-line
overrides onto it, so unknown keys and values of the wrong type are errors that name the key.
Runtime state (epoch, step, best score) never lives here: it lives in local variables and in
the checkpoint.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detector.core.errors import ConfigError


def _default_train_augment() -> list[Any]:
    # Flip + brightness/contrast jitter: lookup-table cheap next to JPEG decoding, and safe for
    # most datasets. (ColorJitter with hue costs more than the decoding of a 640x360 JPEG.)
    return [
        {"HorizontalFlip": {"p": 0.5}},
        {"RandomBrightnessContrast": {"brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5}},
    ]


@dataclass(frozen=True)
class SplitConfig:
    annotations: str | None = None  # COCO json
    images: str | None = None  # image root; file_name in the json is relative to it


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in demo dataset, generated into ``root`` on first use when ``enabled``."""

    enabled: bool = False
    root: str = "data/demo"
    num_train: int = 384
    num_val: int = 96
    seed: int = 0


@dataclass(frozen=True)
class BboxConfig:
    min_visibility: float = 0.3  # a box cropped to less than this fraction of itself is dropped
    min_area: float = 1.0  # px^2 after augmentation
    clip: bool = True


@dataclass(frozen=True)
class TileConfig:
    """Train on overlapping size x size crops of the full-resolution images (detector/data/tiles.py),
    so small objects in large images are seen at their real pixel size; null size: whole images."""

    size: int | None = None
    overlap: float = 0.2  # a fraction of size
    min_visibility: float = 0.3  # a box cut by a tile's edge to less than this fraction of itself is dropped (counted)
    cache_images: int = 2  # whole decoded images each data worker keeps (W x H x 3 bytes each): tiles reuse them


@dataclass(frozen=True)
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Boxes and annotations not right as written. clip: clip boxes that overhang the image for
    # training (evaluation keeps them as written), stop on what cannot be meant; error: also stop
    # on boxes overhanging > 1 px; repair: clip, and drop what cannot be used. All counted.
    on_invalid: Literal["error", "clip", "repair"] = "clip"
    # Undecodable image files found while training: stop, or skip the image and count it.
    on_corrupt_image: Literal["error", "skip"] = "error"
    drop_empty: bool = False  # drop training images without annotations (they are negatives)
    allow_outside_root: bool = False  # allow absolute file_name or paths with '..'
    check_images: bool = True  # read every image header at start-up (size, EXIF orientation)
    # Images whose header declares more pixels stop the run at start-up (a small file can declare
    # 12000x12000 and take gigabytes to decode); repair drops them, counted.
    max_image_pixels: int = 100_000_000
    # Decode JPEGs at reduced scale (PIL draft) when they are larger than the model input.
    draft_decode: bool = True
    num_workers: int = 2
    aspect_ratio_grouping: bool = True
    augment: list[Any] = field(default_factory=_default_train_augment)  # train pipeline
    val_augment: list[Any] = field(default_factory=list)
    bbox: BboxConfig = field(default_factory=BboxConfig)
    tile: TileConfig = field(default_factory=TileConfig)


@dataclass(frozen=True)
class ModelConfig:
    """The detector. Family settings left at null keep torchvision's own tuned default for the
    chosen model; a setting given for a family that does not take it is an error naming it."""

    name: str = "fasterrcnn_mobilenet_v3_large_fpn"
    weights: str | None = "DEFAULT"  # DEFAULT | null | a weights file | one of our best.pt
    weights_backbone: str | None = None  # backbone-only pretrained weights (DEFAULT | null)
    trainable_backbone_layers: int | None = None
    min_size: int | None = None  # shorter side the model resizes to (not SSD: fixed size)
    max_size: int | None = None  # cap on the longer side (not SSD)
    anchor_sizes: list[list[int]] | None = None  # per FPN level (R-CNN, RetinaNet, FCOS)
    box_score_thresh: float | None = None  # detections kept above this score (every family)
    box_nms_thresh: float | None = None  # every family
    box_detections_per_img: int | None = None  # every family
    topk_candidates: int | None = None  # per level before NMS (RetinaNet, FCOS, SSD)
    box_batch_size_per_image: int | None = None  # R-CNN: sampled proposals per image in training
    rpn_batch_size_per_image: int | None = None  # R-CNN
    rpn_pre_nms_top_n_test: int | None = None  # R-CNN
    rpn_post_nms_top_n_test: int | None = None  # R-CNN
    # Only for our from-scratch builders (*_resnet18_fpn, *_resnet34_fpn):
    returned_layers: list[int] | None = None  # ResNet stages fed to the FPN
    fpn_channels: int | None = None  # FPN width (256)
    representation_size: int | None = None  # R-CNN: width of the box head's two MLP layers (1024)
    # D-FINE and RT-DETRv2 (detector[transformers]):
    image_size: int | None = None  # the square side images are stretched to (a multiple of 32; 640)
    num_queries: int | None = None  # object queries (300; dfine_tiny 50)
    hidden_dim: int | None = None  # dfine_tiny only: encoder and decoder width (64)
    decoder_layers: int | None = None  # dfine_tiny only: decoder layers (2)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02  # at reference_batch_size; scaled linearly with the global batch
    reference_batch_size: int = 16
    scale_lr: bool = True
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0  # norm layers and biases
    backbone_lr_factor: float = 1.0  # the backbone's lr is this times optim.lr (0.1 in the DETR recipes)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    # Linear warmup: a number of optimizer steps, or null for warmup_fraction of the run's steps
    # capped at warmup_max_steps (so a short fine-tune is not mostly warmup).
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05
    warmup_max_steps: int = 1000
    warmup_factor: float = 0.001
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])  # fractions of the run
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 4  # per process
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    # no | fp16 | bf16, or null (default): what the launcher says (`accelerate launch
    # --mixed_precision` or its config file), else no. A value set in both places must agree.
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    seed: int = 42
    resume: str | None = None  # auto | PATH | null
    checkpoint_every_steps: int = 0  # also save a resumable state every N optimizer steps (0: off)
    checkpoint_every_epochs: int = 1  # save a resumable state every N epochs (and always at the end)
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 20  # stop after this many non-finite losses in a row
    time_limit_minutes: float = 0.0  # 0: no limit; else stop (with a checkpoint) after this long
    # How long a process waits in a collective (all-reduce, barrier) for the others before it
    # gives up: a process that died or hangs on another node then ends the run in minutes, not
    # after torch's 30-minute default. Raise it if one process legitimately works alone longer.
    dist_timeout_minutes: float = 10.0
    threads: int = 0  # torch intra-op threads per process; 0: the usable CPUs / processes on this machine
    # An exponential moving average of the weights: what validation scores and best.pt/last.pt hold.
    ema: bool = False
    ema_decay: float = 0.999


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: int = 1
    batch_size: int = 4  # per process
    # auto: faster-coco-eval (the same 12 statistics, several times faster) where it imports, else pycocotools
    backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"
    best_metric: str = "val/mAP"  # val/loss, val/loss_<part>, val/<COCO stat> or val/AP/<class name>
    best_mode: Literal["max", "min"] | None = None  # null: min for losses, max for the rest
    early_stop_patience: int = 0  # stop after this many evaluations without a better best_metric (0: off)
    # Error analysis at every evaluation (detector/evaluation/analysis.py): analysis.json (+ analysis_best.json)
    # and W&B tables; one more COCOeval pass per evaluation. With logging.plots, its PNGs in
    # plots/analysis/, drawn at the last evaluation (last), also when best.pt changes (best), or at
    # every evaluation (every).
    analysis: bool = True
    analysis_plots: Literal["last", "best", "every"] = "last"
    analysis_iou: float = 0.5  # IoU for a match in the confusion matrix and the per-class P/R/F1
    analysis_score: float = 0.25  # score threshold of the confusion matrix and the galleries
    analysis_gallery: int = 8  # images per gallery of worst images (0: no galleries)


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    project: str = "detector"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = "online"
    log_checkpoint: bool = False
    # The train and val json as a W&B dataset artifact of this name, declared as the run's input
    # (stored once per content); null: not logged (the fingerprint is recorded either way).
    dataset_artifact: str | None = None
    num_images: int = 8
    # The longest W&B may hold training up: connecting at the start (past it the run logs
    # offline, to be uploaded later with `wandb sync`) and uploading at the end.
    timeout_s: float = 60.0


@dataclass(frozen=True)
class LoggingConfig:
    log_every_steps: int = 10
    plots: bool = True
    num_plot_images: int = 8
    progress: bool = True
    progress_interval_s: float = 30.0  # where stderr is not a terminal: one plain progress line per interval
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/exp"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        sub = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if is_dataclass(sub):
            keys.extend(_all_keys(type(sub), key + "."))
    return keys


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    hint = ""
    if "not in" in msg or "Key" in type(exc).__name__:
        close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
        if not close:  # a typo in the last part only: compare with siblings
            parent, _, leaf = key.rpartition(".")
            sibs = [k for k in _all_keys(Config) if k.rpartition(".")[0] == parent]
            close = difflib.get_close_matches(f"{parent}.{leaf}".strip("."), sibs, n=1, cutoff=0.3)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    return ConfigError(f"{source}: bad value for '{key}': {msg}")


# Keys a family recipe fills together or not at all: one of them set by the user keeps all of
# them at the schema's defaults (an optim.lr is meant for its optimizer and reference batch).
RECIPE_UNITS = ({"optim.name", "optim.lr", "optim.reference_batch_size"},)


def _dotted(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key a YAML tree sets (its leaves and the paths to them)."""
    if not isinstance(node, dict):
        return {prefix} if prefix else set()
    keys = {prefix} if prefix else set()
    for k, v in node.items():
        keys |= _dotted(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def load(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    recipe: Callable[[str], dict[str, Any]] | None = None,
) -> Config:
    """Build the run's configuration.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: ``key=value`` strings (dotted keys) applied after the file.
        recipe: model.name -> the family's training defaults (dotted keys -> values), which
            replace the schema's defaults for the keys neither the file nor an override sets
            (``detector.models.zoo.recipe``; tools/train.py passes it).

    Returns:
        The frozen, validated Config. Which ``model.*`` keys a model takes is its family's to say:
        ``detector.models.zoo.check_keys`` (called by ``build_model`` and by tools/train.py
        right after loading) refuses the others; the config layer imports no model code.

    Raises:
        ConfigError: on a missing file, an unknown key or a value of the wrong type.
    """
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)
    merged: DictConfig = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in many types
            raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from None
    user = _dotted(OmegaConf.to_container(loaded)) if path is not None else set()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            given = OmegaConf.from_dotlist([item])
            merged = OmegaConf.merge(merged, given)
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override '{item}'") from None
        user |= _dotted(OmegaConf.to_container(given))
    fills = recipe(str(merged.model.name)) if recipe else {}
    for group in RECIPE_UNITS:  # set together or not at all: an lr is given for a reference batch and an optimizer
        if user & group:
            fills = {k: v for k, v in fills.items() if k not in group}
    for key, value in fills.items():
        if key not in user:
            *parents, leaf = key.split(".")
            node: dict[str, Any] = {leaf: value}
            for part in reversed(parents):
                node = {part: node}
            merged = OmegaConf.merge(merged, node)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path or "config")) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that types alone cannot express; raises ConfigError naming the key."""
    checks = [
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.data.tile.size is None or cfg.data.tile.size >= 16, "data.tile.size must be >= 16 px (or null: off)"),
        (0 <= cfg.data.tile.overlap < 1, "data.tile.overlap must be in [0, 1)"),
        (0 <= cfg.data.tile.min_visibility <= 1, "data.tile.min_visibility must be in [0, 1]"),
        (cfg.data.tile.cache_images >= 0, "data.tile.cache_images must be >= 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
        (cfg.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.backbone_lr_factor > 0, "optim.backbone_lr_factor must be > 0"),
        (cfg.optim.reference_batch_size >= 1, "optim.reference_batch_size must be >= 1"),
        (cfg.optim.warmup_steps is None or cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0 or null"),
        (0 <= cfg.optim.warmup_fraction < 1, "optim.warmup_fraction must be in [0, 1)"),
        (cfg.optim.warmup_max_steps >= 0, "optim.warmup_max_steps must be >= 0"),
        (0 < cfg.optim.warmup_factor <= 1, "optim.warmup_factor must be in (0, 1]"),
        (len(cfg.optim.betas) == 2, "optim.betas must hold two numbers"),
        (all(0 < m < 1 for m in cfg.optim.milestones), "optim.milestones are fractions in (0, 1)"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.checkpoint_every_epochs >= 1, "train.checkpoint_every_epochs must be >= 1"),
        (0 < cfg.train.ema_decay < 1, "train.ema_decay must be in (0, 1)"),
        (cfg.eval.early_stop_patience >= 0, "eval.early_stop_patience must be >= 0"),
        (0 < cfg.eval.analysis_iou <= 1, "eval.analysis_iou must be in (0, 1]"),
        (0 <= cfg.eval.analysis_score <= 1, "eval.analysis_score must be in [0, 1]"),
        (cfg.train.dist_timeout_minutes > 0, "train.dist_timeout_minutes must be > 0"),
        (cfg.logging.wandb.timeout_s > 0, "logging.wandb.timeout_s must be > 0"),
        (cfg.eval.analysis_gallery >= 0, "eval.analysis_gallery must be >= 0"),
        (
            cfg.model.min_size is None or cfg.model.max_size is None or cfg.model.min_size <= cfg.model.max_size,
            "model.min_size must be <= model.max_size",
        ),
        (
            cfg.logging.wandb.dataset_artifact is None
            or re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.logging.wandb.dataset_artifact) is not None,
            "logging.wandb.dataset_artifact: a W&B artifact name has only letters, digits, '-', '_' and '.'",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_metric_name(cfg.eval.best_metric)
    if not cfg.data.synthetic.enabled:
        from detector.core import storage

        for split in ("train", "val"):
            s = getattr(cfg.data, split)
            if not s.annotations or not s.images:
                raise ConfigError(
                    f"data.{split}.annotations and data.{split}.images must be set "
                    f"(e.g. data.{split}.annotations=path/to/{split}.json data.{split}.images=path/to/images)"
                )
            for key in ("annotations", "images"):  # before config.yaml is written into the run directory
                try:
                    storage.check_url(getattr(s, key), f"data.{split}.{key}")
                except storage.StorageError as exc:
                    raise ConfigError(str(exc)) from None


COCO_STATS = (
    "mAP",
    "mAP50",
    "mAP75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def check_metric_name(name: str, class_names: list[str] | None = None) -> None:
    """Raise ConfigError unless ``name`` is a metric validation reports (eval.best_metric).

    Args:
        name: e.g. val/mAP, val/loss, val/loss_classifier, val/AP/<class>; masks: val/segm/mAP,
            val/segm/AP/<class>.
        class_names: the dataset's classes, to check val/AP/<class> (skipped when None).
    """
    fixed = ["val/loss", *(f"val/{s}" for s in COCO_STATS), *(f"val/segm/{s}" for s in COCO_STATS)]
    if name in fixed or (name.startswith("val/loss_") and len(name) > len("val/loss_")):
        return
    if name.startswith(("val/AP/", "val/segm/AP/")):
        if class_names is None or name.split("/AP/", 1)[1] in class_names:
            return
        close = difflib.get_close_matches(name, [f"val/AP/{c}" for c in class_names], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"eval.best_metric: '{name}' names no class of the dataset{hint}; classes: {class_names}")
    close = difflib.get_close_matches(name, fixed, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"eval.best_metric: unknown metric '{name}'{hint}; use val/loss, val/loss_<part>, "
        f"val/<{'|'.join(COCO_STATS)}>, val/AP/<class name> or (Mask R-CNN) val/segm/<stat>, val/segm/AP/<class name>"
    )


def best_mode(cfg: EvalConfig) -> str:
    """eval.best_mode, or when null: min for loss metrics, max for the rest."""
    if cfg.best_mode is not None:
        return cfg.best_mode
    return "min" if cfg.best_metric.startswith("val/loss") else "max"


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain Python data (for checkpoints, W&B and config.yaml)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. from a checkpoint), tolerating new keys."""
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)
    known = set(_all_keys(Config))

    def prune(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if key not in known:
                continue
            out[k] = (
                prune(v, key + ".") if isinstance(v, dict) and key + "." in {kk[: len(key) + 1] for kk in known} else v
            )
        return out

    return OmegaConf.to_object(OmegaConf.merge(schema, prune(data)))  # type: ignore[return-value]


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))


load_config = load  # the public name (detector.load_config)
