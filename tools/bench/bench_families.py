"""Speed of every family on this machine's CPU, measured in one run with the same images.

    python tools/bench/bench_families.py [--threads 2] [--n 8] [--models a b ...]

For each model: eager PyTorch and ONNX Runtime inference (one image per call, after two warm-up
calls) at the demo size (192x256 images, the demo configs' input size) and at 640x480 (the
model's own input size), and training images/s (batch 8 at the demo size). Models are built
with random weights: speed does not depend on them. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detector import cli

MODELS = {
    "fasterrcnn_resnet18_fpn (demo)": ("demo.yaml", []),
    "retinanet_resnet18_fpn (demo)": ("demo_retinanet.yaml", []),
    "fcos_resnet18_fpn (demo)": ("demo_fcos.yaml", []),
    "ssdlite320_mobilenet_v3_large (demo)": ("demo_ssdlite.yaml", []),
    "fasterrcnn_mobilenet_v3_large_fpn": ("frcnn.yaml", ["model.weights=null"]),
    "retinanet_resnet50_fpn": ("frcnn.yaml", ["model.name=retinanet_resnet50_fpn", "model.weights=null"]),
    "fcos_resnet50_fpn": ("frcnn.yaml", ["model.name=fcos_resnet50_fpn", "model.weights=null"]),
    "ssd300_vgg16": ("frcnn.yaml", ["model.name=ssd300_vgg16", "model.weights=null"]),
}


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=8, help="timed images per measurement")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


import torch

from detector import config
from detector.deploy.export import export_onnx, onnx_runner
from detector.models.build import build_model
from detector.models.zoo import family_of

ROOT = Path(__file__).resolve().parents[2]
# name -> (the config whose model is measured, overrides)
DATA = ["data.train.annotations=a", "data.train.images=b", "data.val.annotations=c", "data.val.images=d"]


def rate(fn, images: list[torch.Tensor]) -> float:
    for im in images[:2]:
        fn(im)
    t0 = time.perf_counter()
    for im in images:
        fn(im)
    return len(images) / (time.perf_counter() - t0)


def train_rate(model: torch.nn.Module, n_steps: int, size: tuple[int, int]) -> float:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, *size, generator=g) for _ in range(8)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])} for _ in range(8)]

    def step() -> None:
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return 8 * n_steps / (time.perf_counter() - t0)


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads")
    rows = []
    for label in args.models:
        cfg_file, overrides = MODELS[label]
        cfg = config.load(ROOT / "configs" / cfg_file, [*overrides, *DATA])
        demo = "demo" in cfg_file
        sizes = {"demo 192x256": (192, 256), "640x480": (480, 640)}
        row = {"model": label, "family": family_of(cfg.model.name).name}
        for size_name, (h, w) in sizes.items():
            mcfg = cfg.model
            if not demo and size_name.startswith("demo"):
                fam = family_of(mcfg.name)
                if "min_size" in fam.keys:  # the COCO models at the demo size: resize to it
                    mcfg = replace(mcfg, min_size=192, max_size=256)
            elif demo and not size_name.startswith("demo"):
                fam = family_of(mcfg.name)
                if "min_size" in fam.keys:
                    mcfg = replace(mcfg, min_size=480, max_size=640)
            model = build_model(mcfg, 3, log=lambda _: None).eval()
            g = torch.Generator().manual_seed(1)
            images = [torch.rand(3, h, w, generator=g) for _ in range(args.n)]
            with torch.no_grad():
                eager = rate(lambda im, m=model: m([im]), images)
            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(model, Path(tmp) / "m.onnx", (h, w))
                run = onnx_runner(path, threads=args.threads)
                onnx = rate(run, images)
            row[f"eager {size_name}"] = eager
            row[f"onnx {size_name}"] = onnx
            if size_name.startswith("demo"):
                row["train img/s (demo size, batch 8)"] = train_rate(build_model(mcfg, 3, log=lambda _: None),
                                                                     args.train_steps, (h, w))  # fmt: skip
            print(f"{label} {size_name}: eager {eager:.1f} img/s, ONNX Runtime {onnx:.1f} img/s", flush=True)
        rows.append(row)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}" for v in r.values()) + " |")


if __name__ == "__main__":
    main()
