"""Training-loop arithmetic with stand-in models whose every number is known: gradient
accumulation equals the large batch, non-finite (inf as well as NaN) losses are skipped and
counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from detector.train.engine import train_one_epoch
from tests.conftest import dummy_batches

PIXELS = [[255, 0, 51], [102, 204, 0], [0, 153, 255], [51, 51, 51], [204, 102, 153]]
W0 = [0.5, -0.25, 1.0]
LR = 0.5


class _Fit(nn.Module):
    """A least-squares fit: loss = the batch mean of 0.5 * (w . x_i - 1)^2, x_i = the image's
    three pixels in [0, 1] (a mean over the batch, like the detector's losses)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(W0))

    def forward(self, images, targets):
        x = torch.stack([im.flatten() for im in images])
        return {"loss_fit": 0.5 * ((x @ self.w - 1) ** 2).mean()}


def _by_hand(windows: list[list[int]]) -> tuple[np.ndarray, list[float], float]:
    """Plain SGD on the mean loss of each window of samples, in float64: final w, the mean loss of
    each window, and the mean loss per image over the epoch (each loss at the w it was met with)."""
    w = np.array(W0, dtype=np.float64)
    x = np.array(PIXELS, dtype=np.float64) / 255
    window_losses, all_losses = [], []
    for idx in windows:
        r = x[idx] @ w - 1
        losses = 0.5 * r**2
        window_losses.append(float(losses.mean()))
        all_losses += losses.tolist()
        w = w - LR * (r[:, None] * x[idx]).mean(axis=0)
    return w, window_losses, float(np.mean(all_losses))


def _train(batches, grad_accum_steps: int, cpu_accelerator) -> tuple[_Fit, dict, list[dict]]:
    model = _Fit()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    steps: list[dict] = []
    stats = train_one_epoch(model, opt, sched, batches, cpu_accelerator, epoch=0, start_batch=0,
                            grad_accum_steps=grad_accum_steps, clip_grad_norm=None, max_nonfinite_steps=3,
                            on_step=steps.append)  # fmt: skip
    return model, stats, steps


def _merge(batches: list, sizes: list[int]) -> list:
    """Consecutive micro-batches joined into batches of the given numbers of images."""
    out, pos = [], 0
    for n in sizes:
        part = batches[pos : pos + n]
        out.append(([im for b in part for im in b[0]], [t for b in part for t in b[1]], 0))
        pos += n
    return out


def test_accumulation_equals_the_large_batch(cpu_accelerator):
    """5 micro-batches of 1 image with 2 accumulation steps: windows of 2, 2 and 1 (the last one
    cut short by the end of the epoch). Without clipping, each optimizer step must follow the
    gradient of the window's mean loss: the update of one batch of 2, 2 and 1 images."""
    expected_w, _, expected_loss = _by_hand([[0, 1], [2, 3], [4]])
    micro = dummy_batches(5, pixels=PIXELS)
    accumulated, stats, steps = _train(micro, 2, cpu_accelerator)
    assert [s["batch"] for s in steps] == [2, 4, 5]
    np.testing.assert_allclose(accumulated.w.detach().numpy(), expected_w, rtol=1e-5)
    large, large_stats, _ = _train(_merge(micro, [2, 2, 1]), 1, cpu_accelerator)
    np.testing.assert_allclose(large.w.detach().numpy(), expected_w, rtol=1e-5)
    # the epoch's loss is the mean per image, whatever the batching
    assert stats["train/loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert large_stats["train/loss"] == pytest.approx(expected_loss, rel=1e-5)
    # the gradient was not simply the sum of the micro-batches' (a step twice too long)
    summed_w, _, _ = _by_hand([[0], [1], [2], [3], [4]])
    assert not np.allclose(expected_w, summed_w, rtol=1e-3)


def test_step_record_loss_is_the_window_mean(cpu_accelerator):
    _, window_losses, _ = _by_hand([[0, 1], [2, 3], [4]])
    _, _, steps = _train(dummy_batches(5, pixels=PIXELS), 2, cpu_accelerator)
    assert [s["train/loss"] for s in steps] == pytest.approx(window_losses, rel=1e-5)


class _BadAt(nn.Module):
    """loss = 2w, but `value` (inf, -inf or nan) times that at the given forward calls (1-based)."""

    def __init__(self, bad: set[int], value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.bad, self.value, self.calls = bad, value, 0

    def forward(self, images, targets):
        self.calls += 1
        loss = (self.w * 2).sum()
        return {"loss_a": loss * self.value if self.calls in self.bad else loss}


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_nonfinite_losses_skipped_and_counted(value, cpu_accelerator):
    model = _BadAt({2, 4}, value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    steps: list[dict] = []
    stats = train_one_epoch(model, opt, sched, dummy_batches(5), cpu_accelerator, epoch=0, start_batch=0,
                            grad_accum_steps=1, clip_grad_norm=None, max_nonfinite_steps=2, on_step=steps.append)  # fmt: skip
    # steps 1, 3, 5 are good (gradient 2, lr 0.1: -0.2 each); 2 and 4 are skipped
    assert model.w.item() == pytest.approx(1 - 3 * 0.2)
    assert stats["train/nonfinite_steps"] == 2 and stats["nonfinite_in_row"] == 0
    assert [s.get("train/nonfinite_steps") for s in steps] == [None, 1, None, 2, None]
    assert sched.last_epoch == 3  # the schedule advanced on the good steps only
    # the epoch loss is the mean of the good steps' losses: 2w at w = 1, 0.8, 0.6
    assert stats["train/loss"] == pytest.approx((2.0 + 1.6 + 1.2) / 3)


def test_nonfinite_micro_batch_skips_its_whole_window(cpu_accelerator):
    """An inf loss in the 2nd micro-batch of a window: the 1st micro-batch's gradient, already
    accumulated, must be thrown away with it."""
    model = _BadAt({2}, math.inf)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = train_one_epoch(model, opt, sched, dummy_batches(4), cpu_accelerator, epoch=0, start_batch=0,
                            grad_accum_steps=2, clip_grad_norm=None, max_nonfinite_steps=5)  # fmt: skip
    # window 1 (calls 1, 2) skipped; window 2 (calls 3, 4): gradient 2/2 + 2/2 = 2 -> w = 1 - 0.1 * 2
    assert model.w.item() == pytest.approx(0.8)
    assert stats["train/nonfinite_steps"] == 1 and sched.last_epoch == 1
