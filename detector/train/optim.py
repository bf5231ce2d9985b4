"""Optimizer and learning-rate schedule.

The peak learning rate is ``optim.lr`` at ``optim.reference_batch_size`` and scales linearly
with the global batch (processes x batch x accumulation steps). Norm layers and biases get
``optim.norm_weight_decay`` (0 by default). The schedule is a per-step LambdaLR: linear warmup,
then cosine, multistep or constant, so that it resumes exactly from its state dict.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from detector.config import OptimConfig

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The peak learning rate for a global batch size (linear scaling rule)."""
    return cfg.lr * global_batch / cfg.reference_batch_size if cfg.scale_lr else cfg.lr


def is_backbone(module_name: str) -> bool:
    """A module of the feature extractor: under torchvision's ``backbone.body`` (or SSD's
    ``backbone.features``), or a transformers model's ``model.backbone``; not an FPN or SSD's
    extra layers, which start from scratch."""
    parts = module_name.split(".")
    if "backbone" not in parts:
        return False
    at = parts.index("backbone")
    return parts[at + 1 : at + 2] not in (["fpn"], ["extra"])


def param_groups(
    model: nn.Module, weight_decay: float, norm_weight_decay: float, backbone_lr_factor: float = 1.0
) -> list[dict]:
    """Two groups: weights with decay; norm-layer parameters and biases with norm_weight_decay.
    With a backbone_lr_factor other than 1, the backbone's two come after them with
    ``lr_factor`` (their lr is that times the peak lr, through warmup, schedule and resume)."""
    groups: dict[tuple[bool, bool], list] = {(b, n): [] for b in (False, True) for n in (False, True)}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_norm = isinstance(module, _NORMS) or "FrozenBatchNorm" in type(module).__name__
            backbone = backbone_lr_factor != 1.0 and is_backbone(module_name)
            groups[(backbone, is_norm or name == "bias")].append(p)
    out = [
        {"params": groups[(False, False)], "weight_decay": weight_decay},
        {"params": groups[(False, True)], "weight_decay": norm_weight_decay},
    ]
    if backbone_lr_factor != 1.0:
        out += [
            {"params": groups[(True, False)], "weight_decay": weight_decay, "lr_factor": backbone_lr_factor},
            {"params": groups[(True, True)], "weight_decay": norm_weight_decay, "lr_factor": backbone_lr_factor},
        ]
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW over the model's trainable parameters; a group with an
    ``lr_factor`` (the backbone's) starts at that times lr."""
    groups = param_groups(model, cfg.weight_decay, cfg.norm_weight_decay, cfg.backbone_lr_factor)
    for g in groups:
        if "lr_factor" in g:
            g["lr"] = lr * g["lr_factor"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.betas[0], cfg.betas[1]))


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """optim.warmup_steps, or when null: warmup_fraction of the run, at most warmup_max_steps.

    A fixed count does not fit every run: 200 steps are a third of a 50-image fine-tune and
    nothing on COCO. The result never reaches the run's last step.
    """
    if cfg.warmup_steps is not None:
        n = cfg.warmup_steps
    else:
        n = min(round(cfg.warmup_fraction * total_steps), cfg.warmup_max_steps)
    return min(n, max(total_steps - 1, 0))


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at an optimizer step (0-based)."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        alpha = step / warmup
        return cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "multistep":
        passed = sum(step >= int(m * total_steps) for m in cfg.milestones)
        return cfg.gamma**passed
    progress = (step - warmup) / max(1, total_steps - warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Per-step schedule: warmup, then cosine / multistep / constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of the model's weights and buffers (torch's AveragedModel).

    The decay warms up as (1 + n) / (10 + n) after n updates until it reaches ``decay``, so a
    short run's average is not dominated by its first, random weights.

    Args:
        model: the unwrapped model (its current weights start the average).
        decay: the final decay, e.g. 0.999 (about the last 1000 steps).
    """

    def avg(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1.0 + n) / (10.0 + n), max=decay).to(
            averaged.dtype if averaged.is_floating_point() else torch.float32
        )
        return averaged * d + current * (1 - d)

    return torch.optim.swa_utils.AveragedModel(model, avg_fn=avg, use_buffers=True)
