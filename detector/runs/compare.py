"""Compare runs: the config keys that differ between them and their best metrics, as one table.

Reads each run directory's ``config.yaml`` (the resolved config) and ``metrics.jsonl``; the
table is written as markdown and CSV, one row per run, sorted by a chosen metric.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detector.runs.tracking import epoch_rows, read_metrics

# Always in the table (when a run logged them), after the metric it is sorted by.
DEFAULT_METRICS = ("val/mAP", "val/mAP50", "val/loss")
IGNORED_KEYS = ("output_dir",)  # differs between any two runs: the row's label already says it


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (lists stay whole values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def lower_is_better(metric: str) -> bool:
    """Losses (val/loss, val/loss_<part>, train/loss...); not val/AP/<class>, whatever the class is called."""
    return metric.split("/", 1)[-1].startswith("loss")


def best_of(rows: list[dict[str, Any]], metric: str) -> tuple[float | None, int | None]:
    """The best finite value of ``metric`` over the epochs (max, min for losses) and its epoch.
    COCOeval's -1 (no ground truth) never counts."""
    vals = [(r[metric], int(r["epoch"])) for r in rows if isinstance(r.get(metric), (int, float))]
    if not lower_is_better(metric):
        vals = [(v, e) for v, e in vals if v >= 0]
    vals = [(v, e) for v, e in vals if v == v]
    if not vals:
        return None, None
    pick = min if lower_is_better(metric) else max
    value, epoch = pick(vals, key=lambda t: t[0])
    return float(value), epoch


def _config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    return flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))  # type: ignore[arg-type]


def _render(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):  # a mapping's key order means nothing (a list's order does)
        return json.dumps(v, separators=(",", ":"), sort_keys=True)
    return str(v)


def runs_table(run_dirs: Sequence[str | Path], sort_by: str = "val/mAP") -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of the comparison.

    Args:
        run_dirs: run directories (config.yaml, metrics.jsonl).
        sort_by: the metric the rows are sorted by, best first (runs without it last).

    Returns:
        (columns, rows): ``run``, each config key whose value is not the same in every run (a
        key missing from a run counts as differing), ``epochs``, ``best_epoch`` (of ``sort_by``),
        then the best value of ``sort_by`` and of val/mAP, val/mAP50, val/loss.

    Raises:
        ValueError: no run logged ``sort_by`` (with the closest name they did log).
    """
    runs = [Path(r) for r in run_dirs]
    configs = [_config(r) for r in runs]
    keys = sorted({k for c in configs for k in c} - set(IGNORED_KEYS))
    differing = [k for k in keys if len({_render(c[k]) if k in c else None for c in configs}) > 1]
    metrics = [sort_by, *(m for m in DEFAULT_METRICS if m != sort_by)]
    records = [epoch_rows(read_metrics(r)) for r in runs]
    logged = sorted({k for rows in records for row in rows for k in row} - {"kind", "step", "time", "epoch"})
    if records and any(records) and sort_by not in logged:  # a typo would sort by nothing, silently
        close = difflib.get_close_matches(sort_by, logged, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"no run logged the metric '{sort_by}' to sort by{hint}; they logged: {', '.join(logged)}")
    metrics = [m for m in metrics if m == sort_by or any(m in row for rows in records for row in rows)]
    entries = []
    for run, cfg, rows in zip(runs, configs, records):
        row = {"run": str(run)}
        row.update({k: _render(cfg[k]) if k in cfg else "" for k in differing})
        row["epochs"] = str(max((int(r["epoch"]) for r in rows), default=0))
        key, best_epoch = best_of(rows, sort_by)
        row["best_epoch"] = "" if best_epoch is None else str(best_epoch)
        for m in metrics:
            value, _ = best_of(rows, m)
            row[m] = "" if value is None else f"{value:.4f}"
        entries.append((key, row))
    sign = 1.0 if lower_is_better(sort_by) else -1.0
    entries.sort(key=lambda e: (e[0] is None, sign * e[0] if e[0] is not None else 0.0))
    columns = ["run", *differing, "epochs", "best_epoch", *metrics]
    return columns, [row for _, row in entries]


def to_markdown(columns: list[str], rows: list[dict[str, str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_table(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    sort_by: str = "val/mAP",
    table: tuple[list[str], list[dict[str, str]]] | None = None,
) -> tuple[str, list[Path]]:
    """Write ``compare_runs.md`` and ``compare_runs.csv`` into ``out_dir`` (``table``: runs_table's
    result when already built); returns the markdown and the paths."""
    columns, rows = table if table is not None else runs_table(run_dirs, sort_by)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(columns, rows)
    paths = [out / "compare_runs.md", out / "compare_runs.csv"]
    paths[0].write_text(md)
    paths[1].write_text(to_csv(columns, rows))
    return md, paths
