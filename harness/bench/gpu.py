"""GPU benchmark at paper scale: one command, one table (``python -m harness bench gpu``).

Rows, on one GPU (CUDA when there is one):

* every training method at its paper configuration (``scale: paper``) with ResNet-18 (CIFAR
  stem) on 50,000 CIFAR-sized uint8 images, 32 px, bf16 autocast and channels-last as
  ``harness run`` trains on CUDA, with torch's deterministic algorithms as suites do by default (SimCLR
  also with ``--compile``, backbone and augmentation; and with ``deterministic: false``; and, after all
  other rows, with the backbone, then the whole training step, compiled in mode ``reduce-overhead``, which
  replays them as CUDA graphs (no CLI option yet: what graphs would gain)): images/s of the full training
  step (:func:`harness.bench.train.method_images_per_second`) against the bare backbone's bf16
  forward+backward at the same batch and views (:func:`harness.bench.train.floor_images_per_second`),
  their ratio, peak memory, and where a step's time goes: backbone (the floor), on-device
  augmentation of the step's views (timed alone), the epoch-start hook spread over an epoch, and
  the rest (method heads and losses, memory-bank/queue updates, optimiser, Python and the loop's
  per-step sync); and what limits the step, from a few steps under ``torch.profiler``
  (:mod:`harness.bench.profile`): the GPU, or a host that waits or launches too slowly;
* weighted kNN (``protocols.knn``, torch backend) of 10,000 queries against 50,000 x 512
  training features at k=200, against the bare float32 similarity matmul of the same shapes;
* Sinkhorn-Knopp (``methods.sinkhorn``) on N = 1,281,167 x K = 3,000 logits (SeLa's ImageNet
  scale): seconds per iteration and memory (:func:`harness.bench.sinkhorn.bench`, a fresh process);
* the clustering protocol's k-means (``protocols.clustering.kmeans``, torch backend) on
  100,000 x 128, k = 1,000, 25 iterations from one random initialisation, against 25 bare assignment
  matmuls.

The images are uniform random pixels with random labels: the work per step (augmentation,
network, losses, banks of N entries) does not depend on the content. Everything is budgeted by
steps and iterations (about 5 minutes on one H200). ``--smoke`` runs every row at tiny sizes
(64 images of 8 px, small CNN, CPU-scale configs, no ``--compile`` row: inductor's C++ build takes
minutes on a CPU) on whatever device there is, and writes its table to a temporary file unless ``--out``
says otherwise.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pandas as pd
import torch

from harness.bench.profile import GPU_BOUND, profile_training
from harness.bench.sinkhorn import bench as sinkhorn_bench
from harness.bench.train import (_machine, _sync, bench_augmenter, floor_images_per_second,
                                 method_images_per_second)
from harness.data.datasets import CIFAR10_CLASSES, CIFAR10_FINE_TO_COARSE, CIFAR_MEAN_STD, ImageData
from harness.execution.environment import resolve_device
from harness.errors import choices_error
from harness.execution.store import write_atomic
from methods import METHODS, resolve_config
from protocols.clustering import kmeans
from protocols.knn import knn_accuracy
from harness.execution.validate import UsageParser, csv_list, output_file

#: Sizes of the paper-scale run and of the smoke run (``--smoke``).
PAPER = dict(images=50_000, side=32, backbone="resnet18_cifar", scale="paper", steps=50, augment_steps=20,
             compile=True, knn=(50_000, 10_000, 512, 200), sinkhorn=(1_281_167, 3_000), sinkhorn_iters=10,
             kmeans=(100_000, 128, 1_000))
SMOKE = dict(images=64, side=8, backbone="small_cnn", scale="cpu", steps=1, augment_steps=1,
             compile=False, knn=(2_000, 500, 64, 20), sinkhorn=(5_000, 50), sinkhorn_iters=3, kmeans=(2_000, 16, 20))
KMEANS_ITERS = 25
COMPILED = ("simclr",)  # methods also timed with --compile, and without the deterministic mode


class Variant(NamedTuple):
    """How a method row trains: ``compile_backbone`` as train() takes it (True, or a ``torch.compile`` mode),
    ``compile_step`` a mode for the whole training step (:func:`harness.bench.train.bench_method`)."""

    suffix: str = ""
    compile_backbone: bool | str = False
    deterministic: bool = True
    compile_step: str | None = None


#: As a suite trains by default; the variants timed for :data:`COMPILED`; and :data:`CUDA_GRAPHS`, which come
#: after every other row (a slow compilation then costs only its own row when the device call's time runs out).
DEFAULT = Variant()
VARIANTS = (Variant(" --compile", compile_backbone=True), Variant(" (deterministic: false)", deterministic=False))
CUDA_GRAPHS = (Variant(" --compile + CUDA graphs", compile_backbone="reduce-overhead"),
               Variant(" compiled step + CUDA graphs", compile_step="reduce-overhead"))
COLUMNS = ("benchmark", "size", "rate", "unit", "floor", "ratio", "peak MB", "time split", "limit")


def synthetic_cifar(n: int, side: int = 32, seed: int = 0) -> ImageData:
    """``n`` training images of uint8 noise, (n, 3, side, side), random CIFAR-10 labels and
    their coarse labels (vehicles vs animals), CIFAR's normalisation."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g).numpy()
    return ImageData("cifar10-synthetic", torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g),
                     labels, CIFAR10_FINE_TO_COARSE[labels], np.ones(n, dtype=bool), CIFAR10_CLASSES, *CIFAR_MEAN_STD)


def best_seconds(fn: Callable[[], Any], device: str, repeats: int = 3) -> tuple[float, Any]:
    """The shortest of ``repeats`` synchronised runs of ``fn()`` after one warm-up run, and its result."""
    out, best = fn(), math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def augment_seconds_per_step(data: ImageData, cfg: dict, device: str, steps: int, compiled: bool = False) -> float:
    """Seconds of one training step's augmentation alone: gather a batch, make ``views`` views (``compiled``:
    under ``torch.compile``, as ``--compile`` trains)."""
    images = data.images.to(device)
    batch = min(cfg["batch_size"], len(images))
    augmenter = bench_augmenter(data, cfg)
    if compiled:
        augmenter.compile()
    generator, order = torch.Generator().manual_seed(0), torch.randperm(len(images), device=device)

    def run() -> None:
        for step in range(steps):
            raw = images[order.roll(step * batch)[:batch]]
            for _ in range(cfg["views"]):
                augmenter(raw, generator, None, batch)

    return best_seconds(run, device, repeats=2)[0] / steps


def _split(step_ms: float, parts: dict[str, float]) -> str:
    """'backbone 61% (8.1 ms), ...' of a step, largest share first: what limits the method."""
    parts = {**parts, "rest": step_ms - sum(parts.values())}
    return ", ".join(f"{name} {ms / step_ms:.0%} ({ms:.2f} ms)"
                     for name, ms in sorted(parts.items(), key=lambda kv: -kv[1]))


def method_rows(data: ImageData, name: str, size: dict, device: str, log: Callable[[str], None] = print,
                variants: tuple | None = None) -> list[dict]:
    """The method's rows at ``size``'s scale and backbone: ``variants`` (:class:`Variant`), by default trained
    as ``harness run`` trains a suite (``deterministic: true``) and, for :data:`COMPILED`, also with
    ``--compile`` (not at smoke sizes) and with ``deterministic: false``.
    Each row's steps are also profiled (:func:`harness.bench.profile.profile_training`): its ``limit`` cell,
    and the operators taking the most time in ``log``."""
    cfg = resolve_config(METHODS.get(name), size["scale"])
    if variants is None:
        variants = (DEFAULT,)
        if name in COMPILED:
            variants += tuple(v for v in VARIANTS if not v.compile_backbone or size["compile"])
    rows, floor, augment_ms = [], None, {}

    def limit(variant: Variant, step_ms: float) -> str:
        try:
            profiled = profile_training(name, data, size["backbone"], size["scale"], device,
                                        deterministic=variant.deterministic,
                                        compile_backbone=variant.compile_backbone, compile_step=variant.compile_step)
        except Exception as exc:  # noqa: BLE001 -- the row's timings stand without its profile
            traceback.print_exc()
            return f"profile failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
        cell = profiled.describe(step_ms)
        log(f"{name}{variant.suffix}: {cell}\n{profiled.top}")
        return cell

    for variant in variants:
        def row() -> dict:
            nonlocal floor
            compiled = bool(variant.compile_backbone or variant.compile_step)  # either compiles the augmentation
            if compiled not in augment_ms:
                augment_ms[compiled] = augment_seconds_per_step(data, cfg, device, size["augment_steps"],
                                                                compiled) * 1e3
            ips, batch, views, peak, hook_s = method_images_per_second(
                name, data, size["backbone"], size["scale"], device, size["steps"], Path("."),
                compile_backbone=variant.compile_backbone, deterministic=variant.deterministic,
                compile_step=variant.compile_step)
            if floor is None:
                floor = floor_images_per_second(size["backbone"], data.image_shape, batch, views, device, size["steps"])
            step_ms = batch / ips * 1e3
            parts = {"backbone": batch / floor * 1e3, "augment": augment_ms[compiled]}
            if hook_s * 1e3 >= 0.005:  # listed where the split's two decimals of ms show it
                parts["epoch hook"] = hook_s * 1e3
            return {"benchmark": name + variant.suffix,
                    "size": f"batch {batch} x {views} views, {data.image_shape[-1]} px, {size['backbone']}",
                    "rate": ips, "unit": "images/s", "floor": floor, "ratio": ips / floor, "peak MB": peak,
                    "time split": _split(step_ms, parts),
                    "limit": limit(variant, step_ms - parts.get("epoch hook", 0.0))}

        rows += attempt(name + variant.suffix, lambda: [row()], device)
    return rows


def attempt(name: str, benchmark: Callable[[], list[dict]], device: str) -> list[dict]:
    """The rows of ``benchmark()``, or one row saying how it failed (its traceback goes to stderr), so that one
    failure on a lent GPU costs its row, not the rest of the table."""
    try:
        return benchmark()
    except Exception as exc:  # noqa: BLE001 -- any failure is a result to report, not a reason to stop
        traceback.print_exc()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # an out-of-memory row leaves the next rows their memory
        message = (str(exc).strip().splitlines() or [""])[0][:200]
        return [{"benchmark": name, "size": "", "rate": math.nan, "unit": "", "floor": math.nan, "ratio": math.nan,
                 "peak MB": math.nan, "time split": f"failed: {type(exc).__name__}: {message}", "limit": ""}]


def _gaussian_features(rng: np.random.Generator, n: int, dim: int, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(means), n)
    return (means[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def knn_row(n_train: int, n_query: int, dim: int, k: int, device: str) -> dict:
    """Weighted kNN (torch backend, features handed over as numpy as the protocol gets them) vs the bare matmul."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(100, dim)) * 0.5
    (train_x, train_y), (test_x, test_y) = (_gaussian_features(rng, n, dim, means) for n in (n_train, n_query))
    a, b = torch.from_numpy(test_x).to(device), torch.from_numpy(train_x).to(device)
    floor_s, _ = best_seconds(lambda: a @ b.T, device)
    s, acc = best_seconds(lambda: knn_accuracy(train_x, train_y, test_x, test_y, k=k, backend="torch",
                                               device=device), device)
    return {"benchmark": "knn torch", "size": f"{n_train} train x {n_query} queries x {dim}, k={k}",
            "rate": s, "unit": "s", "floor": floor_s, "ratio": floor_s / s, "peak MB": math.nan,
            "time split": f"floor: the {n_query} x {n_train} float32 similarity matmul; top-1 {acc['top1']:.3f}"}


def sinkhorn_rows(n: int, k: int, iterations: int, device: str) -> list[dict]:
    """Sinkhorn-Knopp on float32 logits, SeLa's lambda 25, with float64 chunks (the solver's default, what
    SeLa runs) and float32 chunks (half the time and memory), each in a fresh process."""
    df = sinkhorn_bench([n], k, ["float64", "float32"], "float32", lam=25.0, tol=1e-1, max_iter=iterations,
                        device=device)
    return [{"benchmark": f"sinkhorn {r['chunks']} chunks", "size": f"N={n} x K={k}, {r['logits GB']} GB logits",
             "rate": r["s/iteration"], "unit": "s/iteration", "floor": math.nan, "ratio": math.nan,
             "peak MB": r["peak MB"], "time split": f"{r['iterations']} iterations; solver MB {r['solver MB']}"}
            for r in df.to_dict("records")]


def kmeans_row(n: int, dim: int, k: int, device: str) -> dict:
    """The clustering protocol's k-means, one random initialisation and 25 iterations (as ``bench protocols``
    times it), vs 25 assignment matmuls."""
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    a = torch.from_numpy(x).to(device)
    c = a[:k].clone()
    floor_s, _ = best_seconds(lambda: [a @ c.T for _ in range(KMEANS_ITERS)], device)
    s, _ = best_seconds(lambda: kmeans(x, k, seed=0, init="random", n_init=1, max_iter=KMEANS_ITERS, tol=0.0,
                                       backend="torch", device=device), device, repeats=2)
    return {"benchmark": "kmeans torch", "size": f"{n} x {dim}, k={k}, {KMEANS_ITERS} iterations, 1 random init",
            "rate": s, "unit": "s", "floor": floor_s, "ratio": floor_s / s, "peak MB": math.nan,
            "time split": f"floor: {KMEANS_ITERS} float32 assignment matmuls"}


def gpu_benchmarks(smoke: bool, device: str, methods: list[str] | None = None,
                   log: Callable[[str], None] = print,
                   on_rows: Callable[[pd.DataFrame], None] = lambda table: None) -> pd.DataFrame:
    """The table: method rows (``methods``: default every training method), then kNN, Sinkhorn, k-means, then
    the CUDA-graph rows.
    ``on_rows`` gets the table so far after each benchmark, so that a run cut short keeps what it measured."""
    size = SMOKE if smoke else PAPER
    trained = [n for n in METHODS.names() if METHODS.get(n).trains]
    for name in methods or ():
        if name not in trained:
            raise choices_error("training method", name, trained)
    data = synthetic_cifar(size["images"], size["side"])
    benchmarks = [partial(method_rows, data, name, size, device, log) for name in methods or trained]
    benchmarks += [lambda: attempt("knn torch", lambda: [knn_row(*size["knn"], device)], device),
                   lambda: attempt("sinkhorn", lambda: sinkhorn_rows(*size["sinkhorn"], size["sinkhorn_iters"], device),
                                   device),
                   lambda: attempt("kmeans torch", lambda: [kmeans_row(*size["kmeans"], device)], device)]
    benchmarks += [partial(method_rows, data, name, size, device, log, CUDA_GRAPHS)
                   for name in methods or trained if name in COMPILED and size["compile"]]
    rows = []
    for benchmark in benchmarks:
        rows += benchmark()
        last = rows[-1]
        log(f"{last['benchmark']}: " + (last["time split"] if math.isnan(last["rate"]) else
                                        f"{last['rate']:.4g} {last['unit']}, ratio {last['ratio']:.2f}"))
        on_rows(pd.DataFrame(rows, columns=list(COLUMNS)))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def to_markdown(df: pd.DataFrame) -> str:
    """3 significant digits (whole numbers above 1,000), blanks for what does not apply."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="harness bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device, in seconds (a test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", type=csv_list, default=None, help="comma-separated training methods (default: all)")
    p.add_argument("--out", type=output_file, default=None,
                   help="markdown table (default leaderboards/bench-gpu.md; with --smoke a temporary file); "
                        "rewritten after each benchmark, so a run cut short keeps the rows it finished")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-gpu-")) / "bench-gpu.md" if args.smoke
                       else Path("leaderboards") / "bench-gpu.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    size = SMOKE if args.smoke else PAPER
    precision = "bf16 autocast, channels-last" if device.startswith("cuda") else "float32"

    def write(table: pd.DataFrame, finished: bool) -> None:
        when = (f"Finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} after" if finished else
                f"Unfinished: {len(table)} rows by {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC},")
        text = (
            f"# GPU benchmark{' (smoke sizes)' if args.smoke else ''}: {device}, torch {torch.__version__}\n\n"
            f"Machine: {_machine(device)}. {when} {time.perf_counter() - started:.0f} s. Training rows: "
            f"{size['scale']}-scale configs, {size['backbone']}, {size['images']:,} random uint8 images of "
            f"{size['side']} px, {precision}, {size['steps']} timed steps after a 2-step warm-up run (which also "
            "pays for --compile), with torch's deterministic algorithms as `harness run` trains a suite by default "
            "(`deterministic: true`; the row '(deterministic: false)' shows what that mode costs). '--compile + "
            "CUDA graphs': the backbone compiled in torch.compile's mode reduce-overhead, which replays it as CUDA "
            "graphs; 'compiled step + CUDA graphs': the same for the whole training step (the adapter's forward: "
            "backbone, heads, loss) with the augmentation compiled too (neither is a `harness run` option yet; "
            "the rows measure what graphs would gain).\n\n"
            "rate: images/s of the full training step (batch indexing, on-device augmentation, forward, backward, "
            "optimiser, method bookkeeping), or seconds. floor: the bare backbone's forward+backward images/s at "
            "the same batch and views, fastest algorithms allowed (training rows), or the seconds of the bare "
            "matmuls the protocol cannot avoid. ratio: the share of the floor's speed reached (rate / floor for "
            "images/s, floor / rate for seconds; 1.0 = no overhead; goal >= 0.9). peak MB: CUDA max allocated "
            "(process peak RSS on CPU). time split: a training step's time as backbone (the floor), augmentation "
            "of its views (timed alone), the method's epoch-start hook spread over an epoch's steps (SeLa's "
            "relabelling pass: features of all images + Sinkhorn; timed apart, also in the rate) and the rest "
            "(method heads, losses, bank/queue updates, optimiser, Python, the loop's per-step loss sync). "
            "limit: 5 steps of the same training under torch.profiler (harness/bench/profile.py): GPU-bound when "
            f"the GPU is busy (kernels, copies, memsets) for >= {GPU_BOUND:.0%} of the step's time measured "
            "without the profiler (epoch hook left out), else host-bound (the host waits for the device at a "
            "synchronising call, or cannot launch the step's kernels as fast as the GPU runs them). "
            "bench-gpu.log holds each row's operators taking the most time.\n\n" + to_markdown(table) + "\n")
        write_atomic(out, lambda f: f.write(text))

    df = gpu_benchmarks(args.smoke, device, args.methods,
                        on_rows=lambda table: write(table, finished=False))
    write(df, finished=True)
    print(to_markdown(df))
    print(f"\nwritten: {out}")
    failed = df["time split"].str.startswith("failed: ")
    if failed.any():
        print(f"{failed.sum()} of {len(df)} benchmarks failed: {', '.join(df['benchmark'][failed])} "
              "(their tracebacks are above)", file=sys.stderr)
    return 1 if failed.any() else 0


if __name__ == "__main__":
    raise SystemExit(main())
