"""CPU runtimes side by side: images/s of one checkpoint in every runtime and precision, one run.

    python tools/bench/bench_runtimes.py --checkpoint runs/demo/best.pt --images data/demo/val \
        [--n 48] [--threads 2] [--calibration data/demo/train] [--ap] [--output bench.json]

Eager PyTorch, TorchScript, ONNX Runtime fp32 (its default session and the tuned one of
detector.deploy.runtimes), ONNX Runtime int8, OpenVINO fp32 and int8 (and bf16, where the CPU has it),
on the same --n images at their own sizes, one image per call, --threads threads each
(torch.set_num_threads too). The rounds are interleaved (every runtime once per round) so that
a change in machine load hits all of them alike; the best round of each counts. The int8 model
is calibrated on --calibration-count images of --calibration (default: the images the
run's training json lists). --ap scores every precision on the val set (the run's, or --val-annotations /
--val-images) with COCOeval: box AP50 and mAP. Prints one JSON object (and writes --output).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detector import cli
from detector.core import errors


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True, help="a folder of images to time on")
    ap.add_argument("--n", type=int, default=48, help="images timed per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calibration", help="a folder of int8 calibration images (default: the run's training json's)")
    ap.add_argument("--calibration-count", type=int, default=100)
    ap.add_argument("--ap", action="store_true", help="box AP50/mAP of every precision on the val set")
    ap.add_argument("--val-annotations")
    ap.add_argument("--val-images")
    ap.add_argument("--no-bf16", action="store_true", help="leave out OpenVINO bf16")
    ap.add_argument("--output", help="also write the JSON here")
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


import numpy as np
import torch

from detector.core import progress
from detector.deploy import export, quantize, runtimes
from detector.inference.predictor import Predictor
from detector.models.build import (
    load_model,
    model_input_size,
)


def script_run(path: Path):
    scripted = torch.jit.load(str(path))

    def run(img: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: v.numpy() for k, v in scripted([img])[1][0].items()}

    return run


def bf16_supported() -> bool:
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if min(args.n, args.threads, args.rounds, args.calibration_count) < 1:
        ap.error("--n, --threads, --rounds and --calibration-count take numbers >= 1")
    runtimes.require_installed(["onnx", "onnxruntime", "openvino"], "bench_runtimes.py", runtimes.DEPLOY_EXTRA)

    torch.set_num_threads(args.threads)
    model, label_map, meta = load_model(args.checkpoint)
    cfg = meta.get("config", {})
    draft = bool(cfg.get("data", {}).get("draft_decode", True))
    predictor = Predictor(model, label_map, "cpu", 1, draft)
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in quantize.IMAGE_SUFFIXES)[: args.n]
    if not files:
        print(f"error: no images in {args.images}", file=sys.stderr)
        return 2
    images = [predictor.prepare(f)[0] for f in files]
    train = quantize.run_split(cfg, "train")
    if not args.calibration and train is None:
        print("error: pass --calibration DIR (the run's training json or images are not there)", file=sys.stderr)
        return 2
    calib = args.calibration or str(train[0])
    # the training json's images by default, not every file of a folder it may share with the val json
    calib_files = quantize.folder_images(args.calibration) if args.calibration else quantize.annotated_images(*train)
    result: dict = {"checkpoint": str(args.checkpoint), "images": len(images), "threads": args.threads,
                    "sizes_hw": sorted({tuple(im.shape[1:]) for im in images}), "img_s": {}}  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        print("exporting: TorchScript, ONNX, int8 (calibrating), OpenVINO IR", file=sys.stderr)
        ts = export.export_torchscript(model, t / "m.pt")
        fp32 = export.export_onnx(model, t / "m.onnx")
        cal, problems = quantize.calibration_images(
            quantize.spread(calib_files, args.calibration_count), predictor.prepare
        )
        int8 = quantize.quantize_onnx(fp32, t / "m_int8.onnx", cal)
        ov_fp32 = runtimes.export_openvino(fp32, t / "m.xml")
        ov_int8 = runtimes.export_openvino(int8, t / "m_int8.xml")
        result["calibration"] = {"source": str(calib), "images": len(cal), "left_out": len(problems)}
        n = args.threads
        runners = {
            "eager": quantize.eager_runner(model),
            "torchscript": script_run(ts),
            "onnxruntime_default": runtimes.ort_runner(fp32, n, optimize=False),
            "onnxruntime_tuned": runtimes.ort_runner(fp32, n, optimize=True),
            "onnxruntime_int8": runtimes.ort_runner(int8, n, optimize=True),
            "openvino_fp32": runtimes.openvino_runner(ov_fp32, n, "f32"),
            "openvino_int8": runtimes.openvino_runner(ov_int8, n, "f32"),
        }
        if not args.no_bf16 and bf16_supported():
            runners["openvino_bf16"] = runtimes.openvino_runner(ov_fp32, n, "bf16")
        result["openvino_int8_layers"] = runtimes.runtime_layers(ov_int8)

        # warm-up, not timed: OpenVINO and ONNX Runtime prepare kernels per input shape, and
        # TorchScript's profiling executor optimises a graph after its first runs at a shape, so
        # every runtime runs twice at every size of the timed images first (one image at one size
        # left TorchScript's first round at a tenth of its speed)
        warm = list({tuple(im.shape): im for im in images}.values())
        for run in runners.values():
            for img in warm + warm:
                run(img)
        best = dict.fromkeys(runners, 0.0)
        bar = progress.progress(True, total=args.rounds * len(runners), desc="timing")
        for _ in range(args.rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                for img in images:
                    run(img)
                best[name] = max(best[name], len(images) / (time.perf_counter() - start))
                bar.update(1)
        bar.close()
        result["img_s"] = {k: round(v, 2) for k, v in best.items()}
        result["over_eager"] = {k: round(v / best["eager"], 2) for k, v in best.items()}
        result["best"] = max((k for k in best if k != "eager"), key=best.get)

        if args.ap:
            val = (
                (Path(args.val_annotations), Path(args.val_images))
                if args.val_annotations
                else quantize.run_split(cfg, "val")
            )
            if val is None:
                print("note: --ap: no val set (pass --val-annotations and --val-images)", file=sys.stderr)
            else:
                size = model_input_size(model) if draft else None
                result["val"] = str(val[0])
                result["ap"] = {}
                for name in ("eager", "onnxruntime_tuned", "onnxruntime_int8", "openvino_fp32", "openvino_int8",
                             "openvino_bf16"):  # fmt: skip
                    if name in runners:
                        stats = quantize.evaluate_runner(runners[name], *val, label_map, size, desc=f"AP {name}")
                        result["ap"][name] = {"mAP50": round(stats["mAP50"], 4), "mAP": round(stats["mAP"], 4)}
        runners.clear()
        gc.collect()

    text = json.dumps(result)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
