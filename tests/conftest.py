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
    from harness.suite import parse_suite

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
    from harness.runner import Runner, plan

    def run(methods, **kw):
        suite = make_suite(methods, **kw)
        runner = Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None)
        return runner.run(plan(suite))

    return run


def metric(records, method: str, key: str, rep: str = "backbone") -> list[float]:
    """The values of ``key`` for ``method``'s records, in seed order."""
    rows = sorted((r for r in records if r["spec"]["label"] == method), key=lambda r: r["spec"]["seed"])
    return [r["metrics"][rep][key] for r in rows]
