"""The user-facing interface as text, to compare two commits: every tool's --help, the config
schema (keys and defaults) and, with --run-dir, the files a run directory holds.

    python tests/scripts/interface.py [--run-dir runs/demo] > interface.json

tests/test_interface.py checks the first two against tests/golden/interface.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tools() -> list[Path]:
    return sorted([*ROOT.glob("tools/*.py"), *ROOT.glob("tools/bench/*.py")])


def help_text(tool: Path) -> str:
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(tool), "--help"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    return res.stdout if res.returncode == 0 else f"exit {res.returncode}: {res.stderr[-2000:]}"


def schema() -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from detector import config

    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", config.to_dict(config.Config()))
    return flat


def run_listing(run_dir: Path) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())


def snapshot(run_dir: Path | None = None) -> dict[str, object]:
    out: dict[str, object] = {
        "help": {t.relative_to(ROOT).as_posix(): help_text(t) for t in tools()},
        "schema": schema(),
    }
    if run_dir is not None:
        out["run_dir"] = run_listing(run_dir)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, help="a run directory whose file listing to include")
    args = ap.parse_args()
    json.dump(snapshot(args.run_dir), sys.stdout, indent=1, sort_keys=True, default=str)
    print()
