"""Learning-rate schedules (harness.engine.train.lr_factor) pinned at hand-computed values and against torch.

Each test names the plausible breakage it catches. The torch references are torch's own
schedulers stepped in a loop, as the official codes step them.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from harness.data.augment import Augmenter
from harness.engine.budget import Budget
from conftest import torch_lrs
from harness.errors import UsageError
from harness.engine.train import SCHEDULES, lr_factor, train
from methods.base import TRAINING_DEFAULTS, Batch, DataInfo, Method


def config(**overrides) -> dict:
    return {**TRAINING_DEFAULTS, "lr": 0.1, **overrides}


def test_warmup_then_cosine_known_values():
    """Warm-up 0.1 then cosine over the remaining 0.9: f(0.1) = 1, f(0.55) = 0.5 (half-way through
    the cosine), f(1) = 0, and half-way through the warm-up half the lr. Catches a cosine on the raw
    progress (f(0.55) = 0.42), a warm-up that does not end at 1, and a quadratic warm-up."""
    cfg = config(schedule="cosine", warmup=0.1)
    assert lr_factor(0.1, cfg) == pytest.approx(1.0)
    assert lr_factor(0.55, cfg) == pytest.approx(0.5)
    assert lr_factor(0.325, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(1.0, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.05, cfg) == pytest.approx(0.5, abs=0.01)
    assert lr_factor(0.0, cfg) == pytest.approx(0.0, abs=0.01)
    # the documented start, 1e-3 / (warmup + 1e-3): the first step trains (a warm-up from exactly 0 wastes it)
    assert lr_factor(0.0, cfg) == pytest.approx(1e-3 / 0.101, rel=1e-9)


def test_warmup_start_is_clds_gradual_warmup():
    """``warmup_start`` 0.01 over a warm-up of 5 of 200 epochs is CLD's ``GradualWarmupScheduler`` (multiplier
    100, lib/lr_scheduler.py): lr / m * ((m - 1) t / T + 1) at iteration t of T, from lr/100 to lr, linear;
    unset, the harness's own start (1e-3 / (warmup + 1e-3)). Catches the start ignored, a warm-up that does not
    end at the lr, or one from ``warmup_start`` to ``warmup_start + 1``."""
    cfg = config(schedule="cosine", warmup=0.025, warmup_start=0.01)
    m, steps = 100, 5 * 391
    for t in (0, 1, 391, 977, 1954):
        clds = 1 / m * ((m - 1) * t / steps + 1)
        assert lr_factor(0.025 * t / steps, cfg) == pytest.approx(clds, rel=1e-12)
    assert lr_factor(0.025, cfg) == pytest.approx(1.0)
    assert lr_factor(0.0, config(schedule="cosine", warmup=0.025)) == pytest.approx(1e-3 / 0.026, rel=1e-9)


def test_min_lr_is_the_floor_of_the_cosine():
    """lr 0.1, min_lr 0.01: the factor goes 1 -> 0.1 and is 0.55 half-way (floor + (1 - floor)/2).
    Catches an ignored floor (0 and 0.5) and a floor added unscaled (1.1 at the start)."""
    cfg = config(schedule="cosine", min_lr=0.01)
    assert [lr_factor(p, cfg) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.55, 0.1])
    restarts = config(schedule="cosine_restarts", restarts=2, min_lr=0.01)
    assert [lr_factor(p, restarts) for p in (0.25, 0.4999999, 0.5)] == pytest.approx([0.55, 0.1, 1.0], abs=1e-6)


def test_step_milestones_are_fractions_of_the_whole_budget():
    """Milestones 0.5 and 0.75, gamma 0.1, with a 0.1 warm-up: x0.1 from exactly 0.5, x0.01 from 0.75.
    Catches a strict comparison (f(0.5) = 1) and milestones measured after the warm-up
    (f(0.5) = 1, since t = 0.44 there)."""
    cfg = config(schedule="step", milestones=[0.5, 0.75], gamma=0.1, warmup=0.1)
    assert [lr_factor(p, cfg) for p in (0.3, 0.4999, 0.5, 0.7, 0.75, 1.0)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_restarts_jump_back_to_the_top():
    """Three restarts: each third anneals 1 -> 0, then the lr jumps back to 1 (SGDR)."""
    cfg = config(schedule="cosine_restarts", restarts=3)
    assert [lr_factor(p, cfg) for p in (0.0, 1 / 6, 1 / 3 - 1e-9, 1 / 3, 0.5)] == pytest.approx(
        [1, 0.5, 0, 1, 0.5], abs=1e-6)


@pytest.mark.parametrize("eta_min", [0.0, 1e-5])
def test_cosine_annealing_equals_torch_cosine_annealing_lr(eta_min):
    """Thanos's official run: CosineAnnealingLR(T_max=100) stepped once per epoch for 600 epochs.
    At every epoch boundary e, lr * lr_factor(e / 600) equals torch's lr for epoch e: down to eta_min
    at 100, back up at 200, ..., at the top at 600. Catches a restarting cosine (epoch 199: 0.0002
    instead of 0.9998 of the range), a half-period of the budget instead of T_max, and a floor not
    scaled by eta_min."""
    base = 3e-4
    cfg = config(lr=base, min_lr=eta_min, schedule="cosine_annealing", half_periods=6)
    reference = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100, eta_min=eta_min), 600, base)
    for epoch in (0, 1, 37, 100, 150, 199, 200, 250, 300, 333, 450, 599, 600):
        assert base * lr_factor(epoch / 600, cfg) == pytest.approx(reference[epoch], rel=1e-9, abs=1e-15), epoch
    assert reference[600] == pytest.approx(base) and reference[300] == pytest.approx(eta_min)


def test_cosine_annealing_with_one_half_period_is_cosine():
    """half_periods 1 is torch's CosineAnnealingLR with T_max = the budget, i.e. the plain cosine."""
    a, b = config(schedule="cosine_annealing", half_periods=1, min_lr=0.01), config(schedule="cosine", min_lr=0.01)
    assert [lr_factor(p, a) for p in (0, 0.2, 0.5, 0.9, 1)] == pytest.approx([lr_factor(p, b) for p in (0, 0.2, 0.5, 0.9, 1)])


def test_unknown_schedule_is_a_usage_error_naming_the_choices():
    with pytest.raises(UsageError, match="cosine_annealing"):
        lr_factor(0.5, config(schedule="linear"))
    assert "cosine_annealing" in SCHEDULES


class LinearOnPixels(Method):
    """The smallest trainable adapter: a linear map of the flattened view, squared output as the loss."""

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.backbone(batch.views[0]).pow(2).mean()


class Flatten(nn.Module):
    out_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x.flatten(1))


class LrRecorder:
    """A training logger that keeps the lr of every optimiser step."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def log_scalars(self, step, scalars):
        self.lrs[step] = scalars["train/lr"]


def test_training_loop_applies_cosine_annealing_per_epoch_like_torch():
    """12 epochs of 4 steps, half_periods 2: the lr of each epoch's first step equals torch's
    CosineAnnealingLR(T_max=6) stepped once per epoch. Catches a loop that feeds the schedule
    something other than the budget fraction reached before the step."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 2, 2), dtype=torch.uint8)
    cfg = config(lr=0.05, optimizer="sgd", weight_decay=0.0, batch_size=8, views=1,
                 schedule="cosine_annealing", half_periods=2)
    method = LinearOnPixels(Flatten(), cfg, DataInfo(num_samples=32, image_shape=(1, 2, 2)))
    recorder = LrRecorder()
    result = train(method, images, None, Budget("epochs", 12), Augmenter(None, [0.5], [0.25]), cfg, device="cpu",
                   seed=0, generator=torch.Generator().manual_seed(0), quiet=True, logger=recorder)
    assert result.status == "ok" and len(recorder.lrs) == 48
    reference = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6), 12, 0.05)
    first_step_lrs = [recorder.lrs[4 * epoch + 1] for epoch in range(12)]
    assert first_step_lrs == pytest.approx(reference[:12], rel=1e-9, abs=1e-15)


def test_each_step_of_a_step_budget_gets_the_lr_of_the_progress_before_it():
    """A budget of 8 steps, cosine from 0.05 to 0: step s (counted from 1) trains at 0.05 * lr_factor((s - 1) / 8),
    so the first step at the full lr and the last at 0.05 * (1 + cos(7 pi / 8)) / 2 = 0.00190, never at 0.
    Catches a schedule fed the progress after the step (a wasted last step at lr 0, a first step below the top)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 2, 2), dtype=torch.uint8)
    cfg = config(lr=0.05, optimizer="sgd", weight_decay=0.0, batch_size=8, views=1, schedule="cosine")
    method = LinearOnPixels(Flatten(), cfg, DataInfo(num_samples=32, image_shape=(1, 2, 2)))
    recorder = LrRecorder()
    train(method, images, None, Budget("steps", 8), Augmenter(None, [0.5], [0.25]), cfg, device="cpu", seed=0,
          generator=torch.Generator().manual_seed(0), quiet=True, logger=recorder)
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 8)) for s in range(1, 9)]
    assert [recorder.lrs[s] for s in range(1, 9)] == pytest.approx(expected, rel=1e-12)
    assert recorder.lrs[1] == 0.05 and recorder.lrs[8] == pytest.approx(0.0019030117, rel=1e-6)


def lrs_of_training(budget: Budget, **overrides) -> list[float]:
    """The lr of each of the 12 steps of a 3-epoch run of 4 steps (32 images, batch 8)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 2, 2), dtype=torch.uint8)
    cfg = config(lr=0.06, optimizer="sgd", weight_decay=0.0, batch_size=8, views=1, **overrides)
    method = LinearOnPixels(Flatten(), cfg, DataInfo(num_samples=32, image_shape=(1, 2, 2)))
    recorder = LrRecorder()
    train(method, images, None, budget, Augmenter(None, [0.5], [0.25]), cfg, device="cpu", seed=0,
          generator=torch.Generator().manual_seed(0), quiet=True, logger=recorder)
    return [recorder.lrs[s] for s in range(1, 13)]


EPOCH_BUDGETS = [Budget("epochs", 3), Budget("steps", 12), Budget("samples", 96)]


@pytest.mark.parametrize("budget", EPOCH_BUDGETS)
def test_lr_update_epoch_end_is_the_moco_demos_epoch_schedule(budget):
    """``lr_update: epoch_end`` (MoCo's CIFAR demo: ``adjust_learning_rate`` once per epoch e = 1..E, lr * (1 +
    cos(pi e / E)) / 2): 3 epochs of 4 steps, budgeted in epochs, steps or samples, train every step of epoch e at
    that lr, the first epoch a little annealed and the last at 0. Catches the lr still set per step, or read at
    the epoch's start (the first epoch at the full lr)."""
    demo = [0.06 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in (1, 2, 3)]
    lrs = lrs_of_training(budget, schedule="cosine", lr_update="epoch_end")
    assert lrs == pytest.approx([lr for lr in demo for _ in range(4)], abs=1e-15)


@pytest.mark.parametrize("budget", EPOCH_BUDGETS)
def test_lr_update_epoch_start_is_a_torch_scheduler_stepped_per_epoch(budget):
    """``lr_update: epoch_start`` (Thanos: ``CosineAnnealingLR`` with Lightning's ``interval: epoch``, stepped
    after each epoch): every step of epoch e trains at the scheduler's lr after e steps; here T_max = 1 epoch of
    3 (``cosine_annealing``, 3 half-periods: 0.06, 0, 0.06). Catches the lr read per step or at the epoch's end."""
    reference = torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1), 3, 0.06)
    lrs = lrs_of_training(budget, schedule="cosine_annealing", half_periods=3, lr_update="epoch_start")
    assert lrs == pytest.approx([lr for lr in reference[:3] for _ in range(4)], abs=1e-15)
    assert lrs[0] == 0.06 and lrs[4] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("update", ["epoch_start", "epoch_end"])
def test_lr_update_per_epoch_refuses_a_budget_in_seconds_before_training(update):
    """An epoch's end is not known in a budget of seconds: the plan refuses it in one line, and so does the
    training loop called directly, before any step."""
    from harness.execution.runner import plan
    from conftest import make_suite

    with pytest.raises(UsageError, match=f"lr_update '{update}' needs a budget in epochs, steps or samples, "
                                         "not seconds=60"):
        plan(make_suite([{"name": "simclr", "config": {"lr_update": update}}], budget="seconds=60"))
    cfg = config(batch_size=8, views=1, lr_update=update)  # train() called directly refuses it before a step
    method = LinearOnPixels(Flatten(), cfg, DataInfo(num_samples=32, image_shape=(1, 2, 2)))
    with pytest.raises(UsageError, match="not seconds=60"):
        train(method, torch.zeros(32, 1, 2, 2, dtype=torch.uint8), None, Budget("seconds", 60),
              Augmenter(None, [0.5], [0.25]), cfg, device="cpu", seed=0, generator=torch.Generator(), quiet=True)


def test_an_epoch_ending_past_the_budget_reads_the_schedule_at_its_end():
    """A budget of 10 steps in epochs of 4 steps (32 images, batch 8): with ``lr_update: epoch_end`` the epochs read
    the cosine at 0.4, 0.8 and, for the third (cut short at step 10, though its end would be step 12), at 1: lr 0,
    the schedule's end, not cos at 1.2 (0.0057, back on its way up). The same in samples (80 of 32 per epoch).
    Catches: the position not clamped to the budget's end."""
    from harness.engine.train import epoch_lr_position

    for budget in (Budget("steps", 10), Budget("samples", 80)):
        assert [epoch_lr_position(e, 4, 8, budget, "epoch_end") for e in range(3)] == [0.4, 0.8, 1.0]
        assert epoch_lr_position(2, 4, 8, budget, "epoch_start") == 0.8
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 2, 2), dtype=torch.uint8)
    cfg = config(lr=0.06, optimizer="sgd", weight_decay=0.0, batch_size=8, views=1, schedule="cosine",
                 lr_update="epoch_end")
    method = LinearOnPixels(Flatten(), cfg, DataInfo(num_samples=32, image_shape=(1, 2, 2)))
    recorder = LrRecorder()
    train(method, images, None, Budget("steps", 10), Augmenter(None, [0.5], [0.25]), cfg, device="cpu", seed=0,
          generator=torch.Generator().manual_seed(0), quiet=True, logger=recorder)
    at = [0.06 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0.4, 0.8)]
    assert [recorder.lrs[s] for s in range(1, 11)] == pytest.approx([at[0]] * 4 + [at[1]] * 4 + [0.0] * 2, abs=1e-15)
