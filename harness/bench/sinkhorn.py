"""Sinkhorn-Knopp benchmark at SeLa's scale: seconds per iteration and peak memory of the solver.

``python -m harness bench sinkhorn`` times :func:`methods.sinkhorn.sinkhorn_knopp` on synthetic
logits of N samples x K clusters (a random linear head on random 128-d features, the shape of
SeLa's logits) for each N and chunk precision, each in a fresh process, and prints a table
(``--out`` appends it to a markdown file such as ``leaderboards/bench-sinkhorn.md``). Peak memory
is the process's peak resident set on CPU (GPU max allocated on CUDA), next to its part above
the logits: what the solver itself adds.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import pandas as pd
import torch

from harness.execution.environment import resolve_device
from harness.engine.train import _peak_rss_mb, _reset_peak_rss
from methods.sinkhorn import sinkhorn_knopp
from harness.errors import UsageError, choices_error
from harness.execution.validate import UsageParser, csv_list, output_file, positive_int, positive_ints, positive_number

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def synthetic_logits(n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0, dim: int = 128,
                     chunk: int = 65536) -> torch.Tensor:
    """(n, k) logits of a random linear head on random features, filled in row chunks (one n x k matrix)."""
    g = torch.Generator(device=device).manual_seed(seed)
    head = torch.randn(dim, k, generator=g, device=device) / dim ** 0.5
    out = torch.empty(n, k, dtype=dtype, device=device)
    for s in range(0, n, chunk):
        out[s:s + chunk] = torch.randn(min(chunk, n - s), dim, generator=g, device=device) @ head
    return out


def _memory_mb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _peak_rss_mb()


def _reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()


def run_one(n: int, k: int, dtype: str, input_dtype: str, lam: float, tol: float, max_iter: int,
            device: str) -> dict:
    """One timed solve on fresh logits (run in a fresh process, so peak memory is this solve's)."""
    logits = synthetic_logits(n, k, DTYPES[input_dtype], device)
    _reset_memory(device)
    base = _memory_mb(device)  # the logits (and the interpreter on CPU)
    start = time.perf_counter()
    result = sinkhorn_knopp(logits, lam, tol=tol, max_iter=max_iter, dtype=DTYPES[dtype])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _memory_mb(device)
    counts = torch.bincount(result.labels, minlength=k)
    return {"N": n, "K": k, "logits": input_dtype, "chunks": dtype,
            "logits GB": round(logits.numel() * logits.element_size() / 1e9, 2),
            "iterations": result.iterations, "error": f"{result.error:.3g}", "converged": result.error < tol,
            "seconds": round(seconds, 3), "s/iteration": round(seconds / result.iterations, 4),
            "peak MB": round(peak), "solver MB": round(peak - base),
            "labels per cluster min/max": f"{int(counts.min())}/{int(counts.max())} (N/K={n / k:.0f})"}


def check_fits(sizes: list[int], k: int, input_dtype: str, device: str) -> None:
    """Each N x K logit matrix fits in the device's memory: a size that cannot is one line before anything is
    timed, not an allocation failure in the worker."""
    if torch.device(device).type == "cuda":
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    itemsize = torch.empty(0, dtype=DTYPES[input_dtype]).element_size()
    for n in sizes:
        if n * k * itemsize > total:
            raise UsageError(f"N={n} x K={k} logits need {n * k * itemsize / 2 ** 30:.3g} GiB of {input_dtype}, more "
                             f"than the {total / 2 ** 30:.3g} GiB of memory on {device}; give smaller --sizes or --clusters")


def bench(sizes: list[int], k: int, dtypes: list[str], input_dtype: str, lam: float, tol: float,
          max_iter: int, device: str) -> pd.DataFrame:
    rows = []
    for n in sizes:
        for dtype in dtypes:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                rows.append(pool.submit(run_one, n, k, dtype, input_dtype, lam, tol, max_iter, device).result())
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="python -m harness bench sinkhorn")
    p.add_argument("--sizes", type=positive_ints, default=[50000, 200000, 1281167], help="comma-separated N")
    p.add_argument("--clusters", type=positive_int, default=3000, help="K")
    p.add_argument("--dtypes", type=csv_list, default=["float32", "float64"], help="chunk precisions")
    p.add_argument("--input-dtype", default="float32", choices=sorted(DTYPES), help="storage of the logits")
    p.add_argument("--lam", type=positive_number, default=25.0)
    p.add_argument("--tol", type=positive_number, default=1e-1)
    p.add_argument("--max-iter", type=positive_int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=output_file, default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if set(args.dtypes) - set(DTYPES):
        raise choices_error("chunk precision", sorted(set(args.dtypes) - set(DTYPES))[0], DTYPES)
    device = resolve_device(args.device)
    check_fits(args.sizes, args.clusters, args.input_dtype, device)
    df = bench(args.sizes, args.clusters, args.dtypes, args.input_dtype,
               args.lam, args.tol, args.max_iter, device)
    from harness.reporting.leaderboard import to_markdown

    table = to_markdown(df.set_index("N"))
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(f"\n## {device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
                    f"lambda={args.lam}, tol={args.tol}, max_iter={args.max_iter}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
