"""Samplers and augmentation: sharding, determinism, resume position, Albumentations config."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from detector.config import BboxConfig
from detector.core.errors import ConfigError
from detector.data.coco import CocoDetection, CocoIndex
from detector.data.loader import EvalBatchSampler, TrainBatchSampler, cap_workers, collate
from detector.data.transforms import apply, build_transform
from tests.conftest import ROOT, one_image_coco


def _ratios(n=23):
    return np.array([1.0, 1.33, 0.75, 1.4][:4] * 6)[:n]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_sampler_covers_every_image_each_epoch(world):
    ratios = _ratios()
    shards = [TrainBatchSampler(ratios, 4, seed=1, num_replicas=world, rank=r) for r in range(world)]
    for s in shards:
        s.set_epoch(3)
    batches = [list(s) for s in shards]
    assert len({len(b) for b in batches}) == 1  # same number of steps everywhere
    seen = [i for b in batches for batch in b for i, _ in batch]
    assert set(seen) == set(range(len(ratios)))
    for b in batches:  # aspect groups are not mixed but for the leftovers
        pure = sum(len({int(ratios[i] > 1.25) - int(ratios[i] < 0.8) for i, _ in batch}) == 1 for batch in b)
        assert pure >= len(b) - 2


def test_train_sampler_deterministic_and_reshuffled():
    a = TrainBatchSampler(_ratios(), 4, seed=1)
    b = TrainBatchSampler(_ratios(), 4, seed=1)
    a.set_epoch(0)
    b.set_epoch(0)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_train_sampler_resume_skips_done_batches():
    s = TrainBatchSampler(_ratios(), 4, seed=1, num_replicas=2, rank=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=2)
    assert list(s) == full[2:] and len(s) == len(full) - 2


def test_eval_sampler_batches_independent_of_world():
    ratios = np.random.default_rng(0).uniform(0.5, 2, 7)
    one = EvalBatchSampler(ratios, 2).batches
    parts = [EvalBatchSampler(ratios, 2, 2, r) for r in range(2)]
    merged = sorted(zip(parts[0].batch_ids() + parts[1].batch_ids(), list(parts[0]) + list(parts[1])))
    assert [b for _, b in merged] == one
    assert sorted(i for b in one for i in b) == list(range(7))  # nothing padded


def test_collate_counts_skipped():
    images, targets, skipped = collate([None, ("img", {"a": 1}), None])
    assert images == ["img"] and skipped == 2


def test_transform_from_config_and_defaults():
    t = build_transform([{"HorizontalFlip": {"p": 1.0}}, {"Resize": {"height": 20, "width": 40}}], BboxConfig())
    resize = t.transforms[1]
    assert resize.p == 1.0  # the class's own default p, not from_dict's 0.5 ... (given here explicitly)
    t2 = build_transform([{"Resize": {"height": 20, "width": 40}}], BboxConfig())
    assert t2.transforms[0].p == 1.0  # not given: Resize's own default, not from_dict's 0.5
    img = np.zeros((10, 20, 3), np.uint8)
    out, boxes, labels = apply(t, img, np.array([[0, 0, 5, 5]], np.float32), np.array([1]), seed=3)
    assert out.shape == (20, 40, 3)
    np.testing.assert_allclose(boxes, [[30, 0, 40, 10]])  # flipped, then scaled x2


def test_transform_errors_name_the_key():
    with pytest.raises(
        ConfigError,
        match=r"data.augment\[0\]: unknown Albumentations transform 'HorizontlFlip' \(did you mean HorizontalFlip",
    ):
        build_transform([{"HorizontlFlip": {"p": 0.5}}], BboxConfig())
    with pytest.raises(ConfigError, match="not valid for transform"):
        build_transform([{"HorizontalFlip": {"px": 0.5}}], BboxConfig())


def test_nested_transforms_and_per_sample_seed():
    specs = [{"OneOf": {"transforms": [{"Blur": {}}, {"GaussNoise": {}}], "p": 1.0}}, {"HorizontalFlip": {"p": 0.5}}]
    t = build_transform(specs, BboxConfig())
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    box = np.array([[1, 1, 8, 8]], np.float32)
    a = apply(t, img, box, np.array([1]), seed=11)
    b = apply(t, img, box, np.array([1]), seed=11)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    flips = {tuple(apply(t, img, box, np.array([1]), seed=s)[1][0]) for s in range(20)}
    assert len(flips) == 2  # both outcomes occur across seeds


def test_degenerate_boxes_after_augmentation_dropped(tmp_path):
    ann = one_image_coco(tmp_path, (100, 100), [[0, 0, 10, 10], [60, 60, 30, 30]])
    crop = build_transform([{"Crop": {"x_min": 50, "y_min": 50, "x_max": 100, "y_max": 100}}], BboxConfig())
    _, target = CocoDetection(CocoIndex(ann), tmp_path, crop)[(0, 1)]
    assert target["boxes"].shape == (1, 4) and target["dropped"] == 1


def test_a_clean_error_with_live_workers_ends_without_a_worker_killed_traceback(tmp_path):
    # A run that stops on one of our errors while its persistent workers live: the exit handler kills
    # them, and the DataLoader's SIGCHLD handler used to report that as "worker ... killed by signal".
    script = tmp_path / "stops.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch\n"
        "from detector.data.loader import build_loader\n"
        "class Items(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i): return (torch.zeros(3), {}), None\n"
        "loader = build_loader(Items(), [[0, 1], [2, 3], [4, 5]], num_workers=2)\n"
        "next(iter(loader))\n"
        "print('error: the clean one-line error', file=sys.stderr)\n"
        "sys.exit(2)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: the clean one-line error", done.stderr


def test_loader_workers_are_capped_to_the_usable_cpus_and_said_once(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    said: list[str] = []
    assert cap_workers(4, said.append) == 2
    assert said == ["data.num_workers=4 lowered to 2: this process may use 2 CPUs"]
    said.clear()
    assert cap_workers(2, said.append) == 2 and cap_workers(0, said.append) == 0
    assert said == []
