"""End-of-epoch report: plots in the run directory, and the same pictures and tables in W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detector.data.coco import CocoDetection
from detector.evaluation.cocoeval import CocoResult
from detector.models.zoo import loss_and_detections
from detector.runs.plots import plot_per_class_ap, plot_pr, plot_run, prediction_grid
from detector.runs.tracking import RunLogger, wandb_boxes


@torch.no_grad()
def sample_predictions(model: torch.nn.Module, dataset: CocoDetection, n: int, device: torch.device) -> list[dict]:
    """Detections (float32, no autocast) on the first n validation images, with their ground truth."""
    model.eval()
    samples = []
    for i in range(min(n, len(dataset))):
        item = dataset[i]
        if item is None:
            continue
        image, target = item
        _, dets = loss_and_detections(model, [image.to(device).float() / 255.0], None)
        keep = dets[0]["scores"] >= 0.3
        samples.append(
            {
                "image": image,
                "gt_boxes": target["boxes"],
                "gt_labels": target["labels"].tolist(),
                "boxes": dets[0]["boxes"][keep].cpu(),
                "labels": dets[0]["labels"][keep].tolist(),
                "scores": dets[0]["scores"][keep].tolist(),
                "image_id": target["image_id"],
            }
        )
        if "masks" in dets[0]:  # Mask R-CNN: binary masks in the image's pixels
            samples[-1]["masks"] = (dets[0]["masks"][keep, 0] > 0.5).cpu()
            samples[-1]["gt_masks"] = target.get("masks")
    return samples


def epoch_report(
    run_dir: Path,
    model: torch.nn.Module,
    val_ds: CocoDetection,
    coco: CocoResult,
    logger: RunLogger,
    step: int,
    num_images: int,
    num_wandb_images: int,
    device: torch.device,
) -> None:
    """Refresh the plots (loss, mAP, PR, per-class AP, prediction grid) and send W&B panels."""
    plots = run_dir / "plots"
    plot_run(run_dir, plots)
    plot_pr(coco, plots / "pr_curves.png")
    plot_per_class_ap(coco, plots / "per_class_ap.png")
    names = list(val_ds.index.label_map.names)
    samples = sample_predictions(model, val_ds, max(num_images, num_wandb_images if logger.wandb_run else 0), device)
    prediction_grid(samples[:num_images], names, plots / "val_predictions.png")
    if logger.wandb_run is not None:
        rows: list[list[Any]] = [[n, coco.per_class_ap[n], coco.per_class_ap50[n]] for n in names]
        logger.log_table("val/per_class_ap", ["class", "AP", "AP50"], rows, step)
        images = [
            wandb_boxes(
                s["image"],
                s["gt_boxes"],
                torch.tensor(s["gt_labels"]),
                s["boxes"],
                torch.tensor(s["labels"]),
                s["scores"],
                names,
                f"image {s['image_id']}",
                masks=(s.get("gt_masks"), s.get("masks")) if "masks" in s else None,
            )
            for s in samples[:num_wandb_images]
        ]
        logger.log_images("val/predictions", images, step)
