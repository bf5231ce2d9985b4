"""Train a detector: one straight path from config to checkpoints.

accelerate launch tools/train.py --config configs/frcnn.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from detector import cli
from detector.core import errors


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=3")
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported

from detector import config, data
from detector.core import progress
from detector.data.loader import (
    EvalBatchSampler,
    TrainBatchSampler,
    build_loader,
    cap_workers,
    steps_per_epoch,
)
from detector.evaluation import analysis
from detector.models.build import build_model, model_input_size
from detector.models.zoo import check_keys
from detector.runs import lineage
from detector.runs.report import epoch_report
from detector.runs.tracking import RunLogger, summary_table
from detector.train import checkpoint, engine, optim
from detector.train import process as runtime


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    check_keys(cfg.model)  # the model.* keys its family takes (the schema alone cannot tell)

    # -- setup -----------------------------------------------------------------------------------
    accelerator = runtime.build_accelerator(cfg.train)
    log, main_proc = accelerator.print, accelerator.is_main_process
    run_dir = runtime.prepare_run_dir(cfg, accelerator)
    log(f"run directory {run_dir}; {runtime.world_info(accelerator)}")

    # -- build: data, model, optimizer ---------------------------------------------------------------
    splits = data.load_splits(cfg, log, data.header_progress(main_proc and cfg.logging.progress, cfg.logging.progress_interval_s))  # fmt: skip
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
    scored = ema.module if ema is not None else model  # what validation scores and best.pt/last.pt hold
    log(
        f"global batch {global_batch} -> lr {lr:.4g}; {total_steps} optimizer steps over {cfg.train.epochs} epochs, "
        f"{optim.warmup_steps(cfg.optim, total_steps)} of them warmup"
    )

    # -- resume --------------------------------------------------------------------------------------
    layout = {"world_size": world, "batch_size": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps}
    pos = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_epoch": 0, "evals_since_best": 0,
           "wandb_id": None, "nonfinite_in_row": 0, **layout}  # fmt: skip
    trained_on = lineage.trained_on(cfg, label_map)  # a state of another model or other classes cannot resume
    resumed = checkpoint.resume(cfg.train.resume, run_dir, accelerator, model, optimizer, scheduler, log, ema,
                                trained_on) if cfg.train.resume else {}  # fmt: skip
    if resumed:
        pos = checkpoint.adapt_position({**pos, **resumed}, layout, spe, lr, optimizer, scheduler, log)
        early_stopped = 0 < cfg.eval.early_stop_patience <= pos["evals_since_best"]  # a state an early stop saved
        if pos["epoch"] >= cfg.train.epochs or early_stopped:
            log(runtime.finished_message(pos, cfg, run_dir, early_stopped))
            return 0
    else:  # a fresh start: the files of an earlier run in this directory must not mix with this one's
        if main_proc:
            checkpoint.set_aside_previous_run(run_dir, log)
        accelerator.wait_for_everyone()  # no process writes into the run directory before the move
    if main_proc:
        runtime.write_config(cfg, run_dir)
    logger = RunLogger(run_dir, enabled=main_proc)
    pos["wandb_id"] = logger.start_wandb(cfg.logging.wandb, config.to_dict(cfg), pos["wandb_id"], log, pos["step"])
    if main_proc:  # lineage.json, the W&B dataset artifact and the fingerprint in the W&B config
        lineage.record(run_dir, fingerprint, logger.wandb_run, cfg.logging.wandb.dataset_artifact, log,
                       cfg.logging.wandb.timeout_s)  # fmt: skip
    provenance = {"lineage": fingerprint, "wandb_run": lineage.wandb_ref(logger.wandb_run)}  # into best.pt/last.pt
    stop = runtime.StopFlag(cfg.train.time_limit_minutes)
    gt = splits.val.to_coco_gt()

    def save_state(rng: dict | None = None) -> None:
        checkpoint.save_state(run_dir, accelerator, model, optimizer, scheduler, pos, cfg.train.keep_checkpoints, ema,
                              rng, trained_on)  # fmt: skip

    def save_weights(name: str, metrics: dict, epoch: int) -> None:
        checkpoint.save_weights(run_dir / name, accelerator, scored, cfg, label_map, metrics, epoch, pos["step"],
                                {"ema": ema is not None, **provenance})  # fmt: skip

    def on_step(record: dict) -> None:  # logging, weight average and mid-epoch checkpoints
        pos["step"] += 1
        pos["batch"] = record["batch"]
        if record.pop("stepped") and ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))
        if pos["step"] % cfg.logging.log_every_steps == 0:
            logger.log(record, "step", pos["step"])
        if cfg.train.checkpoint_every_steps and pos["step"] % cfg.train.checkpoint_every_steps == 0:
            save_state()

    # -- loop ----------------------------------------------------------------------------------------
    metrics: dict = {}
    for epoch in range(pos["epoch"], cfg.train.epochs):
        train_sampler.set_epoch(epoch, pos["batch"])
        bar = progress.progress(
            main_proc and cfg.logging.progress, total=len(train_sampler), desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            interval=cfg.logging.progress_interval_s,
        )  # fmt: skip
        try:
            stats = engine.train_one_epoch(
                model, optimizer, scheduler, train_loader, accelerator,
                epoch=epoch, start_batch=pos["batch"], grad_accum_steps=cfg.train.grad_accum_steps,
                clip_grad_norm=cfg.train.clip_grad_norm, max_nonfinite_steps=cfg.train.max_nonfinite_steps,
                nonfinite_in_row=pos["nonfinite_in_row"], should_stop=stop, on_step=on_step, progress=bar,
            )  # fmt: skip
        except engine.DataFailure as exc:  # an image vanished or broke mid-run: keep the work done so far
            save_state(exc.rng)  # the RNG states of the last step (the forwards since drew from them)
            raise data.DatasetError(
                f"{exc}. A state was saved at step {pos['step']}: restore the file and resume with train.resume=auto"
            ) from None
        except engine.NonFiniteLossError as exc:
            save_weights("last.pt", metrics, epoch)
            log(f"error: {exc}. {run_dir / 'last.pt'} holds the last good weights.")
            return errors.EXIT_NONFINITE
        finally:
            bar.close()
        pos["nonfinite_in_row"] = stats.pop("nonfinite_in_row")
        if stats.pop("stopped"):  # preempted: save where we are, exit for the scheduler to requeue
            save_state()
            return runtime.preempted(run_dir, accelerator, stop.reason(), log)
        stats.update(pos.pop("trained", None) or {})  # resumed after its validation failed: its training's numbers
        pos["epoch"], pos["batch"] = epoch + 1, 0
        metrics = {"epoch": epoch + 1, **stats}
        stop_early, coco = False, None
        if (epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == cfg.train.epochs:
            bar = progress.progress(
                main_proc and cfg.logging.progress, total=len(val_sampler), desc="evaluate", leave=False,
                interval=cfg.logging.progress_interval_s,
            )  # fmt: skip
            try:
                val, coco, rows = engine.evaluate(
                    scored, val_loader, val_sampler.batch_ids(), accelerator, label_map, gt,
                    backend=cfg.eval.backend, seed=cfg.train.seed, progress=bar,
                )  # fmt: skip
            except engine.DataFailure as exc:  # the epoch's training is kept; the resume validates it
                pos["epoch"], pos["batch"] = epoch, stats["batch"]  # every batch of the epoch done, not validated
                pos["trained"] = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
                save_state()
                raise data.DatasetError(
                    f"{exc}. The state after epoch {epoch + 1}'s training was saved (the resume validates it): "
                    "restore the file and resume with train.resume=auto"
                ) from None
            finally:
                bar.close()
            metrics.update(val)
            if cfg.eval.best_metric not in val:  # a loss part this model does not have
                parts = sorted(k for k in val if k.startswith("val/loss"))
                raise config.ConfigError(f"eval.best_metric={cfg.eval.best_metric}: validation reports {parts}")
            score = checkpoint.best_score(val, cfg.eval.best_metric)  # None: COCOeval's -1, nothing to score
            if checkpoint.is_better(score, pos["best"], best_mode):
                pos["best"], pos["best_epoch"], pos["evals_since_best"] = score, epoch + 1, 0
                save_weights("best.pt", metrics, epoch + 1)
            else:
                pos["evals_since_best"] += 1
            stop_early = 0 < cfg.eval.early_stop_patience <= pos["evals_since_best"] and epoch + 1 < cfg.train.epochs
            if main_proc and cfg.eval.analysis:  # from the gathered detections: the same for any process count
                analysis.epoch_analysis(run_dir, gt, rows, val_ds.root, cfg.eval, logger, pos["step"],
                                        best=pos["best_epoch"] == epoch + 1, last=epoch + 1 == cfg.train.epochs or stop_early,
                                        plots=cfg.logging.plots, warn=log)  # fmt: skip
        save_weights("last.pt", metrics, epoch + 1)
        if (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or epoch + 1 == cfg.train.epochs or stop_early:
            save_state()
        logger.log(metrics, "epoch", pos["step"])
        if main_proc and cfg.logging.plots and coco is not None:  # after the log, so the curves end at this epoch
            epoch_report(run_dir, accelerator.unwrap_model(scored), val_ds, coco, logger, pos["step"],
                         cfg.logging.num_plot_images, cfg.logging.wandb.num_images, accelerator.device)  # fmt: skip
        log(runtime.epoch_line(metrics))
        if stop_early:
            log(f"early stop after epoch {epoch + 1}: {cfg.eval.best_metric} has not improved in "
                f"{pos['evals_since_best']} evaluation(s) (eval.early_stop_patience); best at epoch {pos['best_epoch']}")  # fmt: skip
            break

    # -- finish --------------------------------------------------------------------------------------
    if main_proc and cfg.logging.wandb.log_checkpoint and (run_dir / "best.pt").is_file():
        logger.log_artifact(run_dir / "best.pt", f"best-{run_dir.name}",
                            metadata=lineage.model_metadata(fingerprint, pos["best_epoch"], {cfg.eval.best_metric: pos["best"]}))  # fmt: skip
    logger.close()
    log(summary_table(runtime.summary_rows(metrics, pos, cfg, run_dir)))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
