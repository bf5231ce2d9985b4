"""Optimizer groups, lr scaling, schedules, gradient accumulation, best-checkpoint choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detector.config import OptimConfig
from detector.train.checkpoint import is_better
from detector.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups, scaled_lr
from tests.conftest import dummy_batches


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False), nn.GroupNorm(2, 4))
    decay, no_decay = param_groups(model, 1e-4, 0.0)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 5  # conv bias + 2 BN + 2 GN parameters


def test_lr_scales_with_global_batch():
    cfg = OptimConfig(lr=0.02, reference_batch_size=16)
    assert scaled_lr(cfg, 2 * 4 * 2) == pytest.approx(0.02)  # 2 processes x 4 x 2 accumulation
    assert scaled_lr(cfg, 64) == pytest.approx(0.08)
    assert scaled_lr(OptimConfig(lr=0.02, scale_lr=False), 64) == 0.02


@pytest.mark.parametrize("schedule", ["cosine", "multistep", "constant"])
def test_warmup_then_schedule(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, warmup_factor=0.1, milestones=[0.5, 0.75], gamma=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # linear warmup
    if schedule == "cosine":
        assert f[55] < 1 and f[99] < 0.01
    elif schedule == "multistep":
        assert f[49] == 1.0 and f[50] == pytest.approx(0.1) and f[75] == pytest.approx(0.01)
    else:
        assert f[99] == 1.0


def test_scheduler_state_resumes():
    cfg = OptimConfig(warmup_steps=5)
    model = nn.Linear(2, 2)
    a_opt = build_optimizer(model, cfg, 0.1)
    a = build_scheduler(a_opt, cfg, 50)
    for _ in range(7):
        a_opt.step()
        a.step()
    b_opt = build_optimizer(model, cfg, 0.1)
    b = build_scheduler(b_opt, cfg, 50)
    b.load_state_dict(a.state_dict())
    b_opt.load_state_dict(a_opt.state_dict())
    assert b_opt.param_groups[0]["lr"] == pytest.approx(a_opt.param_groups[0]["lr"])
    a.step()
    b.step()
    assert b.get_last_lr() == a.get_last_lr()


def test_adamw_and_nesterov():
    m = nn.Linear(2, 2)
    assert isinstance(build_optimizer(m, OptimConfig(name="adamw"), 1e-3), torch.optim.AdamW)
    sgd = build_optimizer(m, OptimConfig(nesterov=True), 0.1)
    assert sgd.param_groups[0]["nesterov"] is True


def test_gradient_accumulation_steps(cpu_accelerator):
    from detector.train.engine import train_one_epoch

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            return {"loss": (self.w * len(images)).sum()}

    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    steps = []
    train_one_epoch(model, opt, sched, dummy_batches(5), cpu_accelerator, epoch=0, start_batch=0, grad_accum_steps=2,
                    clip_grad_norm=1.0, max_nonfinite_steps=3, on_step=steps.append)  # fmt: skip
    assert [s["batch"] for s in steps] == [2, 4, 5]  # 5 micro-batches -> 3 optimizer steps
    assert model.w.item() == pytest.approx(1 - 3 * 0.1)  # each step's gradient is a mean: 1


def test_best_metric_modes():
    assert is_better(0.5, None, "max") and is_better(0.6, 0.5, "max") and not is_better(0.4, 0.5, "max")
    assert is_better(0.4, 0.5, "min") and not is_better(float("nan"), 0.5, "min") and not is_better(None, None, "max")
