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
from detector.models.zoo import recipe
from detector.train import checkpoint, engine, loop
from detector.train import process as runtime
from detector.train.job import build_job, resume, start_fresh, start_logging
from detector.train.state import RunState


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config.load(args.config, args.overrides, recipe)  # the family's defaults for the keys left unset
    job = build_job(cfg)  # model keys, accelerator, run directory, data, model, optimizer, weight average
    log, epochs, patience = job.log, cfg.train.epochs, cfg.eval.early_stop_patience

    # -- resume or start ---------------------------------------------------------------------------
    state = resume(job) if cfg.train.resume else None
    if state is None:  # a fresh start
        state = RunState(**job.layout)
        start_fresh(job)  # an earlier run's files in the run directory move aside
    elif (early_stopped := state.patience_spent(patience)) or state.epoch >= epochs:  # nothing left to train
        log(runtime.finished_message(state, cfg, job.run_dir, early_stopped))
        return 0
    logger = start_logging(job, state)  # config.yaml, metrics.jsonl, W&B, lineage.json
    stop = runtime.StopFlag(cfg.train.time_limit_minutes)

    # -- loop ----------------------------------------------------------------------------------------
    metrics: dict = {}
    for epoch in range(state.epoch, epochs):
        try:
            stats = loop.train_epoch(job, state, logger, stop, epoch)  # after each optimizer step: loop.after_step
        except engine.DataFailure as exc:  # an image vanished or broke mid-run: keep the work done so far
            loop.save_state(job, state, exc.rng)  # the RNG states of the last step (the forwards since drew from them)
            raise data.DatasetError(
                f"{exc}. A state was saved at step {state.step}: restore the file and resume with train.resume=auto"
            ) from None
        except engine.NonFiniteLossError as exc:
            loop.save_weights(job, logger, state, "last.pt", metrics, epoch)
            log(f"error: {exc}. {job.run_dir / 'last.pt'} holds the last good weights.")
            return errors.EXIT_NONFINITE
        if stats.pop("stopped"):  # preempted: save where we are, exit for the scheduler to requeue
            loop.save_state(job, state)
            return runtime.preempted(job.run_dir, job.accelerator, stop.reason(), log)
        state.end_epoch(epoch, stats)
        metrics = {"epoch": epoch + 1, **stats}
        stop_early, coco = False, None
        if (epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == epochs:
            val, coco, rows = loop.validate(job, state, epoch, stats)
            metrics.update(val)
            if state.record_validation(checkpoint.best_score(val, cfg.eval.best_metric), job.best_mode):
                loop.save_weights(job, logger, state, "best.pt", metrics, epoch + 1)
            stop_early = state.patience_spent(patience) and epoch + 1 < epochs
            loop.analyse(job, logger, state, rows, last=epoch + 1 == epochs or stop_early)
        loop.save_weights(job, logger, state, "last.pt", metrics, epoch + 1)
        if (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or epoch + 1 == epochs or stop_early:
            loop.save_state(job, state)
        logger.log(metrics, "epoch", state.step)
        loop.report_epoch(job, logger, state, coco, metrics)  # plots after the log: the curves end at this epoch
        if stop_early:
            log(loop.early_stop_message(job, state, epoch))
            break

    # -- finish --------------------------------------------------------------------------------------
    loop.finish(job, logger, state, metrics)  # the W&B model artifact, the summary table
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
