"""Mask parity of an exported Mask R-CNN: the IoU of the exported graph's masks with eager PyTorch's.

The box/label/score check (detector.deploy.export.check_parity) pairs detections; here each eager
detection above the threshold is paired with the exported one of the same label whose box is
closest (within a pixel), and their binary masks (probability > 0.5) are compared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.core.masks import MASK_THRESHOLD

MaskRunner = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def mask_runner(path: str | Path, fmt: str) -> MaskRunner:
    """image -> (boxes, labels, scores, masks (n, 1, H, W) probabilities) of an exported model."""
    if fmt == "onnx":
        from detector.deploy.runtimes import as_mask_runner, ort_runner

        return as_mask_runner(ort_runner(path))
    scripted = torch.jit.load(str(path))

    def run_script(img: torch.Tensor):
        with torch.no_grad():
            _, dets = scripted([img])
        d = dets[0]
        return d["boxes"].numpy(), d["labels"].numpy(), d["scores"].numpy(), d["masks"].numpy()

    return run_script


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mask_parity(
    model: torch.nn.Module, images: list[torch.Tensor], run: MaskRunner, score_threshold: float = 0.3
) -> dict[str, Any]:
    """Mask IoU between eager and exported detections on the same images.

    Returns:
        {"mask_pairs": compared detections, "min_mask_iou", "mean_mask_iou"} (IoU 0 when nothing
        was compared, so that an empty check cannot pass).
    """
    ious: list[float] = []
    with torch.no_grad():
        for img in images:
            det = model([img])[0]
            boxes_o, labels_o, _, masks_o = run(img)
            free = set(range(len(labels_o)))
            keep = (det["scores"] >= score_threshold).nonzero().flatten().tolist()
            for i in keep:
                b, lab = det["boxes"][i].numpy(), int(det["labels"][i])
                cand = [j for j in free if labels_o[j] == lab and np.abs(boxes_o[j] - b).max() <= 1.0]
                if not cand:
                    continue  # unpaired detections fail the box check already
                j = min(cand, key=lambda j: float(np.abs(boxes_o[j] - b).max()))
                free.discard(j)
                eager = det["masks"][i, 0].numpy() > MASK_THRESHOLD
                ious.append(_iou(eager, np.asarray(masks_o[j]).reshape(eager.shape) > MASK_THRESHOLD))
    return {
        "mask_pairs": len(ious),
        "min_mask_iou": min(ious) if ious else 0.0,
        "mean_mask_iou": float(np.mean(ious)) if ious else 0.0,
    }
