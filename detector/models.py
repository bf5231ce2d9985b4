"""The model zoo: plain builder functions in a plain dict, pretrained weights, a new head for K classes.

``build_model`` builds a torchvision detector by name, loads the requested weights (torchvision's
pretrained COCO weights, a weights file, or one of our own best.pt files) and gives it a box
predictor for the dataset's K classes (+ background).
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models import detection as D
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detector.config import ModelConfig


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be had or do not fit the model."""


def _resnet_fpn(depth: int) -> Callable[..., D.FasterRCNN]:
    """A Faster R-CNN on a ResNet-18/34 + FPN (torchvision has no detection weights for these).

    From scratch its norm layers are trainable BatchNorm; with an ImageNet backbone they are
    frozen, as torchvision does for small detection batches. The FPN width, the stages it reads
    and the box-head width are settings: a narrow FPN on stages 2-4 is several times cheaper on
    a CPU, which is what the built-in demo uses.
    """

    def build(
        *,
        weights: Any,
        weights_backbone: Any,
        num_classes: int,
        trainable_backbone_layers: int | None,
        returned_layers: list[int] | None = None,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        **kw: Any,
    ) -> D.FasterRCNN:
        if weights is not None:
            raise WeightsError(
                f"fasterrcnn_resnet{depth}_fpn has no pretrained detection weights in torchvision; use "
                "model.weights=null (with model.weights_backbone=DEFAULT for an ImageNet backbone) or a weights file"
            )
        wb = get_model_weights(f"resnet{depth}").verify(weights_backbone) if weights_backbone else None
        norm = nn.BatchNorm2d if wb is None else FrozenBatchNorm2d
        net = getattr(tv_models, f"resnet{depth}")(weights=wb, norm_layer=norm)
        trainable = trainable_backbone_layers if trainable_backbone_layers is not None else (5 if wb is None else 3)
        train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: trainable + (trainable == 5)]
        for name, p in net.named_parameters():
            if not any(name.startswith(t) for t in train_prefixes):
                p.requires_grad_(False)
        stages = list(returned_layers) if returned_layers else [1, 2, 3, 4]
        backbone = BackboneWithFPN(
            net,
            {f"layer{k}": str(i) for i, k in enumerate(stages)},
            [64 * 2 ** (k - 1) for k in stages],
            fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        if "rpn_anchor_generator" not in kw:  # 32 px at stride 4, doubling per level
            sizes = tuple((32 * 2 ** (k - 1),) for k in [*stages, stages[-1] + 1])
            kw["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        predictor = FastRCNNPredictor(representation_size, num_classes)
        return D.FasterRCNN(backbone, num_classes=None, box_head=head, box_predictor=predictor, **kw)

    return build


# name -> (builder, weights enum or None). Builders take torchvision's keyword arguments.
MODELS: dict[str, tuple[Callable[..., nn.Module], type[WeightsEnum] | None]] = {
    "fasterrcnn_mobilenet_v3_large_fpn": (
        D.fasterrcnn_mobilenet_v3_large_fpn,
        D.FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        D.fasterrcnn_mobilenet_v3_large_320_fpn,
        D.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    ),
    "fasterrcnn_resnet50_fpn": (D.fasterrcnn_resnet50_fpn, D.FasterRCNN_ResNet50_FPN_Weights),
    "fasterrcnn_resnet50_fpn_v2": (D.fasterrcnn_resnet50_fpn_v2, D.FasterRCNN_ResNet50_FPN_V2_Weights),
    "fasterrcnn_resnet18_fpn": (_resnet_fpn(18), None),
    "fasterrcnn_resnet34_fpn": (_resnet_fpn(34), None),
}

OWN_BUILDERS = ("fasterrcnn_resnet18_fpn", "fasterrcnn_resnet34_fpn")


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


def _torchvision_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "box_detections_per_img": cfg.box_detections_per_img,
        "box_score_thresh": cfg.box_score_thresh,
        "box_batch_size_per_image": cfg.box_batch_size_per_image,
        "rpn_batch_size_per_image": cfg.rpn_batch_size_per_image,
        "rpn_pre_nms_top_n_test": cfg.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": cfg.rpn_post_nms_top_n_test,
    }
    if cfg.min_size is not None:
        kw["min_size"] = cfg.min_size
    if cfg.max_size is not None:
        kw["max_size"] = cfg.max_size
    if cfg.anchor_sizes is not None:
        sizes = tuple(tuple(int(s) for s in level) for level in cfg.anchor_sizes)
        kw["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return kw


def replace_box_predictor(model: nn.Module, num_classes: int) -> None:
    """A fresh box predictor for num_classes objects (+ background)."""
    head = model.roi_heads.box_predictor
    model.roi_heads.box_predictor = FastRCNNPredictor(head.cls_score.in_features, num_classes + 1)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a weights file with ``weights_only=True``; a clear error when it is bad.

    Raises:
        WeightsError: missing, truncated or corrupt files, and files holding pickled objects.
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
    return data


def _load_file(model: nn.Module, path: str, num_classes: int, class_names: list[str] | None, log) -> None:
    data = read_checkpoint(path)
    state = data.get("model", data)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    theirs_names = data.get("label_map", {}).get("names") if isinstance(data.get("label_map"), dict) else None
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if theirs_names is not None and class_names is not None and list(theirs_names) != list(class_names):
        skipped = sorted(set(skipped) | {k for k in state if k.startswith("roi_heads.box_predictor.")})
    if skipped:
        if not all(k.startswith("roi_heads.box_predictor.") for k in skipped):
            bad = [k for k in skipped if not k.startswith("roi_heads.box_predictor.")]
            raise WeightsError(f"{path}: weights do not fit model (shape mismatch in {bad[:5]}); wrong model.name?")
        log(
            f"warning: {path} was trained for other classes "
            f"({theirs_names if theirs_names is not None else 'a different number'}); "
            f"the box predictor is re-initialised for {num_classes} classes"
        )
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("roi_heads.box_predictor.")]
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
        cfg: model.* settings (name, weights, sizes, head settings).
        num_classes: K, the dataset's classes; the model predicts K + 1 (with background).
        class_names: the dataset's class names, to tell whether a best.pt matches them.
        log: where warnings go (the main process's print).

    Raises:
        WeightsError: unknown model, weights that cannot be downloaded (with what to do about
            it) or that do not fit.
    """
    if cfg.name not in MODELS:
        import difflib

        close = difflib.get_close_matches(cfg.name, list(MODELS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise WeightsError(f"unknown model.name '{cfg.name}'{hint}; available: {', '.join(MODELS)}")
    builder, weights_enum = MODELS[cfg.name]
    kw = _torchvision_kwargs(cfg)
    if cfg.name in OWN_BUILDERS:
        kw.update(
            returned_layers=cfg.returned_layers,
            fpn_channels=cfg.fpn_channels,
            representation_size=cfg.representation_size,
        )
    weights, from_file = cfg.weights, _is_file(cfg.weights)
    pretrained = weights is not None and not from_file
    backbone = cfg.weights_backbone if not pretrained else None
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
        model = builder(
            weights=entry,
            weights_backbone=backbone,
            num_classes=91 if entry is not None else num_classes + 1,
            trainable_backbone_layers=cfg.trainable_backbone_layers,
            **kw,
        )
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
        replace_box_predictor(model, num_classes)
    if from_file:
        _load_file(model, str(weights), num_classes, class_names, log)
    return model


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(min_size, max_size) of the model's own resize."""
    t = model.transform
    return int(t.min_size[-1]), int(t.max_size)
