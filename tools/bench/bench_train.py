"""Training benchmarks, each against a baseline measured in the same run.

    python tools/bench/bench_train.py overhead [--repeats 2]   # tools/train.py vs a plain hand-written loop
    python tools/bench/bench_train.py scaling                  # 2 processes x 1 thread vs 1 process x 1 thread

Both use the demo dataset and model (configs/demo.yaml), one epoch, the same batch, image size,
threads and data loader settings. Images/s of tools/train.py is what its train_one_epoch
reports (data loading + steps; evaluation excluded); the plain loop is the torchvision
tutorial's loop (forward, sum of losses, zero_grad, backward, step) over the same loader.
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
    ap.add_argument("what", choices=["overhead", "scaling"])
    ap.add_argument("--repeats", type=int, default=2)
    return ap


DEMO = ROOT / "configs" / "demo.yaml"


def plain_loop(overrides: list[str]) -> float:
    """The tutorial loop over our loader; returns images/s over one epoch."""
    import torch

    from detector import config, data
    from detector.data.loader import TrainBatchSampler, build_loader
    from detector.models.build import build_model, model_input_size
    from detector.train import optim

    cfg = config.load(DEMO, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    splits = data.load_splits(cfg, log=lambda s: None)
    model = build_model(cfg.model, splits.train.label_map.num_classes)
    train_ds, _ = data.build_datasets(splits, cfg.data, model_input_size(model))
    sampler = TrainBatchSampler(splits.train.aspect_ratios(), cfg.train.batch_size, cfg.train.seed)
    loader = build_loader(train_ds, sampler, cfg.data.num_workers, cfg.train.seed)
    optimizer = optim.build_optimizer(model, cfg.optim, cfg.optim.lr)
    scheduler = optim.build_scheduler(optimizer, cfg.optim, len(sampler))
    model.train()
    n, t0 = 0, time.perf_counter()
    for images, targets, _ in loader:
        images = [im.float() / 255 for im in images]
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        loss_dict = model(images, targets)
        losses = sum(loss_dict.values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        scheduler.step()
        n += len(images)
    return n / (time.perf_counter() - t0)


def framework_run(overrides: list[str], nproc: int, out: Path) -> float:
    """tools/train.py under accelerate launch; returns its reported train images/s."""
    launch = ROOT / "launch" / ("cpu.yaml" if nproc == 1 else "cpu2.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
           str(ROOT / "tools" / "train.py"), "--config", str(DEMO), f"output_dir={out}", *overrides]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"][-1]["train/images_per_s"]


def _plain_subprocess(overrides: list[str]) -> float:
    res = subprocess.run([sys.executable, __file__, "_plain", *overrides], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return float(res.stdout.strip().splitlines()[-1])


COMMON = ["train.epochs=1", "logging.plots=false", "logging.progress=false", "data.synthetic.root=data/demo"]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        print(plain_loop(sys.argv[2:]))
        return 0
    args = build_parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "overhead":
            overrides = [*COMMON, "train.threads=2", "data.num_workers=1"]
            plain, framework = [], []
            for r in range(args.repeats):  # interleaved, so that drift hits both alike
                plain.append(_plain_subprocess(overrides))
                framework.append(framework_run(overrides, 1, Path(tmp) / f"f{r}"))
            result = {"plain_img_s": plain, "train_py_img_s": framework,
                      "overhead": 1 - max(framework) / max(plain)}  # fmt: skip
        else:
            overrides = [*COMMON, "train.threads=1", "data.num_workers=0"]
            one = framework_run(overrides, 1, Path(tmp) / "one")
            two = framework_run(overrides, 2, Path(tmp) / "two")
            result = {"one_process_img_s": one, "two_processes_img_s": two, "efficiency": two / (2 * one)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
