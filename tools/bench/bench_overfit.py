"""Overfit check: a model from scratch trained on a few generated images and evaluated on those
same images, through tools/train.py (json -> decode -> targets -> model -> detections -> COCOeval),
until val AP50 reaches --target. A wrong box convention anywhere on that path caps AP50 far below
it, whatever the training time.

    python tools/bench/bench_overfit.py                                 # dfine_tiny, tests/configs/tiny_dfine.yaml
    python tools/bench/bench_overfit.py --config tests/configs/tiny.yaml --images 4

It prints each evaluation's AP50 and the first epoch at or above the target; exit code 0 when it
was reached, 1 when not. Further key=value arguments override the config.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument(
        "--config", default=None, help="the model's config (default: the checkout's tests/configs/tiny_dfine.yaml)"
    )
    ap.add_argument("--images", type=int, default=4, help="generated training images (also the evaluation set)")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--every", type=int, default=10, help="evaluate every N epochs")
    ap.add_argument("--target", type=float, default=0.9, help="the AP50 to reach")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = args.config or str(ROOT / "tests" / "configs" / "tiny_dfine.yaml")
    from detector.data.synthetic import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", num_train=args.images, num_val=1, seed=3)
        images = Path(tmp) / "data" / "train"
        run = Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--config", config, f"output_dir={run}",
               f"data.train.annotations={data['train']}", f"data.train.images={images}",
               f"data.val.annotations={data['train']}", f"data.val.images={images}", "data.augment=[]",
               f"train.epochs={args.epochs}", f"eval.every_epochs={args.every}", f"train.threads={args.threads}",
               f"train.batch_size={min(args.images, 4)}", "logging.plots=false", "eval.analysis=false",
               *args.overrides]  # fmt: skip
        env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads)}
        print(f"{config}: {args.images} images, {args.epochs} epochs, evaluated on the training images", flush=True)
        start = time.time()
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"training failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curve = [(r["epoch"], r["val/mAP50"]) for r in rows if r["kind"] == "epoch" and "val/mAP50" in r]
    for epoch, ap50 in curve:
        print(f"  epoch {epoch:4d}: AP50 {ap50:.3f}")
    reached = next((e for e, ap in curve if ap >= args.target), None)
    took = time.time() - start
    if reached is None:
        print(
            f"AP50 {args.target} not reached in {args.epochs} epochs (best {max(a for _, a in curve):.3f}; {took:.0f} s)"
        )
        return 1
    print(f"AP50 >= {args.target} at epoch {reached} (the run took {took:.0f} s)")
    return 0


if __name__ == "__main__":
    from detector.core import errors

    sys.exit(errors.run_main(main))
