"""tools/train.py as it is, on a disk that fills up: every torch.save into a file whose name
contains $FULL_AT (e.g. "state.pt"), after the first $FULL_AFTER such saves, writes part of its
data and then fails with ENOSPC, as a write to a full disk does. Used by the tests."""

import errno
import os
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

_save = torch.save
_seen = 0


def _filling(obj, f, *args, **kwargs):
    global _seen
    name = getattr(f, "name", str(f))
    if os.environ["FULL_AT"] in os.path.basename(str(name)):
        _seen += 1
        if _seen > int(os.environ.get("FULL_AFTER", "0")):
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))
    return _save(obj, f, *args, **kwargs)


torch.save = _filling
train = str(ROOT / "tools" / "train.py")
sys.argv = [train, *sys.argv[1:]]
runpy.run_path(train, run_name="__main__")
