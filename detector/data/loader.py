"""Batching: aspect-ratio grouped, deterministic, sharded batch samplers and the collate function.

The samplers shard the data themselves (rather than letting Accelerate re-shard a loader), so
that the batches each process sees are a pure function of (seed, epoch, rank, world size) and a
resumed run can skip exactly the batches it has already trained on.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from detector.data.coco import CocoDetection


def aspect_groups(aspect_ratios: np.ndarray) -> np.ndarray:
    """Portrait (< 0.8), square-ish, landscape (> 1.25): images batched together pad little."""
    return np.digitize(aspect_ratios, [0.8, 1.25])


class TrainBatchSampler:
    """Shuffled, aspect-ratio grouped batches, split across processes.

    Every process computes the same global list of batches for an epoch from (seed, epoch) and
    takes every world_size-th one, so shards are disjoint and together cover every image.
    When the number of batches is not a multiple of the world size, the first batches are
    repeated to pad (so every process runs the same number of steps). Yields lists of
    ``(index, sample_seed)`` pairs; the dataset seeds augmentation from sample_seed.
    """

    def __init__(
        self,
        aspect_ratios: np.ndarray,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        group: bool = True,
    ) -> None:
        self.groups = aspect_groups(aspect_ratios) if group else np.zeros(len(aspect_ratios), dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0  # batches of this epoch already done (mid-epoch resume)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip its first ``start`` batches of this process."""
        self.epoch, self.start = epoch, start

    def global_batches(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        """All processes' batches of an epoch (before sharding), and the per-sample seeds."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.groups)
        perm = rng.permutation(n)
        sample_seeds = rng.integers(0, 2**31 - 1, size=n)
        buckets: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for i in perm.tolist():
            bucket = buckets.setdefault(int(self.groups[i]), [])
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        rest = {i for b in buckets.values() for i in b}  # partial groups, mixed in perm order
        leftovers = [i for i in perm.tolist() if i in rest]
        for s in range(0, len(leftovers), self.batch_size):
            batches.append(leftovers[s : s + self.batch_size])
        pad = (-len(batches)) % self.num_replicas
        batches.extend(batches[:pad])
        return batches, sample_seeds

    def shard(self, epoch: int) -> list[list[int]]:
        return self.global_batches(epoch)[0][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches, seeds = self.global_batches(self.epoch)
        for b in batches[self.rank :: self.num_replicas][self.start :]:
            yield [(i, int(seeds[i])) for i in b]

    def __len__(self) -> int:
        n_batches = len(self.global_batches(self.epoch)[0])
        return n_batches // self.num_replicas - self.start

    def batches_per_epoch(self) -> int:
        return len(self.global_batches(0)[0]) // self.num_replicas


class EvalBatchSampler:
    """Fixed batches of the whole split, dealt round-robin to the processes.

    The batches (images sorted by aspect ratio, then cut) do not depend on the number of
    processes, and no image is repeated to pad, so losses and detections, and every metric
    computed from them, are the same for 1 or N processes.
    """

    def __init__(self, aspect_ratios: np.ndarray, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        order = np.argsort(aspect_groups(aspect_ratios), kind="stable")
        self.batches = [order[s : s + batch_size].tolist() for s in range(0, len(order), batch_size)]
        self.num_replicas, self.rank = num_replicas, rank

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return len(self.batches[self.rank :: self.num_replicas])

    def batch_ids(self) -> list[int]:
        """Global positions of this process's batches (to put results back in order)."""
        return list(range(len(self.batches)))[self.rank :: self.num_replicas]


def collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]], int]:
    """(images, targets, number of undecodable images skipped)."""
    items = [b for b in batch if b is not None]
    return [b[0] for b in items], [b[1] for b in items], len(batch) - len(items)


def _ignore_stop_signals(_: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the training process.

    A scheduler (SLURM on preemption, ``timeout``, ``kill -TERM -- -PGID``) signals every process
    of the job, workers included: a worker that died of it would take the training process
    down before it could finish its step and save its state.
    """
    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _stop_workers_at_exit() -> None:
    # Workers ignore SIGTERM, which is how multiprocessing ends daemonic children at exit before
    # joining them: a run that stops on an error (its loader never shut down) would wait forever.
    # The DataLoader's SIGCHLD handler would report each killed worker as a failure ("DataLoader
    # worker ... is killed by signal") after the run's own clean error: we end them on purpose.
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in workers:
        p.kill()


atexit.register(_stop_workers_at_exit)  # runs before multiprocessing's own exit handler (LIFO)


def cap_workers(requested: int, log: Callable[[str], None] | None = None) -> int:
    """``requested`` loader workers, at most the CPUs this process may use.

    More workers than CPUs only adds processes that wait for each other, and the DataLoader warns
    about it once per loader; the cap is said once here instead (``log``), naming the key.

    Args:
        requested: the configured number of workers (``data.num_workers``).
        log: where to say that the number was lowered; None says nothing.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    if requested <= cpus:
        return requested
    if log is not None:
        log(f"data.num_workers={requested} lowered to {cpus}: this process may use {cpus} CPUs")
    return cpus


def build_loader(
    dataset: CocoDetection, batch_sampler: Any, num_workers: int, seed: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader over a batch sampler; workers persist across epochs.

    The loader draws its workers' base seed from its own generator, not from torch's global
    RNG: creating an iterator then leaves the training RNG stream untouched, which an exact
    mid-epoch resume depends on. Workers ignore the stop signals (``_ignore_stop_signals``).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        worker_init_fn=_ignore_stop_signals,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if num_workers > 0 else None,
        generator=generator,
    )


def steps_per_epoch(sampler: TrainBatchSampler, grad_accum_steps: int) -> int:
    """Optimizer steps per epoch for one process."""
    return math.ceil(sampler.batches_per_epoch() / grad_accum_steps)
