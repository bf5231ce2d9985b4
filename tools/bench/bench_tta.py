"""Time to accuracy: a recipe of ours (tools/train.py) against the seed tutorial's plain loop, from
scratch on one dataset, back to back in one run, both evaluated after every epoch with the same
COCOeval.

    python tools/bench/bench_tta.py --epochs 24 --target 0.8       # ../shared/data/rbc_roboflow
    python tools/bench/bench_tta.py --recipe configs/demo.yaml train.ema=false --only ours

The plain loop is torchvision's fasterrcnn_mobilenet_v3_large_fpn built by torchvision itself
(random weights), the sum of its losses, SGD (momentum 0.9, weight decay 1e-4) at lr 0.02 with
OneCycle and gradient clipping at 10 (the tutorial's lr 0.005 and step schedule barely move from
scratch), horizontal flips, batch 4, over our loader (the same decode). Ours is --recipe (the
demo config) with the dataset's paths and --epochs. Both see the same images at the same size
(--size), on the same number of threads. For each it prints the first epoch, and the wall time
since its start, at which val AP50 >= --target and stays there for --hold evaluations in a row,
and the best mAP@[.5:.95] with its time; the ratio is ours over the plain loop's time.
Further key=value arguments override our recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--data", type=Path, default=None,
                    help="a Roboflow-style export: train/ and valid/ with their jsons "
                         "(default: ../shared/data/rbc_roboflow beside the checkout)")  # fmt: skip
    ap.add_argument("--recipe", default=None, help="our config (default: the checkout's configs/demo.yaml)")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--size", type=int, default=416, help="min_size = max_size of both models")
    ap.add_argument("--target", type=float, default=0.8, help="the val AP50 to reach and hold")
    ap.add_argument("--hold", type=int, default=3, help="evaluations in a row at or above the target")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of each")
    ap.add_argument("--only", choices=["ours", "plain"], default=None, help="run one of the two")
    ap.add_argument("--json", type=Path, default=None, help="also write the curves and figures here")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of our recipe")
    return ap


def data_overrides(root: Path) -> list[str]:
    return [
        "data.synthetic.enabled=false",
        f"data.train.annotations={root / 'train' / '_annotations.coco.json'}",
        f"data.train.images={root / 'train'}",
        f"data.val.annotations={root / 'valid' / '_annotations.coco.json'}",
        f"data.val.images={root / 'valid'}",
    ]


def held(curve: list[dict[str, float]], target: float, hold: int) -> dict[str, float] | None:
    """The first evaluation from which AP50 stays >= target for ``hold`` evaluations in a row."""
    for i in range(len(curve) - hold + 1):
        if all(c["mAP50"] >= target for c in curve[i : i + hold]):
            return curve[i]
    return None


def ours(args: argparse.Namespace, out: Path) -> list[dict[str, float]]:
    """tools/train.py with the recipe; its val curve from metrics.jsonl, timed from its start."""
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--config", args.recipe, f"output_dir={out}",
           *data_overrides(args.data), f"train.epochs={args.epochs}", f"model.min_size={args.size}",
           f"model.max_size={args.size}", f"train.threads={args.threads}", f"data.num_workers={args.workers}",
           "eval.every_epochs=1", "logging.plots=false", "logging.progress=false", *args.overrides]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"our run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {"epoch": r["epoch"], "time_s": r["time"] - start, "mAP50": r["val/mAP50"], "mAP": r["val/mAP"]}
        for r in records
        if r["kind"] == "epoch" and "val/mAP50" in r
    ]


def plain(args: argparse.Namespace) -> list[dict[str, float]]:
    """The tutorial's loop over our loader, evaluated after every epoch."""
    import torch
    import torchvision

    from detector import config, data
    from detector.data.loader import EvalBatchSampler, TrainBatchSampler, build_loader
    from detector.evaluation.cocoeval import detections_to_coco, evaluate_coco

    start = time.time()
    torch.set_num_threads(args.threads)
    overrides = [*data_overrides(args.data), "data.augment=[{HorizontalFlip: {p: 0.5}}]", "train.batch_size=4"]
    cfg = config.load(ROOT / "configs" / "demo.yaml", overrides)
    torch.manual_seed(cfg.train.seed)
    splits = data.load_splits(cfg, log=lambda s: None)
    num_classes = splits.train.label_map.num_classes
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=args.size, max_size=args.size
    )
    train_ds, val_ds = data.build_datasets(splits, cfg.data, None)
    sampler = TrainBatchSampler(splits.train.aspect_ratios(), cfg.train.batch_size, cfg.train.seed, group=False)
    loader = build_loader(train_ds, sampler, args.workers, cfg.train.seed)
    val_loader = build_loader(val_ds, EvalBatchSampler(splits.val.aspect_ratios(), 4), args.workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=args.epochs * len(sampler))
    gt = splits.val.to_coco_gt()
    curve = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for images, targets, _ in loader:
            images = [im.float() / 255 for im in images]
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
        model.eval()
        rows: list[dict[str, Any]] = []
        with torch.no_grad():
            for images, targets, _ in val_loader:
                rows += detections_to_coco(model([im.float() / 255 for im in images]), targets, splits.val.label_map)
        stats = evaluate_coco(gt, rows, backend=cfg.eval.backend).stats
        curve.append({"epoch": epoch + 1, "time_s": time.time() - start, "mAP50": stats["mAP50"], "mAP": stats["mAP"]})
        print(f"  plain loop epoch {epoch + 1}: AP50 {stats['mAP50']:.3f} mAP {stats['mAP']:.3f}", flush=True)
    return curve


def summary(name: str, curve: list[dict[str, float]], args: argparse.Namespace) -> dict[str, Any]:
    reach = held(curve, args.target, args.hold)
    best = max(curve, key=lambda c: c["mAP"])
    if reach:
        when = f"AP50 >= {args.target} held from epoch {reach['epoch']} ({reach['time_s']:.0f} s)"
    else:
        when = f"AP50 >= {args.target} not held for {args.hold} evaluations (best AP50 {max(c['mAP50'] for c in curve):.3f})"
    print(f"{name:>10}: {when}; best mAP {best['mAP']:.3f} at epoch {best['epoch']} ({best['time_s']:.0f} s)")
    return {"name": name, "curve": curve, "reached": reach, "best": best}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = args.data or ROOT.parent / "shared" / "data" / "rbc_roboflow"
    args.recipe = args.recipe or str(ROOT / "configs" / "demo.yaml")
    if not (args.data / "train" / "_annotations.coco.json").is_file():
        raise SystemExit(f"no train/_annotations.coco.json under {args.data} (--data)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "ours"):
            print(f"ours: {args.recipe} {' '.join(args.overrides)}, {args.epochs} epochs", flush=True)
            results["ours"] = summary("ours", ours(args, Path(tmp) / "ours"), args)
        if args.only in (None, "plain"):
            print(f"plain loop: fasterrcnn_mobilenet_v3_large_fpn, SGD OneCycle 0.02, {args.epochs} epochs", flush=True)
            results["plain"] = summary("plain loop", plain(args), args)
    if len(results) == 2 and results["ours"]["reached"] and results["plain"]["reached"]:
        ratio = results["ours"]["reached"]["time_s"] / results["plain"]["reached"]["time_s"]
        gain = results["ours"]["best"]["mAP"] - results["plain"]["best"]["mAP"]
        print(f"time to the held target: ours / plain = {ratio:.2f}x; best mAP ours - plain = {gain:+.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1))
    return 0


if __name__ == "__main__":
    from detector.core import errors

    sys.exit(errors.run_main(main))
