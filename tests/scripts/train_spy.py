"""tools/train.py as it is, with the training batch sampler watched: every batch it yields (the
dataset positions of its images) is appended as one JSON line to the file named by SPY_BATCHES,
with the epoch. Used by the tests to see the batches a real run trains on."""

import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from detector.data import loader  # noqa: E402

_iter = loader.TrainBatchSampler.__iter__


def _watched(self):
    for batch in _iter(self):
        with open(os.environ["SPY_BATCHES"], "a") as f:
            f.write(json.dumps({"epoch": self.epoch, "rank": self.rank, "batch": [i for i, _ in batch]}) + "\n")
        yield batch


loader.TrainBatchSampler.__iter__ = _watched
train = str(ROOT / "tools" / "train.py")
sys.argv = [train, *sys.argv[1:]]
runpy.run_path(train, run_name="__main__")
