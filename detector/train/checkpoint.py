"""Checkpoints: weights files for people and tools, and the resumable training state.

``best.pt`` / ``last.pt`` hold plain data: the unwrapped state dict (no ``module.`` prefix),
the resolved config, the label map, input-size settings, metrics, epoch and library versions.
``torch.load(path, weights_only=True)`` reads them.

The resumable state is a directory ``checkpoints/step_NNNNNNNN`` with the model, optimizer,
scheduler and gradient-scaler state, the training position (epoch, batch, step, best score,
W&B run id) and, per process, every RNG state (python, numpy, torch, CUDA), all as tensors and
plain containers, so it too loads with ``weights_only=True``; no pickled Python objects. It is
written to a temporary directory and renamed into place, so a crash mid-write leaves the
previous state intact; ``find_resumable`` skips states that are incomplete or unreadable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.core.errors import CheckpointError, WriteError
from detector.models import weights
from detector.train.state import LAYOUT_KEYS, RunState
from detector.train.state import is_better as is_better  # the best-score rule, where its callers found it

STATE_DIR = "checkpoints"
COMPLETE = "COMPLETE.json"


atomic_save = weights.save  # a state file is written like a weights file: temp, fsync, rename


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a small text file atomically (see weights.save); raises WriteError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise weights.write_error(path, exc) from None


# -- RNG states as plain tensors -----------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, as tensors and plain values (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- resumable state ---------------------------------------------------------------------------------


def save_state(
    run_dir: str | Path,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: RunState,
    keep: int,
    ema: torch.nn.Module | None = None,
    rng: dict[str, Any] | None = None,
    trained_on: dict[str, Any] | None = None,
) -> Path | None:
    """Save a resumable state; every process must call it (each writes its own RNG state).

    Args:
        run_dir: the run directory.
        accelerator: the run's Accelerator (process index, barriers, scaler).
        model, optimizer, scheduler: the training objects.
        position: the run's state (epoch, batch within the epoch, step, best score, W&B id...),
            stored as its plain dict.
        keep: how many states to keep (older ones are deleted).
        ema: the weight average (train.ema), saved beside the model.
        rng: this process's RNG states to save (engine.DataFailure.rng); None: the current ones.
        trained_on: the model and classes of the run (lineage.trained_on), which a resume
            compares with its own (check_trained_on).

    Returns:
        The state directory (on the main process).
    """
    root = Path(run_dir) / STATE_DIR
    saved = position.to_dict()
    name = f"step_{int(position.step):08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    main = accelerator.is_main_process
    error = None
    if main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = str(weights.write_error(tmp, exc))
    agree(accelerator, error, tmp)
    try:
        atomic_save(rng if rng is not None else rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
        if main:
            scaler = getattr(accelerator, "scaler", None)
            atomic_save(
                {
                    "model": accelerator.unwrap_model(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    "position": saved,
                    "trained_on": trained_on,
                },
                tmp / "state.pt",
            )
    except WriteError as exc:
        error = str(exc)
    agree(accelerator, error, tmp)
    if main:
        try:
            files = sorted(p.name for p in tmp.iterdir())
            atomic_write_text(
                json.dumps({"files": files, "num_processes": accelerator.num_processes, **_jsonable(saved)}),
                tmp / COMPLETE,
            )
            _move_into_place(tmp, final)
            _fsync_dir(root)
        except (OSError, WriteError) as exc:
            error = str(exc if isinstance(exc, WriteError) else weights.write_error(final, exc))
        else:
            for old in list_states(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    agree(accelerator, error, tmp)
    return final if main else None


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the written state ``tmp`` to ``final``; a state already there (saved at the same
    step: a mid-epoch checkpoint, then the end of the epoch or a stop) is moved aside first and
    deleted only once the new one is in place, and moved back if that fails."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def agree(accelerator: Any, error: str | None, cleanup: Path | None = None) -> None:
    """A synchronisation point where a write error on any process stops every process.

    Without it, a process whose write failed would leave the others waiting at the next
    barrier until the collective timeout. All processes must call it; each passes its own
    error (or None). On any error the main process removes ``cleanup`` (a half-written state)
    and every process raises the same WriteError.
    """
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = [e for e in gather_object([error]) if e]
    else:
        errors = [error] if error else []
    if errors:
        if cleanup is not None and accelerator.is_main_process:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise WriteError(errors[0])


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_states(run_dir: str | Path) -> list[Path]:
    """Complete state directories, oldest first."""
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE).is_file())


def load_state_files(state_dir: str | Path, process_index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a state directory (weights_only); raises CheckpointError on any damage."""
    state_dir = Path(state_dir)
    try:
        meta = json.loads((state_dir / COMPLETE).read_text())
        state = torch.load(state_dir / "state.pt", map_location="cpu", weights_only=True)
        rng_file = state_dir / f"rng_{process_index}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    except Exception as exc:  # truncated zip, bad json, pickled objects...
        raise CheckpointError(f"{state_dir}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if rng is None and meta.get("num_processes", 1) > process_index:
        raise CheckpointError(f"{state_dir}: missing rng_{process_index}.pt")
    return state, rng or {}


def find_resumable(run_dir: str | Path, process_index: int, log=print) -> tuple[Path, dict, dict] | None:
    """The newest readable state in the run directory, skipping damaged ones (with a warning)."""
    for state_dir in reversed(list_states(run_dir)):
        try:
            state, rng = load_state_files(state_dir, process_index)
            return state_dir, state, rng
        except CheckpointError as exc:
            log(f"warning: {exc}; trying an older state")
    return None


def agreed_resumable(run_dir: str | Path, accelerator: Any, log=print) -> tuple[Path, dict, dict] | None:
    """``find_resumable`` with one answer for every process: the main process's choice (or a fresh
    start), which each process then reads its own files of. Each process choosing for itself could
    split the run (one starting fresh while another resumes) when one of its files is damaged.

    Raises:
        CheckpointError: on every process, when some process cannot read the chosen state.
    """
    found = find_resumable(run_dir, accelerator.process_index, log)
    if accelerator.num_processes == 1:
        return found
    from accelerate.utils import broadcast_object_list, gather_object

    box = [str(found[0]) if found is not None else None]
    broadcast_object_list(box, from_process=0)
    chosen, problem = box[0], None
    if chosen is not None and (found is None or str(found[0]) != chosen):
        try:
            found = (Path(chosen), *load_state_files(Path(chosen), accelerator.process_index))
        except CheckpointError as exc:
            problem = f"process {accelerator.process_index}: {exc}"
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        raise CheckpointError(
            f"the processes cannot resume from one state ({chosen}): {'; '.join(problems)}; pass train.resume=PATH "
            "of an older state directory, or start over with train.resume=null"
        )
    return None if chosen is None else found


def restore(state: dict[str, Any], rng: dict[str, Any], accelerator: Any, model, optimizer, scheduler,
            ema=None) -> dict:  # fmt: skip
    """Load a state into the training objects; returns the training position as saved (a dict:
    RunState.from_dict reads it).

    Raises:
        CheckpointError: the state's weights do not fit the model (another model or number of
            classes, in a state that does not record them).
    """
    try:
        accelerator.unwrap_model(model).load_state_dict(state["model"])
    except RuntimeError as exc:  # size mismatch, missing or unexpected keys
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"its weights do not fit this run's model ({' '.join(lines[:2])[:300]})") from None
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError("the state has no weight average (it was saved with train.ema=false)")
        ema.load_state_dict(state["ema"])
    saved_groups = state["optimizer"]["param_groups"]
    was = next((float(g["lr_factor"]) for g in saved_groups if "lr_factor" in g), 1.0)
    now = next((float(g["lr_factor"]) for g in optimizer.param_groups if "lr_factor" in g), 1.0)
    if was != now or len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"its optimizer was saved with optim.backbone_lr_factor={was:g} ({len(saved_groups)} parameter groups) and "
            f"this run sets {now:g} ({len(optimizer.param_groups)}); resume with optim.backbone_lr_factor={was:g}"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if rng:
        set_rng_state(rng)
    return dict(state["position"])


# -- helpers the training script calls -----------------------------------------------------------


def best_score(val: dict[str, Any], metric: str) -> float | None:
    """The score an evaluation offers for best.pt: ``val[metric]``, or None when it is no score.

    COCOeval reports -1 for a stat without ground truth to score (no object of the class, or
    of the size, in the validation set): that evaluation must not choose best.pt. (A loss may be
    any number.) NaN is left to is_better, which never takes it.

    Args:
        val: the evaluation's metrics (engine.evaluate).
        metric: eval.best_metric, a key of val.
    """
    score = val[metric]
    if not metric.startswith("val/loss") and score < 0:
        return None
    return score


def save_weights(path: Path, accelerator: Any, model, cfg, label_map, metrics: dict, epoch: int, step: int,
                 extra: dict | None = None) -> None:  # fmt: skip
    """Write a weights file (best.pt / last.pt) from the main process, atomically (see weights.py)."""
    from detector.config import to_dict

    error = None
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(model)
        try:
            weights.save(weights.payload(net, to_dict(cfg), label_map.to_dict(), metrics, epoch, step, extra), path)
        except WriteError as exc:
            error = str(exc)
    agree(accelerator, error)


def save_last(run_dir: Path, accelerator: Any, model, cfg, label_map, metrics: dict, epoch: int, step: int) -> None:
    save_weights(Path(run_dir) / "last.pt", accelerator, model, cfg, label_map, metrics, epoch, step)


def adapt_position(
    position: RunState,
    layout: dict[str, int],
    steps_per_epoch: int,
    lr: float,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    log=print,
) -> RunState:
    """Continue a state saved with another number of processes, batch size or accumulation.

    The position in the epoch is kept in global samples: a state saved mid-epoch after b
    batches on W processes has consumed the first b * W global batches of that epoch (the
    global batch list depends only on seed, epoch and per-process batch size), so W' processes
    skip exactly those. The learning rate becomes the new global batch's, at the same fraction
    of the run. What cannot be continued exactly stops with a message saying what differs.

    Args:
        position: the restored training position (with the layout it was saved with).
        layout: this run's world_size, batch_size (per process) and grad_accum_steps.
        steps_per_epoch: this run's optimizer steps per epoch per process.
        lr: this run's scaled peak learning rate.
        optimizer, scheduler: restored from the state; their lr is set for this run.

    Returns:
        The position in this run's terms (batch counted in this run's per-process batches).

    Raises:
        CheckpointError: a mid-epoch state whose batch size or accumulation differs, or whose
            consumed batches do not divide among the new processes.
    """
    old = {k: int(v) for k, v in position.layout.items()}
    if old == layout:
        return position
    what = ", ".join(f"{k} {old[k]} -> {layout[k]}" for k in LAYOUT_KEYS if old[k] != layout[k])
    batch = int(position.batch)
    consumed = batch * old["world_size"]
    if batch:
        fix = "resume with the settings the state was saved with, or from a state saved at the end of an epoch"
        if old["batch_size"] != layout["batch_size"] or old["grad_accum_steps"] != layout["grad_accum_steps"]:
            raise CheckpointError(
                f"the state was saved mid-epoch (epoch {position.epoch + 1}, batch {batch}) and the run "
                f"differs ({what}): the rest of that epoch's batches cannot be formed the same way; {fix}"
            )
        if consumed % layout["world_size"]:
            raise CheckpointError(
                f"the state was saved mid-epoch after {consumed} global batches, which do not divide among "
                f"{layout['world_size']} processes ({what}); {fix}"
            )
        batch = consumed // layout["world_size"]
        if batch % layout["grad_accum_steps"]:  # the next accumulation window would be cut short
            raise CheckpointError(
                f"the state was saved mid-epoch after {consumed} global batches: {batch} per process is not a "
                f"whole number of accumulation windows of {layout['grad_accum_steps']} ({what}); {fix}"
            )
    sched_step = int(position.epoch) * steps_per_epoch + -(-batch // layout["grad_accum_steps"])
    scheduler.base_lrs = [lr * g.get("lr_factor", 1.0) for g in optimizer.param_groups]
    scheduler.last_epoch = sched_step
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(sched_step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    log(
        f"resumed with another layout ({what}): continuing epoch {position.epoch + 1} after {consumed} "
        f"global batches; peak lr {lr:.4g} for the new global batch, now {optimizer.param_groups[0]['lr']:.4g}"
    )
    return dataclasses.replace(position, **layout, batch=batch)


def check_trained_on(saved: dict[str, Any] | None, current: dict[str, Any], log=print) -> None:
    """Can a state trained on ``saved`` continue a run on ``current`` (both lineage.trained_on)?

    Another model, or other classes (names, their number or their order: label k would mean
    another class), cannot: its weights, best score and best.pt belong to another run. The same
    classes under other category ids can (label k is still the same class; the weights files
    record the new ids): a warning. A dataset whose files changed with the same classes (images
    added, boxes fixed) is legitimate and only warned about (lineage.record). Keys missing from
    ``saved`` (a state written before they were recorded) are not compared.

    Raises:
        CheckpointError: naming what differs.
    """
    if not saved:
        return
    differs = []
    if saved.get("model") is not None and saved["model"] != current["model"]:
        differs.append(f"model {saved['model']} (this run: {current['model']})")
    old, new = saved.get("class_names"), current["class_names"]
    if old is not None and list(old) != list(new):
        differs.append(f"{len(old)} classes {', '.join(old)} (this run: {len(new)}, {', '.join(new)})")
    if differs:
        raise CheckpointError(f"it was trained with another model or other classes: {'; '.join(differs)}")
    ids_then, ids_now = saved.get("category_ids"), current.get("category_ids")
    if ids_then is not None and ids_now is not None and list(ids_then) != list(ids_now):
        log(f"warning: the classes' category ids changed since the state was saved ({list(ids_then)} -> "
            f"{list(ids_now)}); the classes are the same, so training continues, and the weights files record "
            "the new ids")  # fmt: skip


def _trained_on_from_lineage(run_dir: Path) -> dict[str, Any] | None:
    """What a state written before states recorded it was trained on: the run directory's
    lineage.json (its training classes; the model when recorded)."""
    from detector.runs import lineage

    fp = lineage.read(run_dir)
    train = ((fp or {}).get("dataset") or {}).get("train") or {}
    if "class_names" not in train:
        return None
    return {"model": fp.get("model"), "class_names": train["class_names"], "category_ids": train.get("category_ids")}


PREVIOUS_DIR = "previous"
RUN_FILES = (STATE_DIR, "config.yaml", "metrics.jsonl", "results.csv", "best.pt", "last.pt", "lineage.json", "analysis.json",
             "analysis_best.json", "plots")  # fmt: skip


def set_aside_previous_run(run_dir: str | Path, log=print) -> Path | None:
    """A run that starts over in a run directory moves the files of the run before it (states,
    metrics, weights, plots) to ``previous/<time>/`` rather than mixing with them: its states
    would sort after this run's (a resume would take them, and keeping the newest would delete
    this run's), and its epochs would stay in metrics.jsonl. Main process only.

    Returns:
        Where they went, or None when there was nothing.
    """
    import time

    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if all(p.name == "config.yaml" for p in found):  # nothing but a config (this run's, or of one that never started)
        return None
    dest = run_dir / PREVIOUS_DIR / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "-1")
    try:
        dest.mkdir(parents=True)
        for path in found:
            os.replace(path, dest / path.name)
    except OSError as exc:
        raise weights.write_error(dest, exc) from None
    log(f"starting over in {run_dir}: the files of the run before ({', '.join(p.name for p in found)}) moved to {dest}")
    return dest


def resume(spec: str, run_dir: Path, accelerator: Any, model, optimizer, scheduler, log=print,
           ema=None, trained_on: dict[str, Any] | None = None, fresh: RunState | None = None) -> RunState | None:  # fmt: skip
    """Restore training from ``train.resume``: "auto" (newest valid state in the run directory,
    or a fresh start when there is none) or the path of a state directory.

    Before anything is loaded, what the state was trained on is compared with ``trained_on``
    (this run's lineage.trained_on; see check_trained_on).

    Returns:
        The saved state (keys a state of an earlier version lacks come from ``fresh``, this
        run's starting state; see RunState.from_dict), or None: nothing to resume, a fresh start.

    Raises:
        CheckpointError: an explicit path that cannot be used, or a state of another model or
            other classes (the message names what differs and the two ways forward).
    """
    if spec == "auto":
        found = agreed_resumable(run_dir, accelerator, log)
        if found is None:
            log(f"train.resume=auto: no saved state in {Path(run_dir) / STATE_DIR}; starting fresh")
            return None
        state_dir, state, rng = found
    else:
        state_dir = Path(spec)
        if not (state_dir / COMPLETE).is_file():
            raise CheckpointError(f"train.resume={spec}: not a complete state directory (no {COMPLETE})")
        state, rng = load_state_files(state_dir, accelerator.process_index)
    saved = state.get("trained_on") or _trained_on_from_lineage(state_dir.parent.parent)
    try:
        if trained_on is not None:
            check_trained_on(saved, trained_on, log)
        position = restore(state, rng, accelerator, model, optimizer, scheduler, ema)
    except CheckpointError as exc:
        raise CheckpointError(
            f"train.resume={spec}: {state_dir} cannot continue this run: {exc}. Give this run another output_dir, "
            f"or start it over with train.resume=null (the files of the run in {run_dir} are then moved to "
            f"{Path(run_dir) / PREVIOUS_DIR}/)"
        ) from None
    log(f"resumed from {state_dir}: epoch {position['epoch'] + 1}, batch {position['batch']}, step {position['step']}")
    return RunState.from_dict(position, fresh)
