"""The Job: what tools/train.py builds once before its loop, and the run's start on it.

``build_job`` sets up the processes and the run directory and builds the data, model and
optimisation; ``resume``, ``start_fresh`` and ``start_logging`` are the steps between that and
the loop (detector/train/loop.py holds the loop's own steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from detector import config, data
from detector.config import Config
from detector.core.labels import LabelMap
from detector.data.loader import EvalBatchSampler, TrainBatchSampler, build_loader, cap_workers, steps_per_epoch
from detector.models.build import build_model, model_input_size
from detector.models.zoo import check_keys, recipe_line
from detector.runs import lineage
from detector.runs.tracking import RunLogger
from detector.train import checkpoint, optim
from detector.train import process as runtime
from detector.train.state import RunState


@dataclass(frozen=True)
class Job:
    """Everything a run builds before its loop, built once by ``build_job``; the loop's state is
    not here but in a RunState."""

    cfg: Config
    accelerator: Accelerator
    run_dir: Path
    label_map: LabelMap
    fingerprint: dict[str, Any] | None  # lineage.fingerprint (main process only)
    trained_on: dict[str, Any]  # the model and classes a state must have been trained on to resume
    best_mode: str  # "max" or "min" for eval.best_metric
    model: torch.nn.Module  # as accelerator.prepare returned it
    ema: torch.optim.swa_utils.AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_sampler: TrainBatchSampler
    val_sampler: EvalBatchSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    val_ds: data.CocoDetection
    gt: dict[str, Any]  # the validation split as COCO ground truth
    lr: float  # the peak lr scaled for the global batch
    steps_per_epoch: int

    @property
    def log(self) -> Callable[..., None]:
        """Print on the main process (accelerator.print)."""
        return self.accelerator.print

    @property
    def main(self) -> bool:
        """Is this the main process (the one that writes the run's files and logs)?"""
        return self.accelerator.is_main_process

    @property
    def scored(self) -> torch.nn.Module:
        """What validation scores and best.pt/last.pt hold: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def layout(self) -> dict[str, int]:
        """This run's world_size, per-process batch_size and grad_accum_steps (a RunState's layout)."""
        t = self.cfg.train
        return {
            "world_size": self.accelerator.num_processes,
            "batch_size": t.batch_size,
            "grad_accum_steps": t.grad_accum_steps,
        }


def build_job(cfg: Config) -> Job:
    """Set up the processes and the run directory, then build the data, model and optimisation.

    Args:
        cfg: the run's config.

    Raises:
        ConfigError: an unusable run directory, a best metric the data cannot score.
    """
    check_keys(cfg.model)  # the model.* keys its family takes (the schema alone cannot tell)
    accelerator = runtime.build_accelerator(cfg.train)
    log, main_proc = accelerator.print, accelerator.is_main_process
    run_dir = runtime.prepare_run_dir(cfg, accelerator)
    log(f"run directory {run_dir}; {runtime.world_info(accelerator)}")

    headers = data.header_progress(main_proc and cfg.logging.progress, cfg.logging.progress_interval_s)
    splits = data.load_splits(cfg, log, headers)
    label_map = splits.train.label_map
    fingerprint = lineage.fingerprint(cfg, splits) if main_proc else None  # dataset, code, config, versions
    config.check_metric_name(cfg.eval.best_metric, list(label_map.names))
    best_mode = config.best_mode(cfg.eval)
    if not cfg.eval.best_metric.startswith("val/loss") and not (~splits.val.iscrowd).any():
        raise config.ConfigError(
            f"{splits.val.path}: the validation split has no objects, so its COCO metrics are undefined "
            f"(pycocotools reports -1) and eval.best_metric={cfg.eval.best_metric} cannot choose best.pt; "
            "use a validation set with objects, or eval.best_metric=val/loss"
        )
    model = build_model(cfg.model, label_map.num_classes, list(label_map.names), log)
    if line := recipe_line(cfg):
        log(line)
    train_ds, val_ds = data.build_datasets(splits, cfg.data, model_input_size(model))
    ratios = splits.train.aspect_ratios()
    if cfg.data.tile.size:  # the training items are tiles (data/tiles.py)
        log(train_ds.summary())  # type: ignore[attr-defined]
        ratios = train_ds.aspect_ratios()  # type: ignore[attr-defined]
    world, rank = accelerator.num_processes, accelerator.process_index
    train_sampler = TrainBatchSampler(
        ratios, cfg.train.batch_size, cfg.train.seed, world, rank, cfg.data.aspect_ratio_grouping
    )
    val_sampler = EvalBatchSampler(splits.val.aspect_ratios(), cfg.eval.batch_size, world, rank)
    workers = cap_workers(cfg.data.num_workers, log)
    train_loader = build_loader(train_ds, train_sampler, workers, cfg.train.seed)
    val_loader = build_loader(val_ds, val_sampler, workers, cfg.train.seed)
    global_batch = world * cfg.train.batch_size * cfg.train.grad_accum_steps
    lr = optim.scaled_lr(cfg.optim, global_batch)
    optimizer = optim.build_optimizer(model, cfg.optim, lr)
    spe = steps_per_epoch(train_sampler, cfg.train.grad_accum_steps)
    total_steps = cfg.train.epochs * spe
    scheduler = optim.build_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = optim.build_ema(accelerator.unwrap_model(model), cfg.train.ema_decay) if cfg.train.ema else None
    log(
        f"global batch {global_batch} -> lr {lr:.4g}; {total_steps} optimizer steps over {cfg.train.epochs} epochs, "
        f"{optim.warmup_steps(cfg.optim, total_steps)} of them warmup"
    )
    return Job(
        cfg=cfg,
        accelerator=accelerator,
        run_dir=run_dir,
        label_map=label_map,
        fingerprint=fingerprint,
        trained_on=lineage.trained_on(cfg, label_map),
        best_mode=best_mode,
        model=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        train_sampler=train_sampler,
        val_sampler=val_sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        val_ds=val_ds,
        gt=splits.val.to_coco_gt(),
        lr=lr,
        steps_per_epoch=spe,
    )


def resume(job: Job) -> RunState | None:
    """The state train.resume names, restored into the job's model, optimizer, schedule and
    weight average and put in this run's terms (checkpoint.resume, checkpoint.adapt_position);
    None when there is nothing to resume (train.resume=auto without a state): a fresh start."""
    cfg, log = job.cfg, job.log
    fresh = RunState(**job.layout)  # a state saved before the layout was recorded ran with this one
    saved = checkpoint.resume(
        cfg.train.resume,
        job.run_dir,
        job.accelerator,
        job.model,
        job.optimizer,
        job.scheduler,
        log,
        ema=job.ema,
        trained_on=job.trained_on,
        fresh=fresh,
    )
    if saved is None:
        return None
    return checkpoint.adapt_position(saved, job.layout, job.steps_per_epoch, job.lr, job.optimizer, job.scheduler, log)


def start_fresh(job: Job) -> None:
    """A fresh start: the files of an earlier run in this directory must not mix with this one's
    (checkpoint.set_aside_previous_run); no process writes into the directory before the move."""
    if job.main:
        checkpoint.set_aside_previous_run(job.run_dir, job.log)
    job.accelerator.wait_for_everyone()


def start_logging(job: Job, state: RunState) -> RunLogger:
    """Once the run knows whether it resumes: config.yaml, metrics.jsonl, the W&B run (new, or
    the state's, whose id goes into the state) and lineage.json (with the W&B dataset artifact)."""
    cfg = job.cfg
    if job.main:
        runtime.write_config(cfg, job.run_dir)
    logger = RunLogger(job.run_dir, enabled=job.main)
    state.wandb_id = logger.start_wandb(cfg.logging.wandb, config.to_dict(cfg), state.wandb_id, job.log, state.step)
    if job.main:  # lineage.json, the W&B dataset artifact and the fingerprint in the W&B config
        lineage.record(
            job.run_dir,
            job.fingerprint,
            logger.wandb_run,
            cfg.logging.wandb.dataset_artifact,
            job.log,
            cfg.logging.wandb.timeout_s,
        )
    return logger
