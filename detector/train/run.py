"""What tools/train.py builds once (a Job) and the steps its visible loop calls by name.

The loop itself stays in tools/train.py: these are plain functions taking the Job, the
RunState (which they update where the step says so) and the RunLogger, each one thing the
loop does at one point: train an epoch, validate, save a state or a weights file, analyse
and report an epoch, finish the run.
"""

from __future__ import annotations

import functools
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
from detector.evaluation import analysis
from detector.evaluation.coco import CocoResult
from detector.models.build import build_model, model_input_size
from detector.runs import lineage
from detector.runs.report import epoch_report
from detector.runs.tracking import RunLogger, summary_table
from detector.train import checkpoint, engine, optim
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
    accelerator = runtime.build_accelerator(cfg.train)
    log, main_proc = accelerator.print, accelerator.is_main_process
    run_dir = runtime.prepare_run_dir(cfg, accelerator)
    log(f"run directory {run_dir}; {runtime.world_info(accelerator)}")

    progress = data.header_progress(main_proc and cfg.logging.progress, cfg.logging.progress_interval_s)
    splits = data.load_splits(cfg, log, progress)
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


# -- the run's start ------------------------------------------------------------------------------


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


def set_aside_previous_run(job: Job) -> None:
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


# -- the loop's steps ---------------------------------------------------------------------------------


def train_epoch(job: Job, state: RunState, logger: RunLogger, stop: runtime.StopFlag, epoch: int) -> dict[str, Any]:
    """Train epoch ``epoch`` from the state's batch, with a progress bar (engine.train_one_epoch);
    after every optimizer step ``after_step`` runs. The state takes the epoch's count of
    non-finite steps in a row.

    Returns:
        The epoch's training numbers, with ``batch`` and ``stopped`` (a stop request ended it).

    Raises:
        engine.DataFailure, engine.NonFiniteLossError: for the loop to save what it can.
    """
    cfg = job.cfg
    job.train_sampler.set_epoch(epoch, state.batch)
    bar = runtime.progress(
        job.main and cfg.logging.progress,
        total=len(job.train_sampler),
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        interval=cfg.logging.progress_interval_s,
    )
    try:
        stats = engine.train_one_epoch(
            job.model,
            job.optimizer,
            job.scheduler,
            job.train_loader,
            job.accelerator,
            epoch=epoch,
            start_batch=state.batch,
            grad_accum_steps=cfg.train.grad_accum_steps,
            clip_grad_norm=cfg.train.clip_grad_norm,
            max_nonfinite_steps=cfg.train.max_nonfinite_steps,
            nonfinite_in_row=state.nonfinite_in_row,
            should_stop=stop,
            on_step=functools.partial(after_step, job, state, logger),
            progress=bar,
        )
    finally:
        bar.close()
    state.nonfinite_in_row = stats.pop("nonfinite_in_row")
    return stats


def after_step(job: Job, state: RunState, logger: RunLogger, record: dict[str, Any]) -> None:
    """After each optimizer step: count it, update the weight average, log the step's record
    every logging.log_every_steps and save a state every train.checkpoint_every_steps."""
    cfg = job.cfg
    state.step += 1
    state.batch = record["batch"]
    if record.pop("stepped") and job.ema is not None:
        job.ema.update_parameters(job.accelerator.unwrap_model(job.model))
    if state.step % cfg.logging.log_every_steps == 0:
        logger.log(record, "step", state.step)
    if cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0:
        save_state(job, state)


def validate(
    job: Job, state: RunState, epoch: int, stats: dict[str, Any]
) -> tuple[dict[str, Any], CocoResult, list[dict[str, Any]]]:
    """Score the weights of epoch ``epoch`` just trained (engine.evaluate), with a progress bar.

    Args:
        job, state: the run.
        epoch: the epoch trained (0-based).
        stats: its training numbers (train_epoch), which a failure saves in the state.

    Returns:
        The validation metrics, the COCO result and the detections (engine.evaluate).

    Raises:
        DatasetError: an image could not be read; the state saved first is "epoch trained, not
            validated", so that the resume validates it.
        ConfigError: eval.best_metric is a loss part this model does not report.
    """
    cfg = job.cfg
    bar = runtime.progress(
        job.main and cfg.logging.progress,
        total=len(job.val_sampler),
        desc="evaluate",
        leave=False,
        interval=cfg.logging.progress_interval_s,
    )
    try:
        val, coco, rows = engine.evaluate(
            job.scored,
            job.val_loader,
            job.val_sampler.batch_ids(),
            job.accelerator,
            job.label_map,
            job.gt,
            backend=cfg.eval.backend,
            seed=cfg.train.seed,
            progress=bar,
        )
    except engine.DataFailure as exc:  # the epoch's training is kept; the resume validates it
        state.epoch, state.batch = epoch, stats["batch"]  # every batch of the epoch done, not validated
        state.trained = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        save_state(job, state)
        raise data.DatasetError(
            f"{exc}. The state after epoch {epoch + 1}'s training was saved (the resume validates it): "
            "restore the file and resume with train.resume=auto"
        ) from None
    finally:
        bar.close()
    if cfg.eval.best_metric not in val:  # a loss part this model does not have
        parts = sorted(k for k in val if k.startswith("val/loss"))
        raise config.ConfigError(f"eval.best_metric={cfg.eval.best_metric}: validation reports {parts}")
    return val, coco, rows


def analyse(job: Job, logger: RunLogger, state: RunState, rows: list[dict[str, Any]], last: bool) -> None:
    """The error analysis of the epoch just validated (eval.analysis), on the main process, from
    the gathered detections (so the same for any process count).

    Args:
        rows: the detections (validate).
        last: the run's last evaluation (the last epoch, or an early stop).
    """
    cfg = job.cfg
    if job.main and cfg.eval.analysis:
        analysis.epoch_analysis(
            job.run_dir,
            job.gt,
            rows,
            job.val_ds.root,
            cfg.eval,
            logger,
            state.step,
            best=state.best_epoch == state.epoch,
            last=last,
            plots=cfg.logging.plots,
            warn=job.log,
        )


def save_state(job: Job, state: RunState, rng: dict[str, Any] | None = None) -> None:
    """A resumable state in the run directory; every process calls it (checkpoint.save_state).

    Args:
        rng: this process's RNG states to save (engine.DataFailure.rng); None: the current ones.
    """
    checkpoint.save_state(
        job.run_dir,
        job.accelerator,
        job.model,
        job.optimizer,
        job.scheduler,
        state,
        keep=job.cfg.train.keep_checkpoints,
        ema=job.ema,
        rng=rng,
        trained_on=job.trained_on,
    )


def save_weights(job: Job, logger: RunLogger, state: RunState, name: str, metrics: dict[str, Any], epoch: int) -> None:
    """best.pt or last.pt (``name``) in the run directory, of the scored weights, with the run's
    lineage and W&B run; every process calls it (checkpoint.save_weights).

    Args:
        metrics: the metrics to record with them.
        epoch: the epochs trained into them.
    """
    provenance = {
        "ema": job.ema is not None,
        "lineage": job.fingerprint,
        "wandb_run": lineage.wandb_ref(logger.wandb_run),
    }
    checkpoint.save_weights(
        job.run_dir / name, job.accelerator, job.scored, job.cfg, job.label_map, metrics, epoch, state.step, provenance
    )


def report_epoch(
    job: Job, logger: RunLogger, state: RunState, coco: CocoResult | None, metrics: dict[str, Any]
) -> None:
    """After the epoch's record is logged (so the curves end at this epoch): its plots (when it
    was validated and logging.plots) and its line on the console."""
    cfg = job.cfg
    if job.main and cfg.logging.plots and coco is not None:
        epoch_report(
            job.run_dir,
            job.accelerator.unwrap_model(job.scored),
            job.val_ds,
            coco,
            logger,
            state.step,
            cfg.logging.num_plot_images,
            cfg.logging.wandb.num_images,
            job.accelerator.device,
        )
    job.log(runtime.epoch_line(metrics))


def early_stop_message(job: Job, state: RunState, epoch: int) -> str:
    """What the run says when eval.early_stop_patience stops it after epoch ``epoch`` (0-based)."""
    return (
        f"early stop after epoch {epoch + 1}: {job.cfg.eval.best_metric} has not improved in "
        f"{state.evals_since_best} evaluation(s) (eval.early_stop_patience); best at epoch {state.best_epoch}"
    )


# -- the run's end --------------------------------------------------------------------------------


def finish(job: Job, logger: RunLogger, state: RunState, metrics: dict[str, Any]) -> None:
    """The end of the run: best.pt as a W&B model artifact (logging.wandb.log_checkpoint), the
    logger closed, the summary table; then every process ends together.

    Args:
        metrics: the last epoch's metrics.
    """
    cfg, run_dir = job.cfg, job.run_dir
    if job.main and cfg.logging.wandb.log_checkpoint and (run_dir / "best.pt").is_file():
        metadata = lineage.model_metadata(job.fingerprint, state.best_epoch, {cfg.eval.best_metric: state.best})
        logger.log_artifact(run_dir / "best.pt", f"best-{run_dir.name}", metadata=metadata)
    logger.close()
    job.log(summary_table(runtime.summary_rows(metrics, state, cfg, run_dir)))
    job.accelerator.wait_for_everyone()
    job.accelerator.end_training()
