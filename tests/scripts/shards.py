"""Helper for test_train: which training images each process sees, under accelerate launch."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate.utils import gather_object  # noqa: E402

from detector.data.coco import CocoDetection, CocoIndex  # noqa: E402
from detector.data.loader import TrainBatchSampler, build_loader  # noqa: E402
from detector.train.process import make_accelerator  # noqa: E402

ann, out = sys.argv[1], sys.argv[2]
acc = make_accelerator()
index = CocoIndex(ann)
ds = CocoDetection(index, Path(ann).parent / "train")
sampler = TrainBatchSampler(index.aspect_ratios(), 3, seed=5, num_replicas=acc.num_processes, rank=acc.process_index)
loader = build_loader(ds, sampler, num_workers=0)
seen = {}
for epoch in (0, 1):
    sampler.set_epoch(epoch)
    mine = [[t["index"] for t in targets] for _, targets, _ in loader]
    seen[f"epoch{epoch}"] = gather_object([mine])
if acc.is_main_process:
    batches = sampler.global_batches(0)[0]
    unpadded = len(TrainBatchSampler(index.aspect_ratios(), 3, seed=5).global_batches(0)[0])
    padded = sum(len(b) for b in batches[unpadded:])  # images of the batches repeated to pad
    Path(out).write_text(json.dumps({"num_images": len(index), "padded": padded, **seen}))
acc.wait_for_everyone()
acc.end_training()  # tear the process group down together (gloo aborts otherwise)
