"""Where a run's numbers go: metrics.jsonl and results.csv always, Weights & Biases when enabled.

Only the main process writes or logs. The W&B API key is never read, printed or logged here:
wandb finds it itself (``wandb login`` or WANDB_API_KEY).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from detector.config import WandbConfig

# W&B's x-axis. Its own step must only grow, and a resumed run replays the steps after its last
# saved state, whose points W&B would drop: we log without W&B's step and chart against ours.
STEP_KEY = "global_step"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.csv"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def epoch_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch (the last record of each; a resumed run may repeat an epoch)."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") == "epoch":
            rows[int(r["epoch"])] = r
    return [rows[k] for k in sorted(rows)]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunLogger:
    """metrics.jsonl + results.csv in the run directory, and an optional W&B run."""

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.wandb_run: Any = None
        self.finish_timeout_s = 60.0
        self.wandb_mode = "disabled"
        self._file = open(self.run_dir / METRICS_FILE, "a") if enabled else None  # noqa: SIM115

    def log(self, record: dict[str, Any], kind: str, step: int) -> None:
        """Append one record (kind: step | epoch | event) and send it to W&B."""
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        assert self._file is not None
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if kind == "epoch":
            self.write_results()
        if self.wandb_run is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.wandb_run.log({**numeric, STEP_KEY: step})

    def write_results(self) -> None:
        rows = epoch_rows(read_metrics(self.run_dir))
        if not rows:
            return
        columns = ["epoch"] + sorted({k for r in rows for k in r} - {"epoch", "kind", "time"})
        tmp = self.run_dir / f".{RESULTS_FILE}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.run_dir / RESULTS_FILE)

    def start_wandb(
        self, cfg: WandbConfig, config: dict[str, Any], run_id: str | None, print_fn=print, step: int = 0
    ) -> str | None:
        """Start (or resume, with run_id) a W&B run; returns its id, or None when disabled.

        Metrics are charted against ``global_step`` (our optimizer step), so a resumed run
        continues from the step of its saved state (``step``), replayed points included.
        """
        if not self.enabled or not cfg.enabled or cfg.mode == "disabled":
            return None
        import wandb

        mode = cfg.mode
        if mode == "online" and not _online(print_fn):
            mode = "offline"
        kwargs = dict(project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group, tags=list(cfg.tags),
                      dir=str(self.run_dir), config=config, id=run_id, resume="allow" if run_id else None)  # fmt: skip
        self.finish_timeout_s = cfg.timeout_s
        try:
            self.wandb_run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=cfg.timeout_s), **kwargs)
        except Exception as exc:  # no key, server unreachable or not answering, refused: never stop training
            if mode != "online":
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print_fn(f"W&B: could not start an online run ({_without_secrets(reason)[:300]}); logging offline instead")
            mode = "offline"
            self.wandb_run = wandb.init(mode=mode, **kwargs)
        self.wandb_mode = mode
        self.wandb_run.define_metric(STEP_KEY)
        self.wandb_run.define_metric("*", step_metric=STEP_KEY)
        if run_id:
            print_fn(f"W&B run {self.wandb_run.id} resumed at {STEP_KEY} {step}")
        if mode == "offline":
            print_fn(f"W&B is offline: sync later with `wandb sync {self.wandb_run.dir.rsplit('/files', 1)[0]}`")
        return self.wandb_run.id

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows), STEP_KEY: step})

    def log_images(self, key: str, images: list[Any], step: int) -> None:
        if self.wandb_run is not None and images:
            self.wandb_run.log({key: images, STEP_KEY: step})

    def log_artifact(self, path: str | Path, name: str, kind: str = "model", metadata: dict | None = None) -> None:
        if self.wandb_run is not None:
            import wandb

            art = wandb.Artifact(name, type=kind, metadata=metadata)
            art.add_file(str(path))
            self.wandb_run.log_artifact(art)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            if self.wandb_mode == "offline":  # local files only: let it write everything
                run.finish()
            else:
                _finish_within(run, self.finish_timeout_s, print)


def _finish_within(run: Any, timeout_s: float, print_fn=print) -> None:
    """Finish a W&B run, waiting at most timeout_s for its upload (a network gone mid-run
    would otherwise hold the end of training for as long as wandb retries)."""
    import threading

    files = str(getattr(run, "dir", "") or "").rsplit("/files", 1)[0]
    done = threading.Event()

    def finish() -> None:
        try:
            run.finish()
        finally:
            done.set()

    threading.Thread(target=finish, daemon=True, name="wandb-finish").start()
    if not done.wait(timeout_s):
        print_fn(f"W&B: the upload did not finish within {timeout_s:.0f} s (logging.wandb.timeout_s); the run is "
                 f"stored in {files}: `wandb sync {files}` uploads the rest")  # fmt: skip


def _without_secrets(text: str) -> str:
    """An error text without the W&B key and without user:password@ in URLs."""
    import re

    key = os.environ.get("WANDB_API_KEY")
    if key:
        text = text.replace(key, "<WANDB_API_KEY>")
    return re.sub(r"(\w+://)[^/\s@]*@", r"\1", text)


def _online(print_fn) -> bool:
    """Is the W&B server reachable? (A quick check, so that no-network falls back to offline.)"""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((host, port), timeout=3).close()
        return True
    except (OSError, ValueError):
        print_fn(f"W&B: {host} is not reachable; logging offline instead")
        return False


def wandb_boxes(
    image,  # uint8 CHW tensor
    gt_boxes,
    gt_labels,
    det_boxes,
    det_labels,
    det_scores,
    class_names: list[str],
    caption: str,
    masks: tuple[Any, Any] | None = None,
):
    """A wandb.Image with ground-truth and predicted boxes (pixel coordinates) and class labels;
    ``masks`` (ground truth, predicted: binary (n, H, W) or None) as W&B's mask overlays."""
    import wandb

    class_labels = {i + 1: n for i, n in enumerate(class_names)}

    def boxes(bs, ls, ss=None):
        out = []
        for k, (b, lab) in enumerate(zip(bs.tolist(), ls.tolist())):
            item = {
                "position": {"minX": b[0], "minY": b[1], "maxX": b[2], "maxY": b[3]},
                "class_id": int(lab),
                "domain": "pixel",
                "box_caption": class_labels.get(int(lab), str(lab)),
            }
            if ss is not None:
                item["scores"] = {"score": float(ss[k])}
                item["box_caption"] += f" {float(ss[k]):.2f}"
            out.append(item)
        return out

    overlays = {}
    if masks is not None:
        from detector.evaluation.segm import class_index_map

        for key, ms, ls in (("ground_truth", masks[0], gt_labels), ("predictions", masks[1], det_labels)):
            if ms is not None:
                overlays[key] = {"mask_data": class_index_map(ms, ls, image.shape[1:]), "class_labels": class_labels}
    return wandb.Image(
        image.permute(1, 2, 0).numpy(),
        caption=caption,
        **({"masks": overlays} if overlays else {}),
        boxes={
            "ground_truth": {"box_data": boxes(gt_boxes, gt_labels), "class_labels": class_labels},
            "predictions": {"box_data": boxes(det_boxes, det_labels, det_scores), "class_labels": class_labels},
        },
    )


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column text table for the end of a run."""
    width = max((len(k) for k, _ in rows), default=0)
    line = "-" * (width + 16)
    return "\n".join([line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line])
