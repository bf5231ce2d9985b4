"""PNG plots of a run: loss and mAP curves, PR curves, per-class AP, prediction grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from detector.core.drawing import draw_detections, save_figure  # noqa: E402
from detector.evaluation.cocoeval import CocoResult  # noqa: E402
from detector.runs.tracking import epoch_rows, read_metrics  # noqa: E402


def plot_losses(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Train and val loss per epoch, one panel per loss component (whatever the family's are);
    several runs overlay."""
    found = {k.split("/", 1)[1] for rows in runs.values() for r in rows for k in r if k.startswith("train/loss_")}
    parts = ["loss", *sorted(found)]
    fig, axes = plt.subplots(1, len(parts), figsize=(4 * len(parts), 3.2), squeeze=False)
    axes = axes[0]
    for ax, part in zip(axes, parts):
        for name, rows in runs.items():
            ep = [r["epoch"] for r in rows]
            for split, style in (("train", "-"), ("val", "--")):
                ys = [r.get(f"{split}/{part}") for r in rows]
                if any(y is not None for y in ys):
                    label = f"{name} {split}" if len(runs) > 1 else split
                    ax.plot(ep, [np.nan if y is None else y for y in ys], style, marker=".", label=label)
        ax.set_title(part)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_map(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """mAP, mAP50 and mAP75 per epoch; several runs overlay."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs.items():
        ep = [r["epoch"] for r in rows]
        for key, style in (("val/mAP", "-"), ("val/mAP50", "--"), ("val/mAP75", ":")):
            ys = [r.get(key) for r in rows]
            if any(y is not None for y in ys):
                label = f"{name} {key[4:]}" if len(runs) > 1 else key[4:]
                ax.plot(ep, [np.nan if y is None else y for y in ys], style, marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO AP")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_pr(result: CocoResult, path: Path) -> Path:
    """Precision-recall curve per class at IoU 0.5 (COCOeval's interpolated precision)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    if result.pr50 is not None and result.recall_thresholds is not None:
        for name, prec in zip(result.per_class_ap50, result.pr50):
            ax.plot(result.recall_thresholds, prec, label=f"{name} (AP50 {result.per_class_ap50[name]:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"PR @ IoU 0.5 (mAP50 {result.stats.get('mAP50', 0):.3f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return save_figure(fig, path)


def plot_per_class_ap(result: CocoResult, path: Path) -> Path:
    """Horizontal bars of AP@[.5:.95] and AP50 per class."""
    names = list(result.per_class_ap)
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.5))
    y = np.arange(len(names))
    ax.barh(y - 0.2, [max(result.per_class_ap[n], 0) for n in names], 0.4, label="AP")
    ax.barh(y + 0.2, [max(result.per_class_ap50[n], 0) for n in names], 0.4, label="AP50")
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def prediction_grid(samples: list[dict[str, Any]], class_names: Sequence[str], path: Path, ncol: int = 4) -> Path:
    """A grid of images, ground truth in white and predictions coloured by class.

    Args:
        samples: dicts with ``image`` (uint8 CHW), ``gt_boxes``, ``gt_labels``, ``boxes``,
            ``labels``, ``scores`` (boxes in that image's pixels).
        class_names: names of labels 1..K.
        path: the PNG to write.
    """
    tiles = []
    size = max(max(s["image"].shape[1:]) for s in samples) if samples else 64
    for s in samples:
        im = draw_detections(s["image"], s["gt_boxes"], s["gt_labels"], class_names, color="white", width=1)
        im = draw_detections(im, s["boxes"], s["labels"], class_names, s["scores"], masks=s.get("masks"))
        pad = torch.zeros(3, size, size, dtype=torch.uint8)
        pad[:, : im.shape[1], : im.shape[2]] = im[:, :size, :size]
        tiles.append(pad)
    grid = make_grid(tiles, nrow=ncol, padding=4) if tiles else torch.zeros(3, 64, 64, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Redraw the curves of one run directory (from its metrics.jsonl)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    rows = epoch_rows(read_metrics(run_dir))
    if not rows:
        return []
    runs = {run_dir.name: rows}
    return [plot_losses(runs, out / "loss.png"), plot_map(runs, out / "map.png")]


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Several runs' loss and mAP curves on shared plots."""
    runs = {Path(d).name: epoch_rows(read_metrics(d)) for d in run_dirs}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return []
    out = Path(out_dir)
    return [plot_losses(runs, out / "compare_loss.png"), plot_map(runs, out / "compare_map.png")]
