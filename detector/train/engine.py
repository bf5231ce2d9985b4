"""The loops: ``train_one_epoch`` and ``evaluate``, plain functions that return metric dicts.

Validation computes the loss and the detections in one pass over the backbone (each family's
``loss_and_detections``, see detector/families), and gives the same numbers on 1 or N processes: the validation
batches do not depend on the number of processes, nothing is padded, and the per-batch results
are gathered and reduced in batch order on the main process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from detector.core.errors import DatasetError
from detector.core.labels import LabelMap
from detector.evaluation.cocoeval import CocoResult, detections_to_coco, evaluate_coco, flat_metrics, segm_metrics
from detector.models.family import loss_key
from detector.models.zoo import loss_and_detections


class DataFailure(DatasetError):
    """An image could not be read mid-run (data.on_corrupt_image=error), on some process.

    Every process raises it at the same point, before any weight changes from the failed
    batch, with the message of the process where it happened, so the caller can save a state
    (a collective) and stop cleanly. ``rng`` holds this process's RNG states as they were at
    the last optimizer step (the forwards since have drawn from them), for that state.
    """

    rng: dict[str, Any] | None = None


def _batches(loader: Any) -> Any:
    """The loader's batches; a data error becomes an empty batch plus the error."""
    it = iter(loader)
    while True:
        try:
            images, targets, skipped = next(it)
        except StopIteration:
            return
        except DatasetError as exc:
            from detector.core.errors import error_text

            yield [], [], 0, error_text(exc)
            return
        yield images, targets, skipped, None


def _raise_data_failure(accelerator: Accelerator, error: str | None, rng: dict[str, Any] | None = None) -> None:
    """Every process raises DataFailure when any process had a data error (all must call)."""
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
    errors = [e for e in errors if e]
    if errors:
        failure = DataFailure(errors[0])
        failure.rng = rng
        raise failure


def _step_snapshot(net: nn.Module) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The RNG states and the model's buffers (BatchNorm statistics) at an optimizer step: what
    the forwards of an accumulation window change before its step."""
    from detector.train.checkpoint import rng_state

    return rng_state(), [b.detach().clone() for b in net.buffers()]


def _back_to(net: nn.Module, snapshot: tuple[dict[str, Any], list[torch.Tensor]]) -> dict[str, Any]:
    """Put the buffers of ``_step_snapshot`` back; returns its RNG states."""
    with torch.no_grad():
        for buf, saved in zip(net.buffers(), snapshot[1]):
            buf.copy_(saved)
    return snapshot[0]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def to_device(
    images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """uint8 images -> float [0, 1] on the device (the conversion happens here, not in workers)."""
    imgs = [im.to(device, non_blocking=True).float().div_(255.0) for im in images]
    tgts = [{k: t[k].to(device) for k in ("boxes", "labels", "masks") if k in t} for t in targets]
    return imgs, tgts


def _stand_in_batch(
    last: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]] | None, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Something for the model to run on when this process's whole batch failed to decode.

    Every process must run the same forward (DDP's gradient all-reduce) and produce the same
    loss parts (our one all-reduce per step), so the model never sees an empty batch on one
    process only: it runs on this process's previous finite batch (or, before the first, a
    blank image without objects), with BatchNorm in eval mode, and the result is weighted 0 in
    the gradient and in every mean.
    """
    if last is not None:
        return last
    blank = torch.zeros(3, 64, 64, device=device)
    return [blank], [{"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.int64,
                                                                                     device=device),
                      "masks": torch.zeros(0, 64, 64, dtype=torch.uint8, device=device)}]  # fmt: skip


@contextlib.contextmanager
def _norm_frozen(model: nn.Module, enabled: bool):
    """BatchNorm in eval mode for the block (a stand-in batch must not move running statistics)."""
    if not enabled:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def sync_buffers(model: nn.Module, accelerator: Accelerator) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics).

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    process holds its own running statistics; validation would then blend N different models
    while best.pt (written by the main process) holds one. After this call the model that is
    scored is the model that is saved.
    """
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for buf in accelerator.unwrap_model(model).buffers():
        dist.broadcast(buf.data, src=0)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block with the CPU RNG (and this CUDA device's) seeded, restoring them afterwards.

    Only the generators that are forked are seeded: ``torch.manual_seed`` would also reseed
    every CUDA device, restarting the training sampling stream after each evaluation.
    """
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    *,
    epoch: int,
    start_batch: int,
    grad_accum_steps: int,
    clip_grad_norm: float | None,
    max_nonfinite_steps: int,
    nonfinite_in_row: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Train over this process's shard of one epoch (from ``start_batch`` when resuming).

    Args:
        model, optimizer: as returned by ``accelerator.prepare``.
        scheduler: a per-optimizer-step schedule (stepped here, not by Accelerate).
        loader: batches of (images, targets, skipped) for this process.
        accelerator: the run's Accelerator (autocast, backward, reductions).
        epoch: the epoch number (for the records).
        start_batch: batches of this epoch already trained before a resume.
        grad_accum_steps: micro-batches per optimizer step.
        clip_grad_norm: max gradient norm, or None.
        max_nonfinite_steps: raise NonFiniteLossError after this many skipped steps in a row.
        nonfinite_in_row: the count carried over from the previous epoch.
        should_stop: polled every step (preemption signal, time limit); every process stops
            at the same step when any process asks to.
        on_step: called after every optimizer step with the step's record (logging, weight
            average, mid-epoch checkpoints); its "stepped" is False for a skipped step.
        progress: an optional tqdm bar to advance.

    Returns:
        Mean losses over the epoch, lr, the images trained on and the run's images/s, the
        skipped images and dropped boxes (all summed over the processes), the non-finite
        steps, and ``batch`` (where it stopped) and ``stopped`` (True when should_stop ended
        it early).
    """
    model.train()
    net = accelerator.unwrap_model(model)
    at_step = _step_snapshot(net)  # a data failure saves the state of the last step, not a window's part
    n_batches = start_batch + len(loader)
    sums: dict[str, float] = defaultdict(float)
    counted = 0
    images_seen = 0
    skipped_images = dropped_boxes = nonfinite_total = 0
    window_bad = False
    stopped = False
    done = start_batch  # batches of this epoch trained, for the records and a resume
    last_batch = None
    window_sums: dict[str, float] = defaultdict(float)  # loss parts x images over the accumulation window
    window_n = 0.0
    t0 = time.perf_counter()
    for batch_i, (images, targets, skipped, data_error) in enumerate(_batches(loader), start=start_batch):
        window_start = (batch_i // grad_accum_steps) * grad_accum_steps
        window_len = min(grad_accum_steps, n_batches - window_start)
        sync = batch_i + 1 == window_start + window_len
        imgs, tgts = to_device(images, targets, accelerator.device)
        n_local = len(imgs)
        if not n_local:  # every image of this batch failed to decode (data.on_corrupt_image=skip)
            imgs, tgts = _stand_in_batch(last_batch, accelerator.device)
        ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
        with ctx:
            with accelerator.autocast(), _norm_frozen(model, not n_local):
                loss_dict = {loss_key(k): v for k, v in model(imgs, tgts).items()}
            loss = sum(loss_dict.values())
            # One all-reduce carries the loss parts, the finite flag, the data-error flag and
            # the stop request.
            parts = torch.stack([v.detach().float() for v in loss_dict.values()])
            flags = torch.tensor(
                [float(n_local > 0 and not torch.isfinite(loss)), float(data_error is not None),
                 float(should_stop()), float(n_local)],
                device=parts.device,
            )  # fmt: skip
            reduced = accelerator.reduce(torch.cat([parts * n_local, flags]), reduction="sum")
            if reduced[-3] > 0:  # an image could not be read: stop before this batch changes anything
                _raise_data_failure(accelerator, data_error, _back_to(net, at_step))
            nonfinite = bool(reduced[-4] > 0)
            if n_local and torch.isfinite(loss):
                last_batch = (imgs, tgts)  # a stand-in for a later batch that fails to decode
            if nonfinite:
                window_bad = True
            else:  # a stand-in batch is weighted 0 (nan_to_num: its loss may not be finite)
                accelerator.backward(loss / window_len if n_local else loss.nan_to_num() * 0.0)
        n_global = float(reduced[-1])
        images_seen += int(n_global)
        skipped_images += skipped
        dropped_boxes += sum(int(t["dropped"]) for t in targets)
        if not nonfinite and n_global > 0:
            for k, v in zip(loss_dict, reduced[: len(loss_dict)].tolist()):
                sums[k] += v
                window_sums[k] += v
            counted += n_global
            window_n += n_global
        if sync:
            record: dict[str, Any] = {"epoch": epoch, "batch": batch_i + 1, "stepped": not window_bad}
            if window_bad:
                optimizer.zero_grad(set_to_none=True)
                nonfinite_total += 1
                nonfinite_in_row += 1
                record["train/nonfinite_steps"] = nonfinite_total
                accelerator.print(
                    f"warning: non-finite loss at epoch {epoch} batch {batch_i}: step skipped "
                    f"({nonfinite_in_row} in a row, limit {max_nonfinite_steps})"
                )
                if nonfinite_in_row >= max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_steps="
                        f"{max_nonfinite_steps}); lower optim.lr, check the data, or use "
                        "train.clip_grad_norm / mixed_precision=no"
                    )
            else:
                nonfinite_in_row = 0
                if clip_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16 scaler found inf grads
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            record["lr"] = optimizer.param_groups[0]["lr"]
            if window_n > 0 and not window_bad:  # the mean over the window the step used
                record.update({f"train/{k}": v / window_n for k, v in window_sums.items()})
                record["train/loss"] = sum(window_sums.values()) / window_n
            window_bad = False
            window_sums.clear()
            window_n = 0.0
            if progress is not None:
                progress.set_postfix(
                    loss=f"{record.get('train/loss', float('nan')):.3f}",
                    lr=f"{record['lr']:.2e}",
                    img_s=f"{images_seen / max(time.perf_counter() - t0, 1e-9):.1f}",
                )
            if on_step is not None:
                on_step(record)
            at_step = _step_snapshot(net)
            if reduced[-2] > 0:  # someone asked to stop: every process stops here
                stopped = True
        done = batch_i + 1
        if progress is not None:
            progress.update(1)
        if stopped:
            break
    skipped_images, dropped_boxes, elapsed = _run_totals(accelerator, skipped_images, dropped_boxes,
                                                         time.perf_counter() - t0)  # fmt: skip
    out: dict[str, Any] = {f"train/{k}": v / max(counted, 1) for k, v in sums.items()}
    out["train/loss"] = sum(sums.values()) / max(counted, 1)
    out.update(
        {
            "lr": optimizer.param_groups[0]["lr"],
            "train/images": images_seen,
            "train/images_per_s": images_seen / max(elapsed, 1e-9),
            "train/skipped_images": skipped_images,
            "train/dropped_boxes": dropped_boxes,
            "train/nonfinite_steps": nonfinite_total,
            "nonfinite_in_row": nonfinite_in_row,
            "batch": done,
            "stopped": stopped,
        }
    )
    return out


def _run_totals(accelerator: Accelerator, skipped: int, dropped: int, elapsed: float) -> tuple[int, int, float]:
    """The epoch's skipped images and dropped boxes summed over the processes, and the slowest
    process's time (every process must call it).

    The loop counts them per process (its own batches) and leaves them out of the per-step
    all-reduce; one gather of three numbers at the end of the epoch gives the run's totals.
    (The images trained on are already the run's: the per-step all-reduce carries them.)
    """
    if accelerator.num_processes == 1:
        return skipped, dropped, elapsed
    mine = torch.tensor([[skipped, dropped, elapsed]], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(mine)  # (processes, 3)
    return int(every[:, 0].sum()), int(every[:, 1].sum()), float(every[:, 2].max())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    batch_ids: list[int],
    accelerator: Accelerator,
    label_map: LabelMap,
    gt: dict[str, Any],
    *,
    backend: str = "pycocotools",
    seed: int = 0,
    progress: Any = None,
    detect: Callable[[nn.Module, list[torch.Tensor]], list[dict[str, Any]]] | None = None,
) -> tuple[dict[str, float], CocoResult, list[dict[str, Any]]]:
    """Validation loss and COCOeval metrics, identical for any number of processes.

    Args:
        model: the (possibly wrapped) model; evaluated unwrapped, in eval mode.
        loader: this process's validation batches (see EvalBatchSampler).
        batch_ids: the global position of each of this process's batches.
        accelerator: for autocast, gathering and broadcasting.
        label_map: labels -> dataset category ids.
        gt: the COCO ground truth (CocoIndex.to_coco_gt()).
        backend: "pycocotools" or "faster_coco_eval".
        seed: seeds the loss's anchor/proposal sampling per batch (reproducible, and the
            training RNG stream is left untouched).
        progress: optional tqdm bar.
        detect: makes the detections instead of the model's own pass, e.g. sliced inference
            (detector.inference.slicing); then there is no val loss (val/loss is NaN).

    Returns:
        (metrics, coco_result, results): val/loss (+ parts), val/<stat> and val/AP/<class>;
        the full CocoResult; the COCO result rows. Every process gets the same values.
    """
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    local: list[tuple[int, int, dict[str, float], list[dict[str, Any]], int]] = []
    sync_buffers(model, accelerator)
    data_error = None
    for batch_id, (images, targets, skipped, data_error) in zip(batch_ids, _batches(loader)):
        if data_error is not None:
            break
        imgs, tgts = to_device(images, targets, accelerator.device)
        if imgs and detect is not None:
            losses, dets = {}, detect(net, imgs)
            rows = detections_to_coco(dets, targets, label_map)
        elif imgs:
            with seeded(seed * 1_000_003 + batch_id, accelerator.device):
                losses, dets = loss_and_detections(net, imgs, tgts, accelerator.autocast)
            rows = detections_to_coco(dets, targets, label_map)
        else:
            losses, rows = {}, []
        local.append((batch_id, len(imgs), {k: float(v) for k, v in losses.items()}, rows, skipped))
        if progress is not None:
            progress.update(1)
    net.train(was_training)
    _raise_data_failure(accelerator, data_error)
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        gathered = sorted(gathered, key=lambda r: r[0])
        n_total = sum(r[1] for r in gathered)
        loss_sums: dict[str, float] = defaultdict(float)
        for _, n, losses, _, _ in gathered:
            for k, v in losses.items():
                loss_sums[k] += v * n
        metrics = {f"val/{k}": v / max(n_total, 1) for k, v in loss_sums.items()}
        metrics["val/loss"] = sum(loss_sums.values()) / max(n_total, 1) if loss_sums else math.nan
        results = [row for r in gathered for row in r[3]]
        coco = evaluate_coco(gt, results, backend)
        metrics.update(flat_metrics(coco))
        metrics.update(segm_metrics(gt, results, backend)[0])  # val/segm/...: masked ground truth only
        metrics["val/images"] = n_total
        metrics["val/skipped_images"] = sum(r[4] for r in gathered)
        payload = [(metrics, coco, results)]
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    metrics, coco, results = payload[0]
    return metrics, coco, results
