"""Redraw a run's plots from its metrics.jsonl, or put several runs on the same plots.

python tools/plot_runs.py RUN_DIR                       # -> RUN_DIR/plots/{loss,map}.png
python tools/plot_runs.py RUN_A RUN_B ... --output DIR  # -> DIR/compare_{loss,map}.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.plots import compare_runs, plot_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    ap.add_argument("--output", help="output folder (default: RUN_DIR/plots for one run, . for several)")
    args = ap.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    if len(args.runs) == 1:
        written = plot_run(args.runs[0], args.output)
    else:
        written = compare_runs(args.runs, args.output or ".")
    if not written:
        print("error: no finished epochs to plot yet", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
