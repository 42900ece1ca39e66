"""Training-throughput benchmark: each method's full training step against the bare backbone.

``python -m harness bench train`` prints, per method, images per second of the full step (data
indexing, on-device augmentation, forward, backward, optimiser, method bookkeeping) and of the
floor: the bare backbone's forward and backward on random tensors already on the device, for the
same number of views per image. The ratio full / floor is the share of time spent on the model
itself (1.0 = no overhead). Peak memory is recorded alongside.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch

from harness.augment import Augmenter, get_preset
from harness.backbones import create_backbone
from harness.budget import Budget
from harness.data import load_dataset
from harness.environment import resolve_device
from harness.seeding import seed_everything
from harness.train import _peak_rss_mb, _reset_peak_rss, train
from methods import METHODS, DataInfo, create_method, resolve_config


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def floor_images_per_second(backbone_name: str, shape: tuple[int, int, int], batch: int, views: int,
                            device: str, steps: int) -> float:
    """Source images per second of bare backbone forward+backward on ``views`` random views per image."""
    net = create_backbone(backbone_name, shape[0]).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    x = torch.randn(batch * views, *shape, device=device)
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


def method_images_per_second(name: str, dataset: str, backbone_name: str, scale: str, device: str, steps: int,
                             data_dir: Path) -> tuple[float, int, int, float]:
    """(images/s of the full training step, batch size, views, peak MB) for ``name``."""
    data = load_dataset(dataset, data_dir)
    cls = METHODS.get(name)
    cfg = resolve_config(cls, scale)
    images = data.images[torch.from_numpy(data.is_train)].to(device)
    labels = torch.as_tensor(data.labels[data.is_train] if cls.label_level != "coarse"
                             else data.coarse_labels[data.is_train]).to(device)
    info = DataInfo(len(images), data.image_shape,
                    data.num_classes if cls.label_level == "fine" else data.num_coarse if cls.label_level else None)
    augmenter = Augmenter(get_preset(cfg["augment"], **cfg["augment_overrides"]), data.mean, data.std)
    results = []
    for budget in (Budget("steps", 2), Budget("steps", steps)):  # the first run is warm-up
        generator = seed_everything(0, deterministic=False)
        method = create_method(name, create_backbone(backbone_name, data.image_shape[0]), cfg, info)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _reset_peak_rss()
        result = train(method, images, labels, budget, augmenter, cfg, device=device, seed=0,
                       generator=generator, quiet=True)
        results.append(result)
    last = results[-1]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _peak_rss_mb()
    return last.usage.samples / last.usage.seconds, min(cfg["batch_size"], len(images)), cfg["views"], peak


def train_benchmarks(dataset: str = "digits", backbone: str = "small_cnn", scale: str = "cpu", steps: int = 20,
                     device: str = "auto", methods: list[str] | None = None,
                     data_dir: Path = Path.home() / ".cache" / "ssl-harness" / "data") -> pd.DataFrame:
    device = resolve_device(device)
    rows = []
    for name in methods or METHODS.names():
        cls = METHODS.get(name)
        if not cls.trains:
            continue
        ips, batch, views, peak = method_images_per_second(name, dataset, backbone, scale, device, steps, data_dir)
        data = load_dataset(dataset, data_dir)
        floor = floor_images_per_second(backbone, data.image_shape, batch, views, device, steps)
        rows.append({"method": name, "batch": batch, "views": views, "images/s": round(ips, 1),
                     "floor images/s": round(floor, 1), "ratio": round(ips / floor, 3), "peak MB": round(peak)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness bench train")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--scale", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", default=None)
    p.add_argument("--out", type=Path, default=Path("leaderboards") / "bench-train.md")
    args = p.parse_args(argv)
    df = train_benchmarks(args.dataset, args.backbone, args.scale, args.steps, args.device,
                          args.methods.split(",") if args.methods else None)
    from harness.leaderboard import to_markdown

    device = resolve_device(args.device)
    table = to_markdown(df.set_index("method"))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    args.out.write_text(f"# Training throughput ({args.dataset}, {args.backbone}, {args.scale} scale, {device}, "
                        f"{torch.get_num_threads()} threads, {args.steps} timed steps)\n\n"
                        f"Load average at the end of the run: {load} (other processes share the cores: "
                        "compare ratios only between runs on an idle machine).\n\n"
                        "images/s: full training step (indexing, on-device augmentation, forward, backward, "
                        "optimiser, method bookkeeping). floor: bare backbone forward+backward on random "
                        "tensors with the same views per image. ratio = images/s / floor.\n\n" + table + "\n")
    return 0
