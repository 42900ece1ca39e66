"""Rerun stored runs and say whether the numbers hold: bit-identical, within seed noise, or not.

On the machine, torch version and device that wrote a record a rerun is bit-identical (training is
seeded and deterministic), given torch's thread count of that run: a CPU sum split over another number of
threads rounds differently, so each rerun uses the thread count its record names. On another CPU, BLAS or
torch version float sums round differently, training drifts, and the honest claim is weaker: the rerun lies
within the spread of the stored runs over seeds.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from harness.data.datasets import SplitManifest
from harness.reporting.leaderboard import current_records, is_headline
from harness.execution.runner import Runner, plan

#: A rerun within this many standard deviations (over the stored seeds) of its stored value is seed noise.
SEED_NOISE_STDS = 2.0


def verdict(stored: float, rerun: float, seed_std: float, one_sample: float = 0.0) -> str:
    """``identical`` (bit-equal), ``within seed noise`` (|diff| <= 2 std over seeds), ``within one sample``
    (|diff| no more than one evaluated image changes an accuracy: ``one_sample``, the smallest difference
    there is, e.g. for a row whose seeds all score the same) or ``outside``."""
    if stored == rerun or (np.isnan(stored) and np.isnan(rerun)):
        return "identical"
    diff = abs(rerun - stored)
    if np.isfinite(seed_std) and diff <= SEED_NOISE_STDS * seed_std:
        return "within seed noise"
    if diff <= one_sample * (1 + 1e-9):  # c/n - (c-1)/n computed in floats can exceed 1/n by an ulp
        return "within one sample"
    return "outside"


def one_sample(metric: str, protocols: dict, manifest: SplitManifest) -> float:
    """How much one image changes headline ``metric`` (an accuracy, :func:`is_headline`): one over the size of
    the split it is scored on: the clustering protocol's ``split`` parameter, the test split for the others."""
    protocol = metric.split("/")[0]
    split = protocols.get(protocol, {}).get("split", "all") if protocol == "clustering" else "test"
    return 1.0 / len(manifest.split(split))


def reproduce(suite, results_dir: Path, data_dir: Path, runs: int = 1, device: str = "auto",
              log: Callable[[str], None] = print, **runner_options) -> pd.DataFrame:
    """Retrain the first ``runs`` stored runs of ``suite`` (plan order) in a scratch directory and compare
    each headline metric with its record; the seed spread is the std (ddof 1) of the same row's metric
    over the suite's stored seeds."""
    stored = {r["run_id"]: r for r in current_records(suite, results_dir)}
    jobs = [job for job in plan(suite) if job.run_id in stored and stored[job.run_id].get("status") == "ok"][:runs]
    rows = []
    with tempfile.TemporaryDirectory(prefix="reproduce-") as scratch:
        runner = Runner(Path(scratch), data_dir, device, log=log, **runner_options)
        for job in jobs:
            record = stored[job.run_id]
            with torch_threads(record.get("environment", {}).get("threads")):
                rerun = runner.run([job], force=True)[0]
            peers = [r for r in stored.values() if r.get("status") == "ok" and r["spec"]["dataset"] == job.dataset
                     and r["spec"]["label"] == job.entry.label and r["spec"]["budget"] == job.budget.as_dict()]
            manifest = runner.dataset(job.dataset, record["spec"]["val_fraction"])[1]
            compared = {("train", "final_loss"): _final_loss} | {
                (rep, metric): (lambda r, rep=rep, metric=metric: r["metrics"].get(rep, {}).get(metric))
                for rep, values in record["metrics"].items() for metric in sorted(values) if is_headline(metric)}
            for (rep, metric), read in compared.items():
                value, new = read(record), read(rerun)
                if value is None:
                    continue
                spread = [v for v in map(read, peers) if v is not None]
                std = float(np.std(spread, ddof=1)) if len(spread) > 1 else float("nan")
                new = float("nan") if new is None else new
                rows.append({"run": f"{job.entry.label}/{job.dataset}/s{job.seed}", "rep": rep, "metric": metric,
                             "stored": value, "rerun": new, "diff": new - value, "seed std": std,
                             "seeds": len(spread), "verdict": verdict(
                                 value, new, std, 0.0 if rep == "train" else
                                 one_sample(metric, record["spec"]["protocols"], manifest))})
    return pd.DataFrame(rows)


@contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` intra-op threads (None, or a value that is not a positive int: as is)."""
    before = torch.get_num_threads()
    if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _final_loss(record: dict) -> float | None:
    history = record.get("train", {}).get("history") or []
    return history[-1]["loss"] if history else None
