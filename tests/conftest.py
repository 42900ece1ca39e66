"""Shared test fixtures: run a small suite on bundled digits into a temporary results dir."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_suite(methods: list[Any], *, seeds=(0,), budget: Any = "epochs=2",
               protocols: dict | None = None, name: str = "test", scale: str = "cpu", **extra):
    """A validated Suite on digits (methods are names or method-entry mappings)."""
    from harness.execution.suite import parse_suite

    data = {"name": name, "scale": scale, "datasets": ["digits"], "methods": list(methods),
            "seeds": list(seeds), "budget": budget,
            "protocols": protocols if protocols is not None else {"knn": {"k": 20}}, **extra}
    return parse_suite(data, name)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on shared, oversubscribed cores OpenMP's spinning threads make
    small CPU runs several times slower (and pool workers get one thread each anyway)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run_suite(tmp_path: Path):
    """``run_suite(methods, seeds=..., budget=..., protocols=...) -> list of records`` on digits."""
    from harness.execution.runner import Runner, plan

    def run(methods, **kw):
        suite = make_suite(methods, **kw)
        runner = Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None)
        return runner.run(plan(suite))

    return run


def metric(records, method: str, key: str, rep: str = "backbone") -> list[float]:
    """The values of ``key`` for ``method``'s records, in seed order."""
    rows = sorted((r for r in records if r["spec"]["label"] == method), key=lambda r: r["spec"]["seed"])
    return [r["metrics"][rep][key] for r in rows]


#: kNN top-1 may differ by two of digits' 359 test images between runs that train the same weights up to
#: float reduction order (one process against two data-parallel ranks); a shard or a wrong model is far more.
KNN_SAME_WEIGHTS_TOLERANCE = 2 / 359


def trained_weights(results_dir: Path, suite: str, run_id: str) -> dict[str, Any]:
    """The model state of a stored run's final checkpoint."""
    import torch

    from harness.execution.store import ResultStore

    path = ResultStore(results_dir, suite).checkpoint_path(run_id)
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def initial_weights(results_dir: Path, data_dir: Path, record: dict) -> dict[str, Any]:
    """The freshly seeded adapter of ``record``'s run, as the runner builds it before training."""
    from harness.execution.runner import Job, Runner
    from harness.execution.suite import MethodEntry

    spec = record["spec"]
    runner = Runner(results_dir, data_dir, device="cpu", quiet=True)
    job = Job(record["suite"], spec["dataset"], MethodEntry(spec["method"], spec["label"], spec["config"], {}),
              spec["seed"], None, spec)
    method, _, _ = runner.build(job, *runner.dataset(spec["dataset"], spec["val_fraction"]))
    return method.state_dict()


def assert_trained_alike(ref: dict, other: dict, initial: dict, what: str) -> None:
    """``other`` holds the weights of ``ref`` up to float reduction order: each tensor at most 1% of
    how far training moved it (plus 1e-6) apart; integer buffers equal; and training moved the backbone.

    One process against two data-parallel ranks: the runs differ by a small fraction of what training
    changed (Adam amplifies it where gradients are near zero: CC's cluster head ends 1.6e-3 apart),
    never by a share of it (CC without its gathers: 4e-2 and more).
    """
    import torch

    assert ref.keys() == other.keys(), what
    for key, value in ref.items():
        if "key_encoder" in key and ("running_" in key or "num_batches" in key):
            continue  # MoCo's key encoder BN statistics are per group on each rank (never evaluated)
        if not value.is_floating_point():
            assert torch.equal(other[key], value), f"{what} {key}"
            continue
        assert torch.equal(value.isnan(), other[key].isnan()), f"{what} {key}"  # e.g. NPID's unused NCE constant
        value, second, start = (torch.nan_to_num(t.float()) for t in (value, other[key], initial[key]))
        moved, apart = float((value - start).norm()), float((second - value).norm())
        assert apart <= 1e-2 * moved + 1e-6, f"{what} {key}: runs {apart:.2e} apart, training moved it {moved:.2e}"
    assert max(float((ref[k] - v).norm()) for k, v in initial.items()  # training did move the backbone
               if k.startswith("backbone.") and v.is_floating_point()) > 1e-2, what


def torch_lrs(scheduler_factory, epochs: int, base_lr: float) -> list[float]:
    """The lr in force during each epoch 0..epochs of a torch scheduler stepped once per epoch (the
    independent answer the harness's schedules are checked against)."""
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = scheduler_factory(optimizer)
    lrs = []
    for _ in range(epochs + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def image_tree(root: Path, train: int = 12, test: int = 4, size: int = 8) -> Path:
    """``root/train/{a,b}/*.png``, ``root/test/{a,b}/*.png`` of random ``size``-pixel images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root
