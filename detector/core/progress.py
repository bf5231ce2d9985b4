"""Progress bars: tqdm on a terminal, plain log lines at an interval elsewhere (SLURM, CI, a log file)."""

from __future__ import annotations

import sys
import time
from typing import Any


def progress(enabled: bool, interval: float = 30.0, **kwargs: Any) -> Any:
    """A progress bar on the main process (a no-op object elsewhere).

    On a terminal it is a tqdm bar. Where stderr is not a terminal (SLURM, CI, ``> train.log``)
    a redrawn bar would write carriage-return frames into the log, so a plain line is printed
    every ``interval`` seconds instead, and once at the end.
    """
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return PlainProgress(interval=interval, **kwargs)
    return tqdm(disable=not enabled, dynamic_ncols=True, file=sys.stderr, **kwargs)


class PlainProgress:
    """The part of tqdm's interface the tools use, as plain log lines at a fixed interval."""

    def __init__(self, total: int | None = None, desc: str = "", interval: float = 30.0, unit: str = "it",
                 **_: Any) -> None:  # fmt: skip
        self.total, self.desc, self.interval, self.unit = total, desc, interval, unit
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def reset(self, total: int | None = None) -> None:
        self.total, self.n = total, 0
        self.start = self.last = time.monotonic()

    def refresh(self) -> None:
        pass

    def _print(self) -> None:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f"{self.n / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{pct}, {rate}, {elapsed:.0f} s{extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print()
