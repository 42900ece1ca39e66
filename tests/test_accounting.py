"""Honest accounting across kills and failures: training time and epoch losses survive resumes, failed
runs are stored, reported and retried on request, and every finished run prints one line without a terminal."""
from __future__ import annotations

import itertools
import os
import signal
import types

import numpy as np
import pytest
import torch

from conftest import make_suite
from killable import Killed, KillableCC, KillableMoCo, KillableSimCLR
from harness.execution.runner import Runner, plan
from harness.execution.store import ResultStore
from methods import METHODS, Batch, Method, register_method

FAST = {"knn": {"k": 10}}
CONFIG = {"batch_size": 128}  # digits' 1,293 training images: 10 steps an epoch


@register_method("_nan_until_fixed")
class _NaNUntilFixed(METHODS.get("simclr")):
    """SimCLR whose loss is NaN while ``broken`` is set (a bug that a user then fixes)."""

    broken = True

    def training_step(self, batch: Batch):
        loss = super().training_step(batch)
        return loss * float("nan") if self.broken else loss


@register_method("_progress_noting_simclr")
class _ProgressNotingSimCLR(KillableSimCLR):
    """SimCLR that notes the budget fraction the loop gives it at each step (and can be killed at a step)."""

    seen: list[float] = []

    def training_step(self, batch: Batch):
        type(self).seen.append(self.progress)
        return super().training_step(batch)


def _runner(root, tmp_path, log=None, **kw) -> Runner:
    return Runner(root, tmp_path / "data", device="cpu", quiet=True, log=log or (lambda s: None), **kw)


def _straight_and_resumed(killable: type, name: str, kill_at: int, tmp_path) -> tuple[dict, dict]:
    """The records of ``name`` trained 14 steps (digits: 10 a epoch) straight, and killed in its step
    ``kill_at`` then resumed from the checkpoint saved after every step."""
    (job,) = plan(make_suite([{"name": name, "config": CONFIG}], budget="steps=14", protocols=FAST))
    killable.kill_at, killable.calls = None, 0
    straight = _runner(tmp_path / "a", tmp_path).run([job])[0]
    resumed_runner = _runner(tmp_path / "b", tmp_path, checkpoint_seconds=0.0)
    killable.kill_at, killable.calls = kill_at, 0
    with pytest.raises(Killed):
        resumed_runner.run([job])
    killable.kill_at = None
    return straight, resumed_runner.run([job])[0]


def test_an_adapter_sees_the_budget_fraction_done_before_each_step_also_after_a_resume(tmp_path):
    """``Method.progress`` is the share of the budget done before the step (steps=4: 0, 1/4, 2/4, 3/4), so an
    adapter can schedule a coefficient over any budget; killed at step 3 and resumed, the resumed steps see the
    fractions of an unbroken run, not a restart from 0."""
    (job,) = plan(make_suite([{"name": "_progress_noting_simclr", "config": CONFIG}], budget="steps=4",
                             protocols=FAST))
    _ProgressNotingSimCLR.kill_at, _ProgressNotingSimCLR.calls, _ProgressNotingSimCLR.seen = None, 0, []
    _runner(tmp_path / "a", tmp_path).run([job])
    assert _ProgressNotingSimCLR.seen == [0.0, 0.25, 0.5, 0.75]
    runner = _runner(tmp_path / "b", tmp_path, checkpoint_seconds=0.0)
    _ProgressNotingSimCLR.kill_at, _ProgressNotingSimCLR.calls, _ProgressNotingSimCLR.seen = 3, 0, []
    with pytest.raises(Killed):
        runner.run([job])
    _ProgressNotingSimCLR.kill_at, _ProgressNotingSimCLR.seen = None, []
    runner.run([job])
    assert _ProgressNotingSimCLR.seen == [0.5, 0.75]


def test_a_resumed_epoch_reports_the_mean_loss_of_all_its_steps(tmp_path):
    """Killed at step 5 of the first epoch and resumed, the first epoch's loss must be the mean of its 10
    steps, as in an uninterrupted run. Before, the loss list restarted at the resume: the mean of steps 5-10."""
    straight, resumed = _straight_and_resumed(KillableSimCLR, "_killable_simclr", 5, tmp_path)
    first = [h["loss"] for h in straight["train"]["history"]]
    again = [h["loss"] for h in resumed["train"]["history"]]
    assert len(first) == len(again) == 2
    np.testing.assert_allclose(again, first, rtol=1e-6)


def test_a_run_killed_as_an_epoch_ends_keeps_that_epochs_scalars(tmp_path):
    """Killed in the first step of epoch 2, a run resumes from the checkpoint saved after epoch 1's last step,
    before its history entry was written; the entry it then writes holds the adapter's scalars of that last step
    (CC's instance and cluster losses) as in an uninterrupted run. Catches scalars not restored from the
    checkpoint (the entry would have the loss alone)."""
    straight, resumed = _straight_and_resumed(KillableCC, "_killable_cc", 11, tmp_path)
    first, again = straight["train"]["history"][0], resumed["train"]["history"][0]
    assert {"instance_loss", "cluster_loss"} <= set(first) and set(again) == set(first)
    for key in ("loss", "instance_loss", "cluster_loss"):
        assert again[key] == pytest.approx(first[key], rel=1e-6)


def test_train_seconds_survive_a_kill_during_evaluation(tmp_path, monkeypatch):
    """Training finished, evaluation killed, rerun: the record says how long training took (the loop's clock,
    summed over segments), not the 0.01 s of reloading the finished checkpoint."""
    import harness.execution.runner as runner_module

    (job,) = plan(make_suite([{"name": "simclr", "config": CONFIG}], budget="steps=6", protocols=FAST))
    runner = _runner(tmp_path / "r", tmp_path)
    real_evaluate = runner_module.evaluate

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(runner_module, "evaluate", killed)
    with pytest.raises(Killed):
        runner.run([job])
    ckpt = torch.load(tmp_path / "r" / "test" / ".ckpt" / f"{job.run_id}.pt", weights_only=False)
    assert ckpt["done"] and ckpt["usage"]["seconds"] > 0
    monkeypatch.setattr(runner_module, "evaluate", real_evaluate)
    record = runner.run([job])[0]
    assert record["train_seconds"] == pytest.approx(ckpt["usage"]["seconds"], abs=1e-3)
    assert record["train_seconds"] == pytest.approx(record["train"]["used"]["seconds"], abs=1e-3)


def test_failed_runs_are_kept_reported_and_rerun_only_on_request(tmp_path):
    (job,) = plan(make_suite([{"name": "_nan_until_fixed", "config": CONFIG}], budget="steps=3", protocols=FAST))
    lines: list[str] = []
    _NaNUntilFixed.broken = True
    failed = _runner(tmp_path / "r", tmp_path, log=lines.append).run([job])[0]
    assert failed["status"] == "failed" and "nan" in failed["reason"]
    assert any("FAILED" in line and "nan" in line for line in lines)
    _NaNUntilFixed.broken = False
    again = _runner(tmp_path / "r", tmp_path).run([job])[0]
    assert again["status"] == "failed"  # stored: skipped without --retry-failed
    retried = _runner(tmp_path / "r", tmp_path, retry_failed=True).run([job])[0]
    assert retried["status"] == "ok" and retried["metrics"]["backbone"]["knn/top1"] > 0
    assert len(list((tmp_path / "r" / "test").glob("*.json"))) == 1


def test_each_finished_run_prints_one_line_with_time_and_headline_metrics(tmp_path):
    """Without a terminal (quiet, or piped) there are no bars: a line per evaluated protocol and one per run."""
    jobs = plan(make_suite([{"name": "simclr", "config": CONFIG}, "random"], budget="steps=2",
                           protocols={"knn": {"k": 10}, "clustering": {}}))
    lines: list[str] = []
    _runner(tmp_path / "r", tmp_path, log=lines.append).run(jobs)
    done = [line for line in lines if "trained" in line]
    assert len(done) == 2
    assert all("knn/top1" in line and "clustering/acc" in line and " s" in line for line in done)
    assert any(line.strip().startswith("evaluated knn on backbone") for line in lines)


def test_a_method_whose_runs_all_failed_keeps_a_row_that_says_why(tmp_path):
    """The leaderboard used to drop a row with no successful run: the failure vanished from the table."""
    from harness.reporting.leaderboard import leaderboard_table

    jobs = plan(make_suite([{"name": "_nan_until_fixed", "config": CONFIG}, "random"], budget="steps=2",
                           protocols=FAST))
    _NaNUntilFixed.broken = True
    records = _runner(tmp_path / "r", tmp_path).run(jobs)
    display = leaderboard_table(records).display
    assert list(display.index) == ["random", "_nan_until_fixed"]
    assert display.at["_nan_until_fixed", "rank"] == "–"
    assert display.at["_nan_until_fixed", "failed"].startswith("1: loss became nan")
    assert display.at["random", "failed"] == ""


def test_a_killed_moco_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """MoCo draws its shuffled BatchNorm groups from torch's global RNG. The checkpoint keeps that RNG's state, so
    a run killed at step 5 and resumed ends with the uninterrupted run's weights and queue, bit for bit. Before,
    the resumed run drew other permutations (and NPID other NCE noise)."""
    (job,) = plan(make_suite([{"name": "_killable_moco", "config": {"batch_size": 128, "queue_size": 512}}],
                             budget="steps=8", protocols=FAST))
    KillableMoCo.kill_at, KillableMoCo.calls = None, 0
    _runner(tmp_path / "a", tmp_path).run([job])
    resumed = _runner(tmp_path / "b", tmp_path, checkpoint_seconds=0.0)
    KillableMoCo.kill_at, KillableMoCo.calls = 5, 0
    with pytest.raises(Killed):
        resumed.run([job])
    KillableMoCo.kill_at = None
    resumed.run([job])
    straight, again = (torch.load(root / "test" / ".ckpt" / f"{job.run_id}.pt", weights_only=False)["model"]
                       for root in (tmp_path / "a", tmp_path / "b"))
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key


def test_ctrl_c_checkpoints_the_step_it_interrupts_and_the_rerun_loses_nothing(tmp_path, capsys):
    """SIGINT in step 5 (periodic checkpoints off): training finishes that step, saves it and stops with
    KeyboardInterrupt (the CLI exits 130); the rerun resumes at step 6 and ends with the uninterrupted run's
    weights. A second SIGINT stops at once. Catches: an interrupt that loses the steps since the last periodic
    checkpoint (before, a run stopped within its first minute kept nothing), a checkpoint taken mid-step."""
    (job,) = plan(make_suite([{"name": "_killable_simclr", "config": CONFIG}], budget="steps=8", protocols=FAST))
    KillableSimCLR.kill_at, KillableSimCLR.interrupt_at, KillableSimCLR.calls = None, None, 0
    _runner(tmp_path / "a", tmp_path).run([job])
    interrupted = _runner(tmp_path / "b", tmp_path, checkpoint_seconds=1e9)
    KillableSimCLR.interrupt_at, KillableSimCLR.calls = 5, 0
    with pytest.raises(KeyboardInterrupt):
        interrupted.run([job])
    checkpoint = tmp_path / "b" / "test" / ".ckpt" / f"{job.run_id}.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["usage"]["steps"] == 5 and not state["done"]
    assert "_killable_simclr/digits/s0: checkpointed at step 5 (62.5% of steps=8), epoch 0.50" in \
        capsys.readouterr().err  # what the stopped run had done, even with --quiet
    assert not (tmp_path / "b" / "test" / f"{job.run_id}.json").exists()
    KillableSimCLR.interrupt_at, KillableSimCLR.calls = None, 0
    (record,) = Runner(tmp_path / "b", tmp_path / "data", device="cpu", quiet=False, log=print).run([job])
    assert KillableSimCLR.calls == 3 and record["train"]["used"]["steps"] == 8
    assert "_killable_simclr/digits/s0: resumed at step 5 (62.5% of steps=8)" in capsys.readouterr().out
    straight, again = (torch.load(root / "test" / ".ckpt" / f"{job.run_id}.pt", weights_only=False)["model"]
                       for root in (tmp_path / "a", tmp_path / "b"))
    for key in straight:
        assert torch.equal(straight[key], again[key]), key


def test_a_second_ctrl_c_stops_training_at_once():
    from harness.engine.train import _checkpoint_on_interrupt

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where the shell ignores it
    with _checkpoint_on_interrupt(True) as request:
        os.kill(os.getpid(), signal.SIGINT)
        assert request.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_training_without_a_terminal_prints_a_progress_line_per_interval(capsys):
    """In a log file or a Slurm job (no terminal, so no bar) training prints a line every
    ``progress_seconds`` with the step, the budget's share, epoch, loss and images/s; ``quiet`` prints none."""
    from harness.data.augment import Augmenter
    from harness.engine.budget import Budget
    from harness.engine.train import train
    from harness.models.backbones import create_backbone
    from methods import DataInfo, create_method, resolve_config

    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = resolve_config(METHODS.get("simclr"), "cpu", {"batch_size": 16})
    for quiet in (False, True):
        method = create_method("simclr", create_backbone("small_cnn", 1), cfg, DataInfo(32, (1, 8, 8)))
        train(method, images, None, Budget("steps", 3), Augmenter(None, [0.5], [0.25]), cfg, device="cpu", seed=0,
              generator=torch.Generator().manual_seed(0), quiet=quiet, desc="simclr", progress_seconds=0.0)
        lines = capsys.readouterr().out.splitlines()
        if quiet:
            assert lines == []
        else:  # the last step ends the run: no line for it
            assert [line.split(" (")[0] for line in lines] == ["    simclr: at step 1", "    simclr: at step 2"]
            assert "(33.3% of steps=3), epoch 0.50" in lines[0] and lines[0].endswith("images/s")


@register_method("_nan_from_step_3")
class _NaNFromStep3(METHODS.get("simclr")):
    """SimCLR whose loss turns NaN at its third step, logging one tensor and one float scalar."""

    calls = 0

    def training_step(self, batch: Batch):
        type(self).calls += 1
        loss = super().training_step(batch)
        logs = {"doubled": (2 * loss).detach(), "step": float(type(self).calls)}
        return (loss * float("nan") if type(self).calls >= 3 else loss), logs


def test_a_loss_read_a_step_late_still_names_its_step_and_keeps_no_checkpoint_after_it(tmp_path):
    """The loop reads a step's loss after queueing the next step (so that reading never stalls a GPU): a NaN at
    step 3 still fails the run 'at step 3', no checkpoint is written once it is known, and the logged scalars
    of the finite steps come back as floats in the adapter's order. Catches: a late read that names the step it
    was read in, a checkpoint of NaN weights, scalars of one step logged under another."""
    from harness.engine.train import _DeviceScalars

    loss, logs = _DeviceScalars(torch.tensor(1.5), {"a": torch.tensor(2.0), "b": 3, "c": torch.tensor(4.0)}).read()
    assert loss == 1.5 and list(logs.items()) == [("a", 2.0), ("b", 3.0), ("c", 4.0)]
    (job,) = plan(make_suite([{"name": "_nan_from_step_3", "config": CONFIG}], budget="steps=8", protocols=FAST))
    _NaNFromStep3.calls = 0
    (record,) = _runner(tmp_path / "r", tmp_path, checkpoint_seconds=0.0).run([job])
    assert record["status"] == "failed" and record["reason"] == "loss became nan at step 3"
    state = torch.load(tmp_path / "r" / "test" / ".ckpt" / f"{job.run_id}.pt", weights_only=False)
    assert state["usage"]["steps"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                                if v.is_floating_point())
    assert state["logs"]["step"] == 2.0 and state["logs"]["doubled"] == pytest.approx(2 * state["epoch_losses"][-1])


class _Pixels(torch.nn.Module):
    """A linear map of the flattened 2x2 image: the smallest backbone the loop can train."""

    out_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x.flatten(1))


class _EpochLoss(Method):
    """Loss = its epoch number + 1 (the output times 0 keeps every weight in the graph), so each epoch's history loss
    is known; records the sample indices of every step, dies with :class:`Killed` at call ``kill_at`` of its
    training step and counts ``on_train_start`` over all instances (a resumed run must not start again)."""

    train_starts = 0

    def __init__(self, backbone, cfg, info, kill_at=None):
        super().__init__(backbone, cfg, info)
        self.epoch, self.batches, self.calls, self.kill_at = -1, [], 0, kill_at

    def on_train_start(self, loader) -> None:
        type(self).train_starts += 1

    def on_epoch_start(self, epoch, loader) -> None:
        self.epoch = epoch

    def training_step(self, batch: Batch):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed
        self.batches.append(batch.index.tolist())
        return self.backbone(batch.views[0]).sum() * 0 + (self.epoch + 1)


def _train_epoch_loss(budget, checkpoint=None, kill_at=None, seed=5, method_cls=None, checkpoint_seconds=0.0,
                      batch_size=8):
    from harness.data.augment import Augmenter
    from harness.engine.budget import Budget
    from harness.engine.train import train
    from methods import DataInfo, resolve_config

    images = torch.randint(0, 256, (32, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = {**resolve_config(METHODS.get("simclr"), "cpu", {"batch_size": batch_size}), "views": 1, "warmup": 0.0}
    method = (method_cls or _EpochLoss)(_Pixels(), cfg, DataInfo(32, (1, 2, 2)), kill_at)
    result = train(method, images, None, Budget.parse(budget), Augmenter(None, [0.5], [0.25]), cfg, device="cpu",
                   seed=seed, generator=torch.Generator().manual_seed(seed), quiet=True, checkpoint=checkpoint,
                   checkpoint_seconds=checkpoint_seconds)
    return method, result


def test_each_epoch_has_its_own_data_order_and_its_own_mean_loss():
    """3 epochs of 4 batches of 8: epoch e takes its batches in the order ``epoch_order(32, e, seed)``, a new
    permutation each epoch, and its history loss is the mean over its own steps only (1, 2, 3 here). Catches one
    order reused every epoch, and epoch losses that accumulate across epochs (1, 1.5, 2)."""
    from harness.engine.seeding import epoch_order

    method, result = _train_epoch_loss("epochs=3")
    assert result.status == "ok" and len(method.batches) == 12
    orders = [epoch_order(32, e, 5).view(4, 8).tolist() for e in range(3)]
    assert method.batches == orders[0] + orders[1] + orders[2]
    assert orders[0] != orders[1] != orders[2]
    assert [h["loss"] for h in result.history] == [1.0, 2.0, 3.0]
    assert [h["epoch"] for h in result.history] == [1.0, 2.0, 3.0]


def test_an_epochs_history_loss_is_the_mean_of_its_steps_not_its_last():
    """Loss = the step's number (1-8; 2 epochs of 4 batches of 8): the history losses are 2.5 and 6.5, the means
    of steps 1-4 and 5-8. Catches an epoch reported by its last step's loss (4, 8)."""
    class _StepNumberLoss(_EpochLoss):
        def training_step(self, batch: Batch):
            return super().training_step(batch) * 0 + self.calls

    _, result = _train_epoch_loss("epochs=2", method_cls=_StepNumberLoss)
    assert result.status == "ok" and [h["loss"] for h in result.history] == [2.5, 6.5]


def test_a_resumed_run_keeps_counting_its_seconds_and_does_not_start_again(tmp_path):
    """Killed in its 4th step (checkpoint after every step), the run resumes at step 4 of 6. The checkpoint says the
    first 3 steps took 1000 s (as on a slow machine): the resumed run's clock goes on from there, so a seconds budget
    and ``train_seconds`` count both segments, and ``on_train_start`` (bank and queue initialisation) is not called
    again. Catches a clock restarted at the resume and a second on_train_start that overwrites restored state."""
    checkpoint = tmp_path / "run.pt"
    _EpochLoss.train_starts = 0
    with pytest.raises(Killed):
        _train_epoch_loss("steps=6", checkpoint, kill_at=4)
    state = torch.load(checkpoint, weights_only=False)
    assert state["usage"]["steps"] == 3 and _EpochLoss.train_starts == 1
    state["usage"]["seconds"] = 1000.0
    torch.save(state, checkpoint)
    method, result = _train_epoch_loss("steps=6", checkpoint)
    assert method.calls == 3 and result.usage.steps == 6 and result.usage.samples == 48
    assert result.usage.seconds >= 1000.0 and _EpochLoss.train_starts == 1


class _InterruptedEpochLoss(_EpochLoss):
    """:class:`_EpochLoss` that sends its own process SIGINT (as Ctrl-C does) in its training step call
    ``interrupt_at`` and goes on."""

    interrupt_at: int | None = None

    def training_step(self, batch: Batch):
        if self.calls + 1 == type(self).interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().training_step(batch)


@pytest.mark.parametrize("interrupt_at", [3, 6])
def test_ctrl_c_keeps_the_loss_of_the_step_it_finishes_and_stops_even_at_the_budgets_end(tmp_path, interrupt_at,
                                                                                         monkeypatch):
    """SIGINT in step 3 of 6 (4 steps an epoch, loss 1 in epoch 0; periodic checkpoints off): the checkpoint holds steps 1-3 and the losses of
    all three (the third read before saving), so the resumed epoch's mean covers every step. SIGINT in the budget's
    last step: the finished run is saved as done and the process still stops (KeyboardInterrupt), as asked. Catches
    a checkpoint taken before the interrupted step's loss was read, and an interrupt dropped on the last step."""
    monkeypatch.setattr(_InterruptedEpochLoss, "interrupt_at", interrupt_at)
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        _train_epoch_loss("steps=6", checkpoint, method_cls=_InterruptedEpochLoss, checkpoint_seconds=1e9)
    state = torch.load(checkpoint, weights_only=False)
    if interrupt_at == 3:
        assert state["usage"]["steps"] == 3 and not state["done"] and state["epoch_losses"] == [1.0, 1.0, 1.0]
    else:
        assert state["usage"]["steps"] == 6 and state["done"] and state["epoch_losses"] == [2.0, 2.0]


def test_force_trains_a_stored_run_and_a_killed_one_again_from_their_first_step(tmp_path):
    """``force`` reruns from scratch: a stored run trains all its 3 steps again (not the stored record back, not
    the finished checkpoint reloaded), and a run killed after 2 checkpointed steps trains 3 steps, not the 1 left.
    Catches force ignored for stored records and a rerun that keeps the old checkpoint."""
    (job,) = plan(make_suite([{"name": "_killable_simclr", "config": CONFIG}], budget="steps=3", protocols=FAST))
    runner = _runner(tmp_path / "r", tmp_path, checkpoint_seconds=0.0)
    KillableSimCLR.kill_at, KillableSimCLR.calls = None, 0
    runner.run([job])
    assert KillableSimCLR.calls == 3
    runner.run([job])
    assert KillableSimCLR.calls == 3  # stored: not trained again without force
    (forced,) = runner.run([job], force=True)
    assert KillableSimCLR.calls == 6 and forced["status"] == "ok" and forced["train"]["used"]["steps"] == 3
    killed = _runner(tmp_path / "k", tmp_path, checkpoint_seconds=0.0)
    KillableSimCLR.kill_at, KillableSimCLR.calls = 3, 0
    with pytest.raises(Killed):
        killed.run([job])
    KillableSimCLR.kill_at, KillableSimCLR.calls = None, 0
    killed.run([job], force=True)
    assert KillableSimCLR.calls == 3


def test_a_non_finite_loss_of_either_sign_fails_the_run_at_its_step():
    """An infinite loss fails a run as a NaN does (a diverged run must not be stored as a result), naming its step.
    Catches a check for NaN alone."""
    class _InfFromStep2(_EpochLoss):
        def training_step(self, batch: Batch):
            loss = super().training_step(batch)
            return loss * float("inf") if self.calls >= 2 else loss

    _, result = _train_epoch_loss("steps=6", method_cls=_InfFromStep2)
    assert result.status == "failed" and result.reason == "loss became inf at step 2"


def test_checkpoints_come_every_checkpoint_seconds_and_a_seconds_budget_stops_at_its_limit(tmp_path, monkeypatch):
    """On a clock that moves one second per step: with ``checkpoint_seconds`` 3, a run killed in its 8th step
    resumes from step 6 (saved at 3 and 6, not after every step once 3 s have passed, nor at the 7th); a budget of
    5 seconds ends after exactly 5 steps. Catches a save time never moved on, a cadence slower than asked and a
    seconds budget that overshoots its limit."""
    import harness.engine.train as train_module

    def tick_per_call() -> types.SimpleNamespace:
        ticks = itertools.count()
        return types.SimpleNamespace(perf_counter=lambda: float(next(ticks)))

    monkeypatch.setattr(train_module, "time", tick_per_call())
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(Killed):
        _train_epoch_loss("steps=12", checkpoint, kill_at=8, checkpoint_seconds=3.0)
    assert torch.load(checkpoint, weights_only=False)["usage"]["steps"] == 6
    monkeypatch.setattr(train_module, "time", tick_per_call())
    _, result = _train_epoch_loss("seconds=5")
    assert result.status == "ok" and (result.usage.steps, result.usage.seconds) == (5, 5.0)


@register_method("_combination_of_nan_until_fixed")
class _CombinationOfNaNUntilFixed(METHODS.get("thanos")):
    """Thanos's concatenation of stored runs, over a run that fails at its first step while ``broken``."""

    components = ("_nan_until_fixed", "simclr")


@register_method("_combination_of_nan_from_step_3")
class _CombinationOfNaNFromStep3(METHODS.get("thanos")):
    """Thanos's concatenation of stored runs, over a run that fails at its third step (after a checkpoint)."""

    components = ("_nan_from_step_3", "simclr")


def test_a_combination_of_a_failed_run_is_a_failed_run_and_the_suite_goes_on(tmp_path):
    """A component that fails (NaN) fails its combination with the component's reason, and the suite's next run
    still runs; fixed and retried, the combination is evaluated. Before, a component failed at step 1 (no
    checkpoint to load) stopped the whole suite with FileNotFoundError, and one failed at step 3 after a periodic
    checkpoint was evaluated on its weights of step 2 and stored as ok. Retrying the combination alone retries its
    failed component (it was kept failed, and the combination failed again)."""
    methods = [{"name": name, "config": CONFIG} for name in ("_nan_until_fixed", "_nan_from_step_3", "simclr")]
    jobs = plan(make_suite([*methods, "_combination_of_nan_until_fixed", "_combination_of_nan_from_step_3", "random"],
                           budget="steps=4", protocols=FAST))
    _NaNUntilFixed.broken, _NaNFromStep3.calls = True, 0
    records = _runner(tmp_path / "r", tmp_path, checkpoint_seconds=0.0).run(jobs)
    status = {r["spec"]["label"]: (r["status"], r["reason"]) for r in records}
    assert status["_combination_of_nan_until_fixed"] == ("failed", "component _nan_until_fixed failed: "
                                                                   "loss became nan at step 1")
    assert status["_combination_of_nan_from_step_3"] == ("failed", "component _nan_from_step_3 failed: "
                                                                   "loss became nan at step 3")
    assert status["random"] == ("ok", "")
    _NaNUntilFixed.broken = False
    (combination,) = [job for job in jobs if job.entry.label == "_combination_of_nan_until_fixed"]
    (retried,) = _runner(tmp_path / "r", tmp_path, retry_failed=True).run([combination])
    assert retried["status"] == "ok"  # --retry-failed of the combination alone retried its failed component first
    (component,) = [job for job in jobs if job.entry.label == "_nan_until_fixed"]
    assert ResultStore(tmp_path / "r", component.suite).load(component.run_id)["status"] == "ok"


def test_a_run_stored_after_the_suite_started_is_read_again_under_its_lock_not_retrained(tmp_path):
    """A suite of [thanos, supcon_spread]: thanos trains and stores its component supcon_spread first, after the
    suite read the (then absent) records. The suite's own supcon_spread job must find that record when it reads
    again under the lock, as it would one written by another process, and use it instead of training again."""
    jobs = plan(make_suite(["thanos", {"name": "supcon_spread", "config": CONFIG}], budget="steps=2", protocols=FAST))
    log = []
    records = _runner(tmp_path / "r", tmp_path, log=log.append).run(jobs)
    component = jobs[1]
    assert [line for line in log if line.endswith(component.describe())] == [component.describe()]  # trained once
    stored = ResultStore(tmp_path / "r", component.suite).load(component.run_id)
    assert records[1] == stored and records[0]["spec"]["components"][0] == component.spec


def test_a_batch_larger_than_the_data_is_the_whole_data_once_a_step():
    """A batch size of 64 on 32 images (a small image folder with a paper recipe): each step is all 32 images, an
    epoch a step, and a 3-step budget ends after 3 epochs and 96 samples. Catches a batch not capped at the data,
    whose epoch of no whole batch would never end."""
    class _StopsAnEndlessLoop(_EpochLoss):
        def on_epoch_start(self, epoch, loader) -> None:
            assert epoch < 10, "the loop ran 10 epochs without a step"
            super().on_epoch_start(epoch, loader)

    method, result = _train_epoch_loss("steps=3", batch_size=64, method_cls=_StopsAnEndlessLoop)
    assert result.status == "ok" and [len(b) for b in method.batches] == [32, 32, 32]
    assert (result.usage.steps, result.usage.samples, result.usage.epochs) == (3, 96, 3.0)
