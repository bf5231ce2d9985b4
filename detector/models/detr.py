"""D-FINE and RT-DETRv2 (Hugging Face transformers) behind torchvision's detector interface.

These models take a batch of images resized to one square and return, per query, class logits
(sigmoid, one per class, no background) and a box as normalised (cx, cy, w, h). torchvision's
detectors resize, normalise and post-process inside; so does ``DetrDetector`` here, so the
loop, validation, evaluation, the Predictor and the tools call it like any other family:

- ``SquareResize`` (the model's ``transform``) stretches each float RGB image in [0, 1] to
  ``model.image_size`` x ``model.image_size`` (bilinear with antialiasing, as the models' own
  image processor, ``RTDetrImageProcessor``, does; no normalisation, as it does);
- ``to_hf_targets``: our boxes (xyxy in the image's pixels, labels 1..K) become the models'
  ``class_labels`` (0..K-1) and normalised (cx, cy, w, h) boxes;
- ``postprocess``: the top ``box_detections_per_img`` (query, class) pairs by sigmoid score,
  as ``post_process_object_detection`` picks them, above ``box_score_thresh``, become xyxy
  boxes in the image's own pixels with labels 1..K.

Models: ``dfine_{nano,small,medium,large,xlarge}`` and ``rtdetr_v2_{r18,r34,r50,r101}``, whose
architecture and COCO weights come from the Hugging Face hub (``model.weights=DEFAULT``: the COCO
checkpoint with new classification layers; ``null``: the hub's architecture with random
weights), and ``dfine_tiny``, our own narrow D-FINE built here, that learns on a CPU (tests, the
demo). transformers is the optional extra ``detector[transformers]``; nothing else in the
package imports it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from detector.config import ModelConfig
from detector.core.errors import WeightsError
from detector.models.family import Family, loss_key

HUB = {
    "dfine_nano": "ustc-community/dfine-nano-coco",
    "dfine_small": "ustc-community/dfine-small-coco",
    "dfine_medium": "ustc-community/dfine-medium-coco",
    "dfine_large": "ustc-community/dfine-large-coco",
    "dfine_xlarge": "ustc-community/dfine-xlarge-coco",
    "rtdetr_v2_r18": "PekingU/rtdetr_v2_r18vd",
    "rtdetr_v2_r34": "PekingU/rtdetr_v2_r34vd",
    "rtdetr_v2_r50": "PekingU/rtdetr_v2_r50vd",
    "rtdetr_v2_r101": "PekingU/rtdetr_v2_r101vd",
}
OWN = frozenset({"dfine_tiny"})
EXTRA = "pip install 'detector[transformers]'"
# model.* keys these models take; image_size: the square side (a multiple of 32)
KEYS = frozenset({"image_size", "box_score_thresh", "box_detections_per_img", "num_queries"})
OWN_KEYS = frozenset({"hidden_dim", "decoder_layers"})
DEFAULT_SIZE = 640


def transformers_module() -> Any:
    """transformers, or one line naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise WeightsError(f"the D-FINE and RT-DETRv2 models need transformers: {EXTRA}") from None
    return transformers


class SquareResize(nn.Module):
    """The input policy: every image stretched to one square (the models' image processor does
    the same), and boxes mapped back. ``fixed_size``/``min_size``/``max_size`` answer as
    torchvision's SSD transform does (``model_input_size``, reduced-scale decoding)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.fixed_size = (size, size)
        self.min_size = (size,)
        self.max_size = size

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        h, w = self.fixed_size
        return torch.cat(
            [
                F.interpolate(im[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
                for im in images
            ]
        )


def to_hf_targets(
    targets: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]]
) -> list[dict[str, torch.Tensor]]:
    """Our targets (boxes xyxy in pixels of an image of size (h, w), labels 1..K) -> the models'
    labels: class_labels 0..K-1 and boxes (cx, cy, w, h) as fractions of the image."""
    out = []
    for t, (h, w) in zip(targets, sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=t["boxes"].device)
        boxes = box_convert(t["boxes"].float() / scale, "xyxy", "cxcywh")
        out.append({"class_labels": t["labels"].long() - 1, "boxes": boxes})
    return out


def postprocess(
    logits: torch.Tensor, boxes: torch.Tensor, sizes: list[tuple[int, int]], score_thresh: float, top_k: int
) -> list[dict[str, torch.Tensor]]:
    """Per image: the top_k (query, class) pairs by sigmoid score above score_thresh, boxes
    (normalised cxcywh) -> xyxy in the pixels of the image of size (h, w), labels 1..K."""
    logits, boxes = logits.float(), boxes.float()
    _, q, c = logits.shape
    scores, index = torch.sigmoid(logits).flatten(1).topk(min(top_k, q * c), dim=1)
    labels, query = index % c, index // c
    results = []
    for i, (h, w) in enumerate(sizes):
        xyxy = box_convert(boxes[i, query[i]], "cxcywh", "xyxy")
        xyxy = xyxy * torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)
        keep = scores[i] > score_thresh
        results.append({"boxes": xyxy[keep], "scores": scores[i][keep], "labels": labels[i][keep] + 1})
    return results


def loss_parts(loss_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The models' loss terms (already weighted: their sum is the loss), summed per kind over the
    decoder layers, the encoder and the denoising queries (loss_vfl_aux_0, loss_vfl_dn_1 ... ->
    loss_vfl)."""
    parts: dict[str, torch.Tensor] = {}
    for key, value in loss_dict.items():
        found = re.match(r"loss_[a-z0-9]+", key)
        base = found[0] if found else loss_key(key)
        parts[base] = parts[base] + value if base in parts else value
    return parts


class DetrDetector(nn.Module):
    """A transformers DETR-style detector called as torchvision's detectors are: a list of float
    images in [0, 1] (any sizes); in training with targets, a dict of losses; in eval, per image
    boxes (xyxy, the image's pixels), labels (1..K) and scores.

    Attributes:
        model: the transformers model (DFineForObjectDetection, RTDetrV2ForObjectDetection).
        transform: the input policy (SquareResize).
        score_thresh, detections_per_img: what post-processing keeps.
    """

    def __init__(self, model: nn.Module, image_size: int, score_thresh: float, detections_per_img: int) -> None:
        super().__init__()
        self.model = model
        self.transform = SquareResize(image_size)
        self.score_thresh = score_thresh
        self.detections_per_img = detections_per_img
        # training's loss parts (the keys of a step whose boxes were not finite)
        fine = getattr(model.config, "model_type", "") == "d_fine"
        self.loss_keys = ("loss_vfl", "loss_bbox", "loss_giou", *(("loss_fgl", "loss_ddf") if fine else ()))

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_labels)

    def run(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None) -> tuple[Any, list]:
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        pixels = self.transform(images)
        labels = to_hf_targets(targets, sizes) if targets is not None else None
        return self.model(pixel_values=pixels, labels=labels), sizes

    def detections(self, out: Any, sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        return postprocess(out.logits, out.pred_boxes, sizes, self.score_thresh, self.detections_per_img)

    def architecture(self) -> dict[str, Any]:
        """The transformers config as plain data (our weights file keeps it: ``rebuild``)."""
        import json

        return {"transformers_config": json.loads(self.model.config.to_json_string())}

    def train_losses(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict:
        """Training's loss parts. A batch without objects builds no denoising queries, so their
        class embedding gets no gradient: it is added times 0, as DistributedDataParallel needs
        every parameter in every step. Non-finite predicted boxes (HF's GIoU refuses them) give
        non-finite losses with the usual keys, which the loop skips like any other."""
        try:
            out, _ = self.run(images, targets)
        except ValueError as exc:
            if "[x0, y0, x1, y1]" not in str(exc):
                raise
            nan = torch.full((), float("nan"), device=images[0].device, requires_grad=True)
            return {k: nan * 1.0 for k in self.loss_keys}
        parts = loss_parts(out.loss_dict)
        unused = getattr(self.model.model, "denoising_class_embed", None)
        if out.denoising_meta_values is None and unused is not None:
            first = next(iter(parts))
            parts[first] = parts[first] + 0.0 * unused.weight.sum()
        self.loss_keys = tuple(parts)
        return parts

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            return self.train_losses(images, targets)
        out, sizes = self.run(images, None)
        return self.detections(out, sizes)


# -- building ---------------------------------------------------------------------------------------


def _tiny_dfine_config(transformers: Any, num_labels: int, cfg: ModelConfig) -> Any:
    """Our narrow D-FINE for CPUs: a 4-stage HGNetV2 of 32-256 channels feeding strides 16 and 32,
    a 64-wide encoder and 2 decoder layers, 50 queries. Its BatchNorm trains (from scratch)."""
    width = cfg.hidden_dim or 64
    if width % 4 or width < 16:
        raise WeightsError(f"model.hidden_dim={width}: a multiple of 4 (its attention heads), at least 16")
    if cfg.decoder_layers is not None and cfg.decoder_layers < 2:
        raise WeightsError(f"model.decoder_layers={cfg.decoder_layers}: at least 2 (D-FINE refines from layer 2 on)")
    backbone = transformers.HGNetV2Config(
        stem_channels=[3, 16, 16], stage_in_channels=[16, 32, 64, 128], stage_mid_channels=[16, 16, 32, 32],
        stage_out_channels=[32, 64, 128, 256], stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[2, 2, 2, 2],
        stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5], hidden_sizes=[32, 64, 128, 256], out_indices=[3, 4],
        use_learnable_affine_block=True,
    )  # fmt: skip
    return transformers.DFineConfig(
        backbone_config=backbone, num_labels=num_labels, freeze_backbone_batch_norms=False,
        encoder_in_channels=[128, 256], feat_strides=[16, 32], num_feature_levels=2, encode_proj_layers=[1],
        d_model=width, encoder_hidden_dim=width, decoder_in_channels=[width, width], encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width, encoder_attention_heads=4, decoder_attention_heads=4,
        decoder_layers=cfg.decoder_layers or 2, decoder_n_points=[4, 4], num_queries=cfg.num_queries or 50,
        num_denoising=20, depth_mult=0.34, hidden_expansion=0.5, lqe_hidden_dim=16,
    )  # fmt: skip


def _offline(name: str, exc: BaseException) -> WeightsError:
    return WeightsError(
        f"model.name={name}: cannot fetch {HUB[name]} from the Hugging Face hub ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}).\n"
        "  transformers caches it under $HF_HOME/hub (default ~/.cache/huggingface/hub).\n"
        "  Fix one of: connect to the internet once; copy that cache from a machine that has it; set "
        f"model.weights to a folder written by save_pretrained; or train our own from scratch: model.name=dfine_tiny "
        "model.weights=null."
    )


def _hub_errors(transformers: Any) -> tuple[type[BaseException], ...]:
    import huggingface_hub.errors as hub

    return (OSError, ConnectionError, TimeoutError, hub.HfHubHTTPError, hub.LocalEntryNotFoundError)


def _model_class(transformers: Any, config: Any) -> Any:
    return transformers.AutoModelForObjectDetection._model_mapping[type(config)]


MODEL_TYPES = {"dfine": "d_fine", "rtdetr_v2": "rt_detr_v2"}  # model.name prefix -> transformers model_type


def _prepare(config: Any, cfg: ModelConfig, num_labels: int, source: str) -> Any:
    """A transformers config made ours: checked against model.name, num_labels classes, the
    anchors and positional embeddings computed for model.image_size (a config's fixed
    anchor_image_size or eval_size would break any other size in eval), model.num_queries."""
    want = next(t for prefix, t in MODEL_TYPES.items() if cfg.name.startswith(prefix))
    got = getattr(config, "model_type", None)
    if got != want:
        raise WeightsError(f"{source} holds a '{got}' model, not the '{want}' of model.name={cfg.name}")
    if cfg.trainable_backbone_layers is not None:
        raise WeightsError(f"model.trainable_backbone_layers does not apply to {cfg.name}: its backbone trains "
                           "at optim.backbone_lr_factor times the lr")  # fmt: skip
    if cfg.name not in OWN or source != "dfine_tiny":
        given = [k for k in OWN_KEYS if getattr(cfg, k) is not None]
        if given:
            raise WeightsError(f"model.{given[0]} shapes dfine_tiny built from scratch; {source} fixes it")
    config.num_labels = num_labels
    config.id2label = {i: str(i) for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.anchor_image_size = None
    config.eval_size = None
    if cfg.num_queries:  # the queries are picked among the encoder's positions: no weight depends on their number
        config.num_queries = cfg.num_queries
    return config


def pretrained(cfg: ModelConfig, num_classes: int, log: Callable[[str], None]) -> nn.Module:
    """model.weights=DEFAULT (the hub's COCO checkpoint of model.name) or the folder of a
    save_pretrained checkpoint: loaded with new classification layers for num_classes; the
    tensors that could not be kept are named."""
    transformers = transformers_module()
    source = HUB.get(cfg.name) if cfg.weights is None or cfg.weights.upper() == "DEFAULT" else cfg.weights
    if source is None:
        raise WeightsError(f"{cfg.name} has no pretrained weights; use model.weights=null")
    try:
        config = _prepare(transformers.AutoConfig.from_pretrained(source), cfg, num_classes, source)
        model, info = _model_class(transformers, config).from_pretrained(
            source, config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except _hub_errors(transformers) as exc:
        if cfg.weights is not None and cfg.weights.upper() != "DEFAULT":
            raise WeightsError(f"model.weights={cfg.weights}: cannot load it ({exc})") from None
        raise _offline(cfg.name, exc) from None
    heads = tuple(f"{m}." for m in head_modules(model))
    replaced = sorted({k for k, *_ in info.get("mismatched_keys", [])} | set(info.get("missing_keys", [])))
    if any(not k.startswith(heads) for k in replaced):
        bad = [k for k in replaced if not k.startswith(heads)]
        raise WeightsError(f"{source}: weights do not fit {cfg.name} (missing or other shapes: {bad[:4]})")
    if not replaced:  # as many classes as the checkpoint's: its heads still name its classes, not ours
        fresh = _model_class(transformers, config)(config).state_dict()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k.startswith(heads):
                    v.copy_(fresh[k])
                    replaced.append(k)
    log(f"{source}: new classification layers for {num_classes} classes ({len(replaced)} tensors: "
        f"{', '.join(replaced[:4])}{', ...' if len(replaced) > 4 else ''})")  # fmt: skip
    return _wrap(model, cfg)


def _wrap(model: nn.Module, cfg: ModelConfig) -> DetrDetector:
    size = cfg.image_size or DEFAULT_SIZE
    if size % 32:
        raise WeightsError(f"model.image_size={size}: must be a multiple of 32 (the models' largest stride)")
    strides, queries = list(model.config.feat_strides), int(model.config.num_queries)
    positions = sum((size // s) ** 2 for s in strides)
    if positions < queries:  # the encoder picks the decoder's queries among its positions
        raise WeightsError(
            f"model.image_size={size}: {positions} positions at strides {strides}, fewer than the "
            f"{queries} queries of {cfg.name}; raise model.image_size or lower model.num_queries"
        )
    thresh = cfg.box_score_thresh if cfg.box_score_thresh is not None else 0.0
    top_k = cfg.box_detections_per_img or 100
    return DetrDetector(model, size, thresh, top_k)


def build(cfg: ModelConfig, weights: Any, weights_backbone: Any, num_outputs: int) -> nn.Module:
    """model.weights=null: the architecture with random weights (num_outputs = K + 1 with the
    background, which these models do not predict: K labels)."""
    transformers = transformers_module()
    num_labels = num_outputs - 1
    if weights_backbone is not None:
        raise WeightsError(f"model.weights_backbone does not apply to {cfg.name}: use model.weights=DEFAULT")
    if cfg.name in OWN:
        config = _prepare(_tiny_dfine_config(transformers, num_labels, cfg), cfg, num_labels, cfg.name)
    else:
        try:
            config = _prepare(transformers.AutoConfig.from_pretrained(HUB[cfg.name]), cfg, num_labels, HUB[cfg.name])
        except _hub_errors(transformers) as exc:
            raise _offline(cfg.name, exc) from None
    return _wrap(_model_class(transformers, config)(config), cfg)


def rebuild(architecture: dict[str, Any], cfg: ModelConfig, num_outputs: int) -> nn.Module:
    """The model a weights file of ours records (its transformers config), random weights, no
    network; num_outputs = K + 1."""
    transformers = transformers_module()
    saved = dict(architecture["transformers_config"])
    config = transformers.AutoConfig.for_model(saved.pop("model_type"), **saved)
    # the file's own architecture: its from-scratch keys are in it already
    cfg = dataclasses.replace(cfg, **{k: None for k in OWN_KEYS})
    config = _prepare(config, cfg, num_outputs - 1, "the weights file")
    return _wrap(_model_class(transformers, config)(config), cfg)


def head_modules(model: nn.Module) -> list[str]:
    """The classification layers: the decoder's class heads and the encoder's score head."""
    return [n for n, _ in model.named_modules() if re.search(r"(class_embed|enc_score_head|denoising_class_embed)$", n)]


def replace_head(model: nn.Module, num_classes: int) -> None:  # pretrained() loads with new heads already
    raise NotImplementedError("D-FINE/RT-DETRv2 heads are re-created when the checkpoint is loaded")


def loss_and_detections(model: DetrDetector, images, targets, autocast):
    """Losses and detections from one forward in eval mode (the models compute their loss when
    given labels; without denoising queries in eval)."""
    with autocast():
        out, sizes = model.run(images, targets)
    losses = loss_parts(out.loss_dict) if targets is not None else {}
    return {k: v.float() for k, v in losses.items()}, model.detections(out, sizes)


def recipe(name: str) -> dict[str, Any]:
    """How these models are fine-tuned (the D-FINE and RT-DETRv2 papers' recipes, scaled to our
    linear lr rule): AdamW at 1e-4 for a batch of 16 with the backbone at a tenth, weight decay
    1e-4, gradient clipping at 0.1, weight EMA, no aspect-ratio grouping (one square). dfine_tiny
    learns from scratch: its backbone at the full lr, 5e-4 for a batch of 8."""
    scratch = name in OWN
    return {
        "optim.name": "adamw",
        "optim.lr": 5e-4 if scratch else 1e-4,
        "optim.reference_batch_size": 8 if scratch else 16,
        "optim.backbone_lr_factor": 1.0 if scratch else 0.1,
        "optim.weight_decay": 1e-4,
        "train.clip_grad_norm": 0.1,
        "train.ema": True,
        "data.aspect_ratio_grouping": False,
    }


MODELS = {name: (build, None) for name in [*HUB, *OWN]}

FAMILY = Family(
    name="DETR (D-FINE, RT-DETRv2)",
    model_type=DetrDetector,
    models=MODELS,
    own_models=OWN,
    keys=KEYS,
    own_keys=OWN_KEYS,
    build=build,
    head_modules=head_modules,
    replace_head=replace_head,
    loss_and_detections=loss_and_detections,
    pretrained=pretrained,
    rebuild=rebuild,
    recipe=recipe,
)
