"""The training loop. It belongs to the harness: adapters return losses, the loop does the rest.

It enforces the budget (the adapter never counts), builds the optimiser and lr schedule from
the adapter's config, augments whole batches on the device, uses bf16 autocast on GPU,
checkpoints periodically so a killed run resumes where it stopped (and, on Ctrl-C or SIGINT, at
the end of the current step before it stops), and stops a run whose loss turns non-finite as
``failed`` with the reason. Under ``torch.distributed`` (see ``harness.engine.distributed``) it
trains data-parallel at the same global batch: every rank takes its share of each batch,
BatchNorm is global and DDP averages the gradients.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from harness.engine import distributed
from harness.data.augment import Augmenter
from harness.engine.budget import Budget, Usage
from harness.errors import UsageError, choices_error
from harness.engine.seeding import epoch_order
from harness.execution.store import write_torch_atomic
from harness.models.batchnorm import split_batchnorms
from methods.base import Batch, Method


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` is bfloat16 autocast on CUDA and float32 elsewhere; ``bf16``/``fp32`` force one."""
    if precision not in PRECISIONS:
        raise choices_error("precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


@dataclass
class TrainResult:
    status: str  # "ok" | "failed"
    usage: Usage
    reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    peak_memory_mb: float = 0.0
    memory_kind: str = ""


OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(params, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name = cfg["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise choices_error("optimizer", name, OPTIMIZERS)


SCHEDULES = ("constant", "cosine", "cosine_restarts", "cosine_annealing", "step")


#: When the lr is set: before every ``step`` from the share of the budget spent (the harness's own), or once per
#: epoch from the share spent where the epoch starts (``epoch_start``: a torch scheduler stepped once per epoch,
#: as Thanos's ``CosineAnnealingLR`` with ``interval: epoch``) or ends (``epoch_end``: MoCo's CIFAR demo sets
#: epoch e's lr, e = 1, 2, ..., from e / epochs, so its first epoch is already annealed a little and its last one
#: trains at the schedule's end).
LR_UPDATES = ("step", "epoch_start", "epoch_end")


def check_lr_update(cfg: dict[str, Any], budget: Budget) -> None:
    """An lr set once per epoch reads the schedule where an epoch starts or ends, which a budget in seconds does
    not know."""
    if cfg.get("lr_update", "step") != "step" and budget.unit == "seconds":
        raise UsageError(f"lr_update {cfg['lr_update']!r} needs a budget in epochs, steps or samples, not {budget}")


def epoch_lr_position(epoch: int, steps_per_epoch: int, batch_size: int, budget: Budget, at: str) -> float:
    """The share of ``budget`` (epochs, steps or samples: :func:`check_lr_update`) spent where epoch ``epoch``
    (0-based) starts (``at="epoch_start"``) or ends (``"epoch_end"``): where an lr set once per epoch reads the
    schedule (:data:`LR_UPDATES`)."""
    epochs = epoch + (at == "epoch_end")
    done = {"epochs": epochs, "steps": epochs * steps_per_epoch,
            "samples": epochs * steps_per_epoch * batch_size}[budget.unit]
    return min(1.0, done / budget.limit)


def lr_factor(progress: float, cfg: dict[str, Any]) -> float:
    """Multiplier of the base lr at ``progress`` in [0, 1] of the budget (linear warm-up, then the schedule).

    Warm-up rises linearly from 1e-3 / (warmup + 1e-3) at progress 0 to 1 at ``warmup``; from ``warmup_start``
    instead where one is set (CLD's ``GradualWarmupScheduler`` with multiplier m: 1 / m).

    After warm-up, t in [0, 1] is the progress through the rest of the budget and ``floor`` =
    min_lr / lr: ``cosine`` anneals once from 1 to the floor; ``cosine_restarts`` does so
    ``restarts`` times, jumping back to 1 (SGDR); ``cosine_annealing`` is torch's
    ``CosineAnnealingLR`` continued past T_max, floor + (1 - floor)(1 + cos(pi t / T))/2 with
    T = 1 / ``half_periods``: down to the floor, back up, ... (Thanos's official run steps
    ``CosineAnnealingLR(T_max=100)`` each epoch for 600 epochs: half_periods 6, ending at the top);
    ``step`` multiplies by ``gamma`` at each of ``milestones`` (fractions of the whole budget).
    """
    warmup = cfg["warmup"]
    if warmup > 0 and progress < warmup:
        start = cfg.get("warmup_start")
        if start is not None:
            return start + (1 - start) * progress / warmup
        return (progress + 1e-3) / (warmup + 1e-3)
    t = (progress - warmup) / max(1e-12, 1 - warmup)
    floor = cfg["min_lr"] / cfg["lr"] if cfg["lr"] > 0 else 0.0
    schedule = cfg["schedule"]

    def anneal(x: float) -> float:  # 1 at x = 0, the floor at x = 1, back to 1 at x = 2, ...
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * x))

    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return anneal(t)
    if schedule == "cosine_restarts":
        return anneal((t * cfg["restarts"]) % 1.0)
    if schedule == "cosine_annealing":
        return anneal(t * cfg["half_periods"])
    if schedule == "step":
        return cfg["gamma"] ** sum(progress >= m for m in cfg["milestones"])
    raise choices_error("schedule", schedule, SCHEDULES)


class PlainLoader:
    """Normalised, unaugmented batches ``(images, index)`` of the training set, in order (for hooks),
    resized to the augmenter's ``out_size`` as the training views are (:meth:`Augmenter.plain`)."""

    def __init__(self, images: torch.Tensor, augmenter: Augmenter, batch_size: int) -> None:
        self.images, self.augmenter, self.batch_size = images, augmenter, batch_size

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, len(self.images)), device=self.images.device)
            yield self.augmenter.plain(self.images[index]), index


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data_parallel(method: Method) -> DistributedDataParallel:
    """DDP around the adapter. Buffers (memory banks, queues, BN statistics) are kept equal on all
    ranks by the adapters' gathered updates and global BN, so they are not re-broadcast every step.
    Every trainable parameter gets a gradient in every step (adapters freeze what a configuration leaves
    idle; tests/test_ddp_training.py checks each shipped configuration), so DDP need not search the
    autograd graph for unused parameters and sync a used-parameter map each step."""
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    local = method.rank_local_parameters()
    # DDP's reducer spells a top-level parameter ".name" (module name "" + "."), its other checks "name"
    ignore = local + [f".{name}" for name in local if "." not in name]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, ignore)
    return DistributedDataParallel(method, **no_buffer_sync)


def _check_every_parameter_has_a_gradient(method: Method) -> None:
    """After the first backward pass (before any update): a trainable parameter without a gradient would stop
    data-parallel training at its second step with DDP's reduction error; name it on every machine instead."""
    idle = [name for name, p in method.named_parameters() if p.requires_grad and p.grad is None]
    if idle:
        shown = ", ".join(idle[:3]) + (f" and {len(idle) - 3} more" if len(idle) > 3 else "")
        raise UsageError(f"method {method.name or type(method).__name__!r}: trainable parameter(s) {shown} got no "
                         f"gradient in a training step; every trainable parameter must be used in every step "
                         f"(freeze idle ones with requires_grad_(False))")


def _checked_loss(method: Method, out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The loss and logged scalars of ``training_step``'s return value, which must be a one-element floating
    tensor attached to the graph (or that and a dict): anything else (an int, None, a per-sample vector, a
    tensor built without grad) stops with one line naming the method, not an error from inside torch."""
    loss, logs = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    problem = (f"is {type(loss).__name__} {str(loss)[:40]}, not a tensor" if not torch.is_tensor(loss) else
               f"has shape {tuple(loss.shape)}, not one element" if loss.numel() != 1 else
               f"is of dtype {loss.dtype}, not floating point" if not loss.is_floating_point() else
               "does not require grad (it was not computed from the parameters)" if not loss.requires_grad else
               "comes with logs that are not a dict" if not isinstance(logs, dict) else None)
    if problem:
        raise UsageError(f"method {method.name or type(method).__name__!r}: the loss training_step returned "
                         f"{problem}; return a one-element floating tensor with grad, or (loss, dict of scalars)")
    return loss, logs


def _global_rng(device: str) -> dict[str, torch.Tensor]:
    """torch's global RNG states, which adapters draw from during training (MoCo's shuffled BN groups, NPID's
    NCE noise): saved with each checkpoint so that a resumed run draws what an uninterrupted one would."""
    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _set_global_rng(state: dict[str, torch.Tensor] | None, device: str) -> None:
    if state is None:  # a checkpoint of an older version
        return
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.device(device))


class _DeviceScalars:
    """A step's loss and logged scalars (0-d tensors, or floats) on their way to the host. On CUDA they go
    in one copy to pinned memory, queued right behind the work that computed them; :meth:`read` waits for
    that copy alone, where ``.item()`` would wait for everything queued since (the next step included)."""

    def __init__(self, loss: torch.Tensor, logs: dict[str, torch.Tensor | float]) -> None:
        self.logs = logs
        tensors = [loss] + [v for v in logs.values() if torch.is_tensor(v)]
        stacked = torch.stack([t.detach().float().reshape(()) for t in tensors])
        self.copied = None
        if stacked.is_cuda:
            self.host = torch.empty(stacked.shape, dtype=torch.float32, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(stacked.device))  # that GPU's stream, not the current GPU's
        else:
            self.host = stacked

    def read(self) -> tuple[float, dict[str, float]]:
        """(loss, logs as floats, in the adapter's order)."""
        if self.copied is not None:
            self.copied.synchronize()
        loss, *values = self.host.tolist()
        values = iter(values)
        return loss, {k: next(values) if torch.is_tensor(v) else float(v) for k, v in self.logs.items()}


class _InterruptRequest:
    """Set by the first SIGINT (Ctrl-C, ``timeout --signal=INT``) while a run trains: the loop finishes its
    step, checkpoints and raises KeyboardInterrupt, so the next call resumes with nothing lost (a periodic
    checkpoint is up to a minute old). A second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: checkpointing after this step (again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _checkpoint_on_interrupt(enabled: bool) -> Iterator[_InterruptRequest]:
    """Install :class:`_InterruptRequest` as the SIGINT handler for the block, when ``enabled`` and in the main
    thread (only there can Python handle signals); the previous handler comes back afterwards."""
    request = _InterruptRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.signal(signal.SIGINT, request)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


def _rank0_clock(elapsed: float) -> float:
    """Rank 0's elapsed seconds on every rank, so that all ranks agree when a seconds budget is spent."""
    if distributed.get_world_size() == 1:
        return elapsed
    group, on = distributed.host_values_group()  # gloo beside NCCL: the GPUs' queues are not waited for
    t = torch.tensor([elapsed], dtype=torch.float64, device=on)
    torch.distributed.broadcast(t, src=0, group=group)
    return float(t)


def train(method: Method, images: torch.Tensor, labels: torch.Tensor | None, budget: Budget,
          augmenter: Augmenter, cfg: dict[str, Any], *, device: str, seed: int, generator: torch.Generator,
          checkpoint: Path | None = None, checkpoint_seconds: float = 60.0, quiet: bool = False,
          desc: str = "", logger=None, precision: str = "auto", compile_backbone: bool | str = False,
          progress_seconds: float = 60.0) -> TrainResult:
    """Train ``method`` on the uint8 ``images`` (already on ``device``) until ``budget`` is spent.

    ``labels`` (on device) are handed to the adapter only if it declares a ``label_level``.
    Data order of epoch e is a permutation seeded by (seed, e), so a resumed run sees the
    same batches it would have seen. ``precision`` (see :func:`resolve_precision`) sets autocast;
    on CUDA the model and views are channels-last, and in one process a step's views go through the backbone
    as one batch whose BatchNorms normalise each view apart (``Method.encode_views``: a pass per view's
    statistics, with every other layer launched once); ``compile_backbone`` runs ``torch.compile`` on
    the backbone in place (state-dict keys unchanged) and on the augmenter's batch augmentation off the CPU;
    a string is the backbone's ``torch.compile`` mode (``"reduce-overhead"``: CUDA graphs).
    Progress is a bar on a terminal; elsewhere (a log file, a Slurm job) one line every
    ``progress_seconds``; nothing when ``quiet``. With several ranks, ``batch_size`` is the global
    batch and rank r trains on rows [r b, (r + 1) b) of each, b = batch_size / world size.
    """
    n = len(images)
    batch_size = min(int(cfg["batch_size"]), n)
    steps_per_epoch = n // batch_size
    rank, world = distributed.get_rank(), distributed.get_world_size()
    distributed.check_batch_split(batch_size, world)
    check_lr_update(cfg, budget)
    rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    cuda = device.startswith("cuda")
    # on the device before the optimizer exists: a resumed optimizer's state (momentum, Adam moments) is
    # moved to its parameters' device by load_state_dict, and BatchNorm is synchronised for that device
    method.to(device).train()
    if cuda:
        method.to(memory_format=torch.channels_last)
    if world > 1:
        distributed.sync_batchnorm(method)
    elif cuda:  # a step's views in one pass of the backbone, each normalised by its own statistics (encode_views)
        split_batchnorms(method.backbone)
        method.views_in_one_pass = True
    optimizer = build_optimizer([p for p in method.parameters() if p.requires_grad], cfg)
    usage, history, epoch, step_in_epoch = Usage(), [], 0, 0
    epoch_losses: list[float] = []  # losses of the current epoch's steps, kept across a resume
    logs: dict[str, float] = {}  # the adapter's scalars of the last step: its epoch's history entry, kept too
    resumed = checkpoint is not None and checkpoint.is_file()
    if resumed:
        # on the CPU: the data-order generator's state must be a CPU tensor; weights and optimizer state are
        # copied to their parameters' device as they load
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        method.load_state_dict(state["model"])
        per_rank = state.get("optimizer_per_rank")
        if per_rank is not None and len(per_rank) != world:
            raise UsageError(f"{checkpoint} was trained with sharded parameters over {len(per_rank)} ranks; "
                             f"resume it with {len(per_rank)} ranks, not {world}")
        optimizer.load_state_dict(state["optimizer"] if per_rank is None else per_rank[rank])
        usage, history = Usage(**state["usage"]), state["history"]
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        epoch_losses = list(state.get("epoch_losses", []))
        logs = dict(state.get("logs", {}))  # a run saved at the end of an epoch resumes with no step left in it
        generator.set_state(state["generator"])
        _set_global_rng(state.get("global_rng"), device)
        if state.get("done"):
            return TrainResult("ok", usage, history=history, peak_memory_mb=state.get("peak_memory_mb", 0.0),
                               memory_kind=state.get("memory_kind", ""))
    if compile_backbone:
        method.backbone.compile(**({"mode": compile_backbone} if isinstance(compile_backbone, str) else {}))
        augmenter.compile()
    autocast_bf16 = resolve_precision(precision, device) == "bf16"
    model = _data_parallel(method) if world > 1 else method
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    plain = PlainLoader(images, augmenter, batch_size)
    if not resumed:
        method.on_train_start(plain)

    def save(done: bool = False) -> None:
        if checkpoint is None:
            return
        model_state = method.state_dict()  # every rank: adapters with sharded parameters gather them here
        optimizer_state = optimizer.state_dict()
        per_rank = None
        if world > 1 and method.rank_local_parameters():  # their optimizer state differs by rank too
            per_rank = [None] * world
            torch.distributed.all_gather_object(per_rank, optimizer_state)
        if rank == 0:
            write_torch_atomic(checkpoint, {
                "model": model_state, "optimizer": optimizer_state, "optimizer_per_rank": per_rank,
                "usage": usage.as_dict(), "history": history, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "epoch_losses": epoch_losses, "logs": logs, "generator": generator.get_state(),
                "global_rng": _global_rng(device), "done": done, "peak_memory_mb": peak(), "memory_kind": memory_kind})

    memory_kind = "cuda_max_allocated" if cuda else "process_peak_rss"

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()

    augmenter.start(epoch, step_in_epoch)
    # one process only: ranks that stopped at different steps would wait on each other's collectives
    with _checkpoint_on_interrupt(checkpoint is not None and world == 1) as interrupted, contextlib.closing(augmenter):
        bar = tqdm(total=float(budget.limit), desc=desc or "train", unit=budget.unit[:-1],
                   disable=True if quiet or rank > 0 else None,
                   leave=False, dynamic_ncols=True, initial=float(getattr(usage, budget.unit)))
        started, last_save = time.perf_counter() - usage.seconds, usage.seconds
        progress_lines, last_line = not quiet and rank == 0 and bar.disable, usage.seconds

        def progress(what: str) -> str:
            loss = f", loss {epoch_losses[-1]:.4f}" if epoch_losses else ""
            return (f"{desc or 'train'}: {what} step {usage.steps} ({usage.fraction(budget):.1%} of {budget}), "
                    f"epoch {usage.epochs:.2f}, {usage.seconds:.0f} s{loss}, "
                    f"{usage.samples / max(usage.seconds, 1e-9):.0f} images/s")

        if resumed and not quiet and rank == 0:
            tqdm.write(f"    {progress('resumed at')}")
        # A step's loss and scalars stay on the device until the next step has been queued: reading them at
        # once would make the host wait for the device at every step, leaving it idle while the host prepares
        # the next batch. Every rank reads them at the same points, so a non-finite loss stops all together;
        # a failed run has then trained its failing step and at most one more (``usage`` counts them).
        pending: tuple[int, _DeviceScalars, float] | None = None  # (step, its loss and scalars, its lr), unread

        def settle() -> str:
            """Read the pending step's loss and scalars; the failure reason if the loss is not finite."""
            nonlocal pending, logs
            if pending is None:
                return ""
            number, scalars, lr = pending
            pending = None
            value, step_logs = scalars.read()
            if not math.isfinite(value):
                return f"loss became {value} at step {number}"
            logs = step_logs
            epoch_losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}", img_s=f"{usage.samples / max(usage.seconds, 1e-9):.0f}")
            if logger is not None:
                logger.log_scalars(number, {"train/loss": value, "train/lr": lr,
                                            **{f"train/{k}": v for k, v in logs.items()}})
            return ""

        status, reason, first_step = "ok", "", True
        while not usage.exhausted(budget):
            if step_in_epoch == 0:
                method.on_epoch_start(epoch, plain)
                epoch_losses = []
            order = epoch_order(n, epoch, seed).to(device)
            update = cfg.get("lr_update", "step")
            epoch_lr_at = None if update == "step" else \
                epoch_lr_position(epoch, steps_per_epoch, batch_size, budget, update)  # read for the whole epoch
            for step in range(step_in_epoch, steps_per_epoch):
                index = order[step * batch_size:(step + 1) * batch_size][rows]
                raw = images[index]
                views = [augmenter(raw, generator, rows, batch_size) for _ in range(cfg["views"])]
                if cuda:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                batch = Batch(views, index, labels[index] if method.label_level and labels is not None else None)
                method.progress = usage.fraction(budget)
                at = method.progress if epoch_lr_at is None else epoch_lr_at
                for group in optimizer.param_groups:
                    group["lr"] = cfg["lr"] * lr_factor(at, cfg)
                with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                    out = model(batch)
                loss, step_logs = _checked_loss(method, out)
                # the same on every rank; on its way to the host behind the forward pass
                to_host = _DeviceScalars(distributed.all_reduce_mean(loss.detach()), step_logs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if first_step:
                    _check_every_parameter_has_a_gradient(method)
                    first_step = False
                optimizer.step()
                method.after_optimizer_step()
                reason = settle()  # the previous step's: its copy was queued a step ago, reading it stalls nothing
                if reason:
                    status = "failed"
                    break
                pending = (usage.steps + 1, to_host, optimizer.param_groups[0]["lr"])
                before = getattr(usage, budget.unit)
                usage.steps += 1
                usage.samples += batch_size
                usage.epochs = epoch + (step + 1) / steps_per_epoch
                usage.seconds = _rank0_clock(time.perf_counter() - started)
                step_in_epoch = step + 1
                bar.update(getattr(usage, budget.unit) - before)
                if usage.exhausted(budget):
                    break
                due_line = usage.seconds - last_line >= progress_seconds  # the same on every rank
                due_save = checkpoint is not None and usage.seconds - last_save >= checkpoint_seconds
                if interrupted.requested or due_line or due_save:  # these need the step's loss
                    reason = settle()
                    if reason:
                        status = "failed"
                        break
                if interrupted.requested:
                    save()
                    print(progress("checkpointed at"), file=sys.stderr, flush=True)
                    raise KeyboardInterrupt
                if due_line:
                    if progress_lines:
                        print(f"    {progress('at')}", flush=True)
                    last_line = usage.seconds
                if due_save:
                    save()
                    last_save = usage.seconds
            if status != "failed":
                reason = settle()  # the epoch's or the budget's last step
                status = "failed" if reason else status
            if status == "failed":
                break
            if step_in_epoch >= steps_per_epoch or usage.exhausted(budget):
                history.append({"epoch": round(usage.epochs, 4), "loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
                                "lr": optimizer.param_groups[0]["lr"], "seconds": round(usage.seconds, 3), **logs})
                method.on_epoch_end(epoch)
                if step_in_epoch >= steps_per_epoch:
                    epoch, step_in_epoch = epoch + 1, 0
        bar.close()
        result = TrainResult(status, usage, reason, history, peak(), memory_kind)
        if status == "ok":
            save(done=True)
        if interrupted.requested and status == "ok":  # asked on the budget's last step: saved, but stop as asked
            raise KeyboardInterrupt
        return result
