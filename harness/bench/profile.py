"""What limits a training step: a few steps of ``train()`` under ``torch.profiler``.

The GPU benchmark's time split (backbone, augmentation, rest) adds up separately timed parts and
cannot say whether the GPU or the host sets the pace. This profiles steps of the real training
loop instead and reports, per step: the host's wall time, the time the GPU spent in kernels and
copies (its busy share of the wall time), the kernels launched, the aten operators dispatched and
the times the host waited for the device (a synchronising CUDA call). A GPU busy for most of the
step is the limit; a GPU idle for much of it waits for a host issuing thousands of small kernels
(or stopped by a synchronisation). On the CPU only the operator count applies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from harness.bench.train import _setup, _sync, bench_augmenter, bench_method
from harness.data.datasets import ImageData
from harness.engine.budget import Budget
from harness.engine.seeding import seed_everything
from harness.engine.train import train

#: CUDA runtime calls that make the host wait for the device.
SYNCHRONISING = frozenset({"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                           "cudaMemcpy2D", "cudaFree", "cudaFreeHost"})
#: A GPU busy for at least this share of the step sets the pace.
GPU_BOUND = 0.85


@dataclass
class StepProfile:
    """Per-step averages over the profiled steps; ``device_ms`` and ``kernels`` are None without a GPU."""

    steps: int
    wall_ms: float
    ops: float
    device_ms: float | None = None
    kernels: float | None = None
    waits: float = 0.0
    wait_ms: float = 0.0
    top: str = ""  # torch.profiler's table of the operators taking the most device (or CPU) time

    def describe(self, step_ms: float | None = None) -> str:
        """One cell: the verdict first, then the figures behind it. ``step_ms``: the step's time measured without
        the profiler, whose own overhead per operator lengthens the host's part of a profiled step; the GPU's
        busy share is taken of it when given."""
        if self.device_ms is None:
            return f"{_count(self.ops)} aten ops a step (profiled {self.wall_ms:.1f} ms a step on the CPU)"
        wall = step_ms or self.wall_ms
        busy = self.device_ms / wall
        waits = (f", host waits {self.waits:.1f} times ({self.wait_ms:.1f} ms)" if self.waits >= 0.05 else "")
        verdict = ("GPU-bound" if busy >= GPU_BOUND else
                   "host-bound: waits for the device" if self.wait_ms >= 0.5 * (wall - self.device_ms) else
                   "host-bound: launches and Python")
        profiled = f" (profiled: {self.wall_ms:.1f} ms)" if step_ms else ""
        return (f"{verdict}; GPU busy {busy:.0%} of {wall:.1f} ms{profiled}, {_count(self.kernels)} kernels and "
                f"{_count(self.ops)} aten ops a step{waits}")


def _count(per_step: float) -> str:
    """A per-step average: whole numbers with thousands separators, one decimal below 10."""
    return f"{per_step:.1f}" if per_step < 10 else f"{per_step:,.0f}"


def summarise(events, steps: int, wall_s: float, cuda: bool) -> StepProfile:
    """A :class:`StepProfile` of the profiler's ``events`` (``prof.events()``) covering ``steps`` steps that took
    ``wall_s`` seconds on the host clock. Operators are counted where they are dispatched from Python or the
    autograd engine (aten operators inside another aten operator are its implementation, not extra work)."""
    ops = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
              and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    waits = [e for e in events if e.device_type == DeviceType.CPU and e.name in SYNCHRONISING]
    profile_ = StepProfile(steps, wall_s * 1e3 / steps, ops / steps, waits=len(waits) / steps,
                           wait_ms=sum(e.time_range.elapsed_us() for e in waits) / 1e3 / steps)
    if cuda:
        # kernels, copies and memsets; not the ranges that annotate them on the GPU's timeline (record_function
        # around Optimizer.step, compiled regions), which span kernels already counted
        device = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        if not device:  # no GPU activity recorded: a verdict from it would call every step host-bound
            raise RuntimeError("torch.profiler recorded no GPU kernels (is CUPTI missing?)")
        profile_.device_ms = busy_us([(e.time_range.start, e.time_range.end) for e in device]) / 1e3 / steps
        profile_.kernels = len(device) / steps
    profile_.top = events.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                               row_limit=15)
    return profile_


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``intervals`` (start, end): time the GPU was busy, counting work that
    overlaps on several streams once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_training(name: str, data: ImageData, backbone: str, scale: str, device: str, *, warmup: int = 3,
                     steps: int = 5, deterministic: bool = True, compile_backbone: bool | str = False,
                     compile_step: str | None = None) -> StepProfile:
    """Train ``name`` for ``warmup + steps`` steps as :func:`harness.bench.train.method_images_per_second` does
    and profile the last ``steps`` (the profiler starts and stops between steps, from the method's
    ``after_optimizer_step``; epoch hooks before the first step fall outside)."""
    _, cfg, images, labels, info = _setup(name, data, scale, device, Path("."))
    augmenter = bench_augmenter(data, cfg)
    generator = seed_everything(0, deterministic=deterministic)
    method = bench_method(name, backbone, data, cfg, info, augmenter, compile_step)
    cuda = device.startswith("cuda")
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    finished, clock = [0], {}
    adapter_hook = method.after_optimizer_step

    def after_step() -> None:  # the loop calls this once a step, after the optimiser
        adapter_hook()
        finished[0] += 1
        if finished[0] == warmup:
            _sync(device)
            prof.start()
            clock["start"] = time.perf_counter()
        elif finished[0] == warmup + steps:
            _sync(device)
            clock["stop"] = time.perf_counter()
            prof.stop()

    method.after_optimizer_step = after_step
    try:
        train(method, images, labels, Budget("steps", warmup + steps + 1), augmenter, cfg, device=device, seed=0,
              generator=generator, quiet=True, compile_backbone=compile_backbone)
    finally:
        if "start" in clock and "stop" not in clock:  # training raised while profiling: stop recording, or the
            prof.stop()  # rows timed while the caller holds the traceback (and this frame) pay the profiler's overhead
    if "stop" not in clock:
        raise RuntimeError(f"{name}: trained {finished[0]} of {warmup + steps} steps; nothing profiled")
    return summarise(prof.events(), steps, clock["stop"] - clock["start"], cuda)
