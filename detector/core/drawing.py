"""Drawing: detections on images with torchvision's drawing utilities, and matplotlib figures saved without a screen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no screen needed: SLURM nodes, CI, containers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (a temporary file renamed over ``path``) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    tmp.replace(path)
    return path


def draw_detections(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    scores: Sequence[float] | None = None,
    color: str | None = None,
    width: int = 2,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boxes with class names (and scores) drawn on a uint8 CHW image (torchvision's drawing);
    ``masks`` (n, H, W), when given, are filled in the boxes' colours under them."""
    if len(boxes) == 0:
        return image
    text = [
        class_names[int(lab) - 1] + (f" {float(scores[i]):.2f}" if scores is not None else "")
        for i, lab in enumerate(labels)
    ]
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    colors = color or [palette[(int(lab) - 1) % len(palette)] for lab in labels]
    if masks is not None and len(masks):
        image = draw_segmentation_masks(image, masks.bool().cpu(), alpha=0.45, colors=colors)
    return draw_bounding_boxes(image, boxes.float(), labels=text, colors=colors, width=width)
