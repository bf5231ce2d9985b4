"""Redraw a run's plots from its metrics.jsonl, or put several runs on the same plots.

python tools/plot_runs.py RUN_DIR                       # -> RUN_DIR/plots/{loss,map}.png
python tools/plot_runs.py RUN_A RUN_B ... --output-dir DIR  # -> DIR/compare_{loss,map}.png
python tools/plot_runs.py RUN_A RUN_B ... --output-dir DIR --table [--sort val/mAP]
    # also DIR/compare_runs.{md,csv}: the config keys that differ and each run's best metrics
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import cli


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    cli.add_output_dir(ap, None, "output folder (default: RUN_DIR/plots for one run, . for several)")
    ap.add_argument("--table", action="store_true", help="also write compare_runs.md/.csv and print the markdown")
    ap.add_argument("--sort", default="val/mAP", help="the metric the table is sorted by, best first")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from detector.runs.compare import runs_table, write_table  # after parsing: --help stays fast
    from detector.runs.plots import compare_runs, plot_run

    missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.table:  # before anything is written: a metric no run logged is a typo
        try:
            table = runs_table(args.runs, args.sort)
        except ValueError as exc:
            print(f"error: --sort: {exc}", file=sys.stderr)
            return 2
    if len(args.runs) == 1:
        written = plot_run(args.runs[0], args.output_dir)
    else:
        written = compare_runs(args.runs, args.output_dir or ".")
    if not written:
        print("error: no finished epochs to plot yet", file=sys.stderr)
        return 1
    if args.table:
        markdown, tables = write_table(
            args.runs,
            args.output_dir or (Path(args.runs[0]) / "plots" if len(args.runs) == 1 else "."),
            args.sort,
            table,
        )
        print(markdown)
        written += tables
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
