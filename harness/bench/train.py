"""Training-throughput benchmark: each method's full training step against the bare backbone.

``python -m harness bench train`` prints, per method, images per second of the full step (data
indexing, on-device augmentation, forward, backward, optimiser, method bookkeeping) and of the
floor: the bare backbone's forward and backward on random tensors already on the device, for the
same number of views per image. The ratio full / floor is the share of time spent on the model
itself (1.0 = no overhead). Peak memory is recorded alongside.

The ``loader`` columns time the same training step fed by the old per-image path instead: a
DataLoader whose worker processes augment every image on its own with the torchvision transforms
on PIL images (:mod:`harness.data.pil_augment`), ``--loader-workers`` of them (default min(4, CPUs)).
"""
from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from harness.data.augment import Augmenter, get_preset
from harness.models.backbones import create_backbone
from harness.engine.budget import Budget
from harness.data.datasets import ImageData, load_dataset, with_input_norm
from harness.execution.environment import resolve_device
from harness.execution.store import write_text_atomic
from harness.data.pil_augment import default_workers, training_feed
from harness.engine.seeding import seed_everything
from harness.engine.train import _peak_rss_mb, _reset_peak_rss, train
from harness.errors import choices_error
from methods import METHODS, DataInfo, create_method, resolve_config
from harness.execution.validate import UsageParser, csv_list, output_file, positive_int


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def floor_images_per_second(backbone_name: str, shape: tuple[int, int, int], batch: int, views: int,
                            device: str, steps: int) -> float:
    """Source images per second of bare backbone forward+backward on ``views`` random views per image, torch's
    fastest algorithms allowed (no deterministic mode; cuDNN autotuning on)."""
    seed_everything(0, deterministic=False)
    net = create_backbone(backbone_name, shape[0]).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    x = torch.randn(batch * views, *shape, device=device)
    if device.startswith("cuda"):  # channels-last, as train() runs the model on CUDA
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = net(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def _setup(name: str, dataset: str | ImageData, scale: str, device: str, data_dir: Path):
    """(data, method config, training images on device, labels, DataInfo) as the runner builds them."""
    data = dataset if isinstance(dataset, ImageData) else load_dataset(dataset, data_dir)
    cls = METHODS.get(name)
    cfg = resolve_config(cls, scale)
    images = data.images[torch.from_numpy(data.is_train)].to(device)
    labels = torch.as_tensor(data.labels[data.is_train] if cls.label_level != "coarse"
                             else data.coarse_labels[data.is_train]).to(device)
    info = DataInfo(len(images), data.image_shape,
                    data.num_classes if cls.label_level == "fine" else data.num_coarse if cls.label_level else None)
    return data, cfg, images, labels, info


def bench_augmenter(data: ImageData, cfg: dict) -> Augmenter:
    """The on-device augmenter of ``cfg``'s preset with ``data``'s normalisation under ``cfg``'s ``input_norm``, as
    the runner builds it."""
    data = with_input_norm(data, cfg["input_norm"])
    return Augmenter(get_preset(cfg["augment"], **cfg["augment_overrides"]), data.mean, data.std)


class TrainingRate(NamedTuple):
    """What :func:`method_images_per_second` measured."""

    images_per_second: float  # over an epoch: the timed steps, plus the epoch-start hook spread over an epoch
    batch: int
    views: int
    peak_mb: float
    hook_seconds_per_step: float  # the method's on_epoch_start (SeLa's relabelling), timed apart, over an epoch's steps


def method_images_per_second(name: str, dataset: str | ImageData, backbone_name: str, scale: str, device: str,
                             steps: int, data_dir: Path, compile_backbone: bool | str = False,
                             deterministic: bool = False, compile_step: str | None = None) -> TrainingRate:
    """Images/s of the full training step for ``name`` on ``dataset`` (a name, or data already loaded). The
    warm-up run also pays for ``compile_backbone``'s compilation: the timed run's fresh backbone reuses the
    compiled code (same module class, parameters are graph inputs); a string is its ``torch.compile`` mode.
    ``deterministic``: torch's deterministic algorithms, as a suite's ``deterministic: true`` trains.
    ``compile_step``: a ``torch.compile`` mode for the whole adapter (its training step: backbone, heads, loss;
    :func:`bench_method`).

    The method's epoch-start hook (SeLa relabels the training set there) runs once in the timed steps, a few
    dozen of an epoch's hundreds: it is timed apart and spread over the steps of an epoch, as training pays it,
    instead of over the timed steps."""
    data, cfg, images, labels, info = _setup(name, dataset, scale, device, data_dir)
    augmenter = bench_augmenter(data, cfg)
    results, hook_seconds = [], []
    for budget in (Budget("steps", 2), Budget("steps", steps)):  # the first run is warm-up
        generator = seed_everything(0, deterministic=deterministic)
        method = bench_method(name, backbone_name, data, cfg, info, augmenter, compile_step)
        hook_seconds = []
        method.on_epoch_start = partial(_timed, method.on_epoch_start, hook_seconds, device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _reset_peak_rss()
        result = train(method, images, labels, budget, augmenter, cfg, device=device, seed=0,
                       generator=generator, quiet=True, compile_backbone=compile_backbone)
        results.append(result)
    last = results[-1]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _peak_rss_mb()
    batch = min(cfg["batch_size"], len(images))
    per_epoch = sum(hook_seconds) / max(1, len(hook_seconds))  # the timed steps may cross epochs
    steps_per_epoch = max(1, len(images) // batch)
    hook_per_step = per_epoch / steps_per_epoch
    step_seconds = (last.usage.seconds - sum(hook_seconds)) / last.usage.steps + hook_per_step
    return TrainingRate(batch / step_seconds, batch, cfg["views"], peak, hook_per_step)


def bench_method(name: str, backbone_name: str, data: ImageData, cfg: dict, info: DataInfo, augmenter: Augmenter,
                 compile_step: str | None = None) -> torch.nn.Module:
    """The adapter as the runner builds it; with ``compile_step`` (a ``torch.compile`` mode, e.g.
    ``"reduce-overhead"``: CUDA graphs) its whole forward, the training step, goes through ``torch.compile``
    and so does the augmenter's batch augmentation. No ``harness run`` option does this yet: benchmark rows measure
    what it would gain."""
    method = create_method(name, create_backbone(backbone_name, data.image_shape[0]), cfg, info)
    if compile_step is not None:
        method.compile(mode=compile_step)
        augmenter.compile()
    return method


def _timed(hook, seconds: list[float], device: str, *args) -> None:
    """Run ``hook(*args)`` between two device synchronisations and append its seconds to ``seconds``."""
    _sync(device)
    start = time.perf_counter()
    hook(*args)
    _sync(device)
    seconds.append(time.perf_counter() - start)


def loader_images_per_second(name: str, dataset: str, backbone_name: str, scale: str, device: str, steps: int,
                             data_dir: Path, workers: int) -> float:
    """Images/s of the full training step when the views come from the per-image DataLoader path.

    ``workers`` DataLoader processes run the torchvision transform of the same augmentation preset
    on PIL images (``harness.data.pil_augment``) and prefetch batches in the order train() draws them;
    train() takes them through a :class:`~harness.data.pil_augment.LoaderAugmenter`. One run of
    ``warm-up + steps`` steps; the clock starts when step ``warm-up`` asks for its views (the first
    steps pay for starting the workers) and stops when train() returns.
    """
    data, cfg, images, labels, info = _setup(name, dataset, scale, device, data_dir)
    batch, views = min(cfg["batch_size"], len(images)), cfg["views"]
    warmup = 2 + workers  # every worker has delivered a batch before the clock starts
    norm = with_input_norm(data, cfg["input_norm"])
    augmenter = training_feed(images, get_preset(cfg["augment"], **cfg["augment_overrides"]), norm.mean, norm.std,
                              views=views, batch_size=batch, seed=0, num_workers=workers)
    try:
        generator = seed_everything(0, deterministic=False)
        method = create_method(name, create_backbone(backbone_name, data.image_shape[0]), cfg, info)
        result = train(method, images, labels, Budget("steps", warmup + steps), augmenter, cfg, device=device,
                       seed=0, generator=generator, quiet=True)
        _sync(device)
        end = time.perf_counter()
    finally:
        augmenter.close()
    if result.status != "ok":
        raise RuntimeError(f"{name}: training on the DataLoader path failed: {result.reason}")
    return steps * batch / (end - augmenter.step_times[warmup])


def train_benchmarks(dataset: str = "digits", backbone: str = "small_cnn", scale: str = "cpu", steps: int = 20,
                     device: str = "auto", methods: list[str] | None = None,
                     data_dir: Path = Path.home() / ".cache" / "ssl-harness" / "data",
                     loader_workers: int | None = None) -> pd.DataFrame:
    """One row per training method: on-device path, floor, ratio, per-image DataLoader path and its ratio.

    ``loader_workers``: DataLoader worker processes of the per-image path (default min(4, CPUs));
    a negative number leaves the loader columns out.
    """
    device = resolve_device(device)
    workers = default_workers() if loader_workers is None else loader_workers
    trained = [n for n in METHODS.names() if METHODS.get(n).trains]
    for name in methods or []:  # before any timing: baselines (random, pixels) have no training step
        if name not in trained:
            raise choices_error("training method", name, trained)
    rows = []
    for name in methods or trained:
        ips, batch, views, peak, _ = method_images_per_second(name, dataset, backbone, scale, device, steps,
                                                              data_dir)
        data = load_dataset(dataset, data_dir)
        floor = floor_images_per_second(backbone, data.image_shape, batch, views, device, steps)
        row = {"method": name, "batch": batch, "views": views, "images/s": round(ips, 1),
               "floor images/s": round(floor, 1), "ratio": round(ips / floor, 3), "peak MB": round(peak)}
        if workers >= 0:
            loader_ips = loader_images_per_second(name, dataset, backbone, scale, device, steps, data_dir, workers)
            row |= {"loader images/s": round(loader_ips, 1), "loader ratio": round(loader_ips / floor, 3)}
        rows.append(row)
    return pd.DataFrame(rows)


def _machine(device: str) -> str:
    """The machine in words: CPU model and count, and the GPU when one ran the benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} CPUs"
    if device.startswith("cuda"):
        text = f"{torch.cuda.get_device_name(torch.device(device))}; {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="harness bench train")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--scale", default="cpu")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", type=csv_list, default=None, help="comma-separated training methods (default: all)")
    p.add_argument("--loader-workers", type=int, default=default_workers(),
                   help="DataLoader workers of the per-image path (default min(4, CPUs)); -1 leaves it out")
    p.add_argument("--out", type=output_file, default=Path("leaderboards") / "bench-train.md")
    args = p.parse_args(argv)
    if args.loader_workers < -1:
        p.error(f"argument --loader-workers: expected -1 (no loader rows) or a number of workers, "
                f"got {args.loader_workers}")
    started = time.perf_counter()
    df = train_benchmarks(args.dataset, args.backbone, args.scale, args.steps, args.device,
                          args.methods, loader_workers=args.loader_workers)
    from harness.reporting.leaderboard import to_markdown

    device = resolve_device(args.device)
    table = to_markdown(df.set_index("method"))
    print(table)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    loader = ("" if args.loader_workers < 0 else
              f" loader images/s: the same step with the views made by the old per-image path instead, a "
              f"DataLoader with {args.loader_workers} worker processes running torchvision's transforms of the "
              "same preset on PIL images (harness/data/pil_augment.py), timed after its warm-up steps; loader ratio "
              f"= loader images/s / floor. The loader path runs in {1 + args.loader_workers} processes, the "
              "others in one: on cores shared with other work it gets a larger share of them, which favours it.")
    text = (f"# Training throughput ({args.dataset}, {args.backbone}, {args.scale} scale, {device}, "
            f"{torch.get_num_threads()} threads, {args.steps} timed steps)\n\n"
            f"Machine: {_machine(device)}. Run finished {date} after "
            f"{time.perf_counter() - started:.0f} s; load average at the end (1, 5, 15 min): {load} "
            "(other processes share the cores: compare ratios only between runs on an idle "
            "machine).\n\n"
            "images/s: full training step (indexing, on-device augmentation, forward, backward, "
            "optimiser, method bookkeeping), with the method's epoch-start hook (SeLa's relabelling) "
            "timed apart and spread over an epoch's steps. floor: bare backbone forward+backward on random "
            "tensors with the same views per image. ratio = images/s / floor." + loader + "\n\n"
            + table + "\n")
    write_text_atomic(args.out, text)  # a full disk or a kill leaves the old table, never half of one
    return 0
