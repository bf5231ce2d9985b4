"""Inference benchmarks, each against a baseline measured in the same run.

    python tools/bench/bench_infer.py --checkpoint runs/demo/best.pt --images data/demo/val [--n 48]

1. Eager PyTorch against ONNX Runtime on the CPU: the same images at the same fixed size, one
   image per call (the exported graph's interface), images/s and their ratio.
2. What validation costs: loss_and_detections (one backbone pass for the loss and the
   detections) against a pure inference pass (model(images) in eval mode), same batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True, help="a folder of images")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8, help="for the validation-cost comparison")
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


import torch

from detector.deploy.export import default_size, export_onnx, onnx_runner
from detector.inference.predictor import Predictor
from detector.models.build import load_model
from detector.models.zoo import loss_and_detections


def _rate(fn, items, repeats=3) -> float:
    fn(items[0])  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for it in items:
            fn(it)
        best = max(best, len(items) / (time.perf_counter() - t))
    return best


def main() -> int:
    args = build_parser().parse_args()
    model, label_map, meta = load_model(args.checkpoint)
    size = default_size(model)
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.n]
    images = [
        torch.nn.functional.interpolate(Predictor.to_tensor(f)[None], size=size, mode="bilinear")[0] for f in files
    ]
    result: dict = {"images": len(images), "size_hw": size, "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        run_onnx = onnx_runner(export_onnx(model, Path(tmp) / "m.onnx", size))

        def eager(img):
            with torch.no_grad():
                return model([img])

        result["eager_img_s"] = _rate(eager, images)
        result["onnxruntime_img_s"] = _rate(run_onnx, images)
        result["onnx_over_eager"] = result["onnxruntime_img_s"] / result["eager_img_s"]

    # validation (loss + detections, one backbone pass) against pure inference
    cfg_val = [Predictor.to_tensor(f) for f in files]
    batches = [cfg_val[i : i + args.batch_size] for i in range(0, len(cfg_val), args.batch_size)]
    targets = [
        [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])} for _ in b] for b in batches
    ]

    def infer(i):
        with torch.no_grad():
            model(batches[i])

    def validate(i):
        with torch.no_grad():
            loss_and_detections(model, batches[i], targets[i])

    idx = list(range(len(batches)))
    per_batch_infer = 1 / _rate(infer, idx)
    per_batch_val = 1 / _rate(validate, idx)
    result["pure_inference_s_per_batch"] = per_batch_infer
    result["validation_s_per_batch"] = per_batch_val
    result["validation_over_inference"] = per_batch_val / per_batch_infer
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
