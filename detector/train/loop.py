"""The steps tools/train.py's loop calls at its named points, and the run's end.

Plain functions taking the Job (detector/train/job.py), the RunState (which they update where
the step says so) and the RunLogger, each one thing the loop does: train an epoch, validate,
analyse it, save a state or a weights file, report the epoch, finish the run. No hooks: the loop
shows when each runs.
"""

from __future__ import annotations

import functools
from typing import Any

from detector import config, data
from detector.core import progress
from detector.evaluation import analysis
from detector.evaluation.cocoeval import CocoResult
from detector.runs import lineage
from detector.runs.report import epoch_report
from detector.runs.tracking import RunLogger, summary_table
from detector.train import checkpoint, engine
from detector.train import process as runtime
from detector.train.job import Job
from detector.train.state import RunState


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
    bar = progress.progress(
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
    bar = progress.progress(
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
