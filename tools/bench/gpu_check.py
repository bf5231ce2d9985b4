"""A GPU check for the day a GPU is lent: the demo model trained a few hundred steps in fp32, fp16
(with a GradScaler) and bf16, from the same initial weights over the same batches.

    python tools/bench/gpu_check.py                              # the first CUDA device, under 5 minutes
    python tools/bench/gpu_check.py --device cpu --steps 4       # the same path on a CPU (slow; a smoke test)

For each precision it prints images/s (after a few warm-up steps), the share of step time spent
waiting for the data loader, the peak memory, the first step's loss and the mean loss of the last
quarter of the steps. The precisions agree when each first-step loss is within --first-tolerance
of fp32's (the same weights and batch: only rounding differs) and each final mean loss within
--final-tolerance of fp32's (the runs drift apart by rounding, so this bound is wider). Exit code:
0 when they agree, 1 when not. Without CUDA (and without --device cpu) it says so, says what it
would measure, and exits 0. Further key=value arguments override the config (configs/demo.yaml).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from detector import cli

PRECISIONS = ("fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--config", default=None, help="YAML config (default: the checkout's configs/demo.yaml)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to run the same path on a CPU")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per precision")
    ap.add_argument("--batch-size", type=int, default=None, help="images per step (default: train.batch_size)")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    ap.add_argument("--first-tolerance", type=float, default=0.02, help="relative, on the first step's loss")
    ap.add_argument("--final-tolerance", type=float, default=0.15, help="relative, on the last quarter's mean loss")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.min_size=320")
    return ap


def _peak_memory_mib(device: Any) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (KiB on Linux)


def train_steps(precision: str, cfg: Any, splits: Any, state: dict, device: Any, steps: int, workers: int) -> dict:
    """``steps`` optimizer steps of the model from ``state`` in one precision; its figures."""
    import torch

    from detector import data
    from detector.data.loader import TrainBatchSampler, build_loader
    from detector.models.build import build_model, model_input_size
    from detector.train import optim
    from detector.train.engine import to_device

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, splits.train.label_map.num_classes)
    model.load_state_dict(state)
    model.to(device).train()
    train_ds, _ = data.build_datasets(splits, cfg.data, model_input_size(model))
    sampler = TrainBatchSampler(splits.train.aspect_ratios(), cfg.train.batch_size, cfg.train.seed)
    loader = build_loader(train_ds, sampler, workers, cfg.train.seed)
    optimizer = optim.build_optimizer(model, cfg.optim, cfg.optim.lr)
    scheduler = optim.build_scheduler(optimizer, cfg.optim, steps)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    warmup = min(5, steps // 4)
    losses: list[float] = []
    waited = spent = 0.0
    images_seen = 0
    batches = iter(loader)
    for step in range(steps):
        t0 = time.perf_counter()
        try:
            images, targets, _ = next(batches)
        except StopIteration:  # the next pass over the data
            batches = iter(loader)
            images, targets, _ = next(batches)
        t1 = time.perf_counter()
        images, targets = to_device(images, targets, device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(float(loss.item()))  # waits for the device: the step's time includes its work
        if step >= warmup:
            waited += t1 - t0
            spent += time.perf_counter() - t0
            images_seen += len(images)
    last = losses[-max(1, steps // 4) :]
    return {
        "precision": precision,
        "images_per_s": images_seen / spent if spent else float("nan"),
        "data_wait_share": waited / spent if spent else float("nan"),
        "peak_memory_mib": _peak_memory_mib(device),
        "first_loss": losses[0],
        "final_loss": sum(last) / len(last),
        "finite": all(math.isfinite(x) for x in losses),
    }


def agreement(rows: list[dict], first_tol: float, final_tol: float) -> list[str]:
    """What disagrees with fp32 beyond the tolerances (nothing: they agree)."""
    ref = next(r for r in rows if r["precision"] == "fp32")
    problems = []
    for r in rows:
        if not r["finite"]:
            problems.append(f"{r['precision']}: a loss was not finite")
        for key, tol in (("first_loss", first_tol), ("final_loss", final_tol)):
            gap = abs(r[key] - ref[key]) / abs(ref[key])
            if gap > tol:
                problems.append(
                    f"{r['precision']}: {key} {r[key]:.4f} is {gap:.1%} from fp32's {ref[key]:.4f} (> {tol:.0%})"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = args.config or str(ROOT / "configs" / "demo.yaml")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}): nothing measured, exit 0. On a GPU this trains the "
              f"model of {args.config} for {args.steps} steps in each of fp32, fp16 (with a GradScaler) and bf16 from "
              "the same weights over the same batches, and prints images/s, the share of step time spent waiting for "
              "data, peak memory, and whether the losses agree (first step within "
              f"{args.first_tolerance:.0%}, last quarter's mean within {args.final_tolerance:.0%}).")  # fmt: skip
        return 0
    from detector import config, data
    from detector.models.build import build_model
    from detector.models.zoo import recipe

    device = torch.device(args.device)
    overrides = [*args.overrides, *([f"train.batch_size={args.batch_size}"] if args.batch_size else [])]
    cfg = config.load(args.config, overrides, recipe)  # as tools/train.py loads it
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    splits = data.load_splits(cfg, log=lambda s: None)
    torch.manual_seed(cfg.train.seed)
    state = build_model(cfg.model, splits.train.label_map.num_classes).state_dict()
    precisions = list(PRECISIONS)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions.remove("bf16")
        print(f"{torch.cuda.get_device_name(device)} has no bf16: fp32 and fp16 only")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: {cfg.model.name}, batch {cfg.train.batch_size}, {args.steps} steps per precision")
    rows = []
    for p in precisions:
        rows.append(train_steps(p, cfg, splits, state, device, args.steps, args.workers))
        r = rows[-1]
        memory = "peak memory" if device.type == "cuda" else "process peak RSS"
        print(f"{p:>5}: {r['images_per_s']:8.1f} img/s | waiting for data {r['data_wait_share']:5.1%} | "
              f"{memory} {r['peak_memory_mib']:8.0f} MiB | first loss {r['first_loss']:.4f} | "
              f"last-quarter loss {r['final_loss']:.4f}")  # fmt: skip
    problems = agreement(rows, args.first_tolerance, args.final_tolerance)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "steps": args.steps, "rows": rows, "problems": problems}))
    for line in problems:
        print(f"disagree: {line}")
    print("the precisions agree" if not problems else f"{len(problems)} disagreement(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    from detector.core import errors

    sys.exit(errors.run_main(main))
