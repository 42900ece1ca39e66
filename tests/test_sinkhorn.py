"""The chunked log-domain Sinkhorn-Knopp solver against SeLa's plain loop and its constraints."""
from __future__ import annotations

import pytest
import torch

from methods.sinkhorn import sinkhorn_knopp


def official_loop(logits: torch.Tensor, lam: float, tol: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SeLa's cifar.py optimize_L_sk written plainly in float64: (labels, plan Q as N x K, iterations)."""
    P = torch.softmax(logits.double(), 1).T ** lam  # K x N
    K, N = P.shape
    r, c = torch.ones(K, 1, dtype=torch.float64) / K, torch.ones(N, 1, dtype=torch.float64) / N
    err, counter = 1e3, 0
    while err > tol:
        r = (1 / K) / (P @ c)
        c_new = (1 / N) / (r.T @ P).T
        if counter % 10 == 0:
            err = (c / c_new - 1).abs().sum().item()
        c = c_new
        counter += 1
    Q = P * c.T * r
    return Q.argmax(0), Q.T, counter


def plan(logits: torch.Tensor, lam: float, result) -> torch.Tensor:
    x = logits.double()
    return torch.exp(result.log_c[:, None] + lam * (x - x.amax(1, keepdim=True)) + result.log_r[None, :])


def test_marginals_are_uniform_and_labels_balanced():
    g = torch.Generator().manual_seed(0)
    n, k = 3000, 10
    # a strong prior for cluster 0: the plain argmax puts almost everything there
    logits = torch.randn(n, k, generator=g) + torch.tensor([4.0] + [0.0] * (k - 1))
    assert torch.bincount(logits.argmax(1), minlength=k).max() > 0.9 * n
    result = sinkhorn_knopp(logits, 10.0, tol=1e-6)
    q = plan(logits, 10.0, result)
    assert torch.allclose(q.sum(0), torch.full((k,), 1 / k, dtype=torch.float64), rtol=1e-9)
    assert (q.sum(1) * n - 1).abs().max() < 1e-5
    counts = torch.bincount(result.labels, minlength=k)
    assert counts.min() >= 0.9 * n / k and counts.max() <= 1.1 * n / k, counts


def test_matches_the_official_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 7, generator=g) * 2
    labels, q_ref, _ = official_loop(logits, 10.0, tol=1e-9)
    result = sinkhorn_knopp(logits, 10.0, tol=1e-9)
    assert torch.equal(result.labels, labels)
    assert torch.allclose(plan(logits, 10.0, result), q_ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("tol", [2.0, 1.0, 0.1, 1e-2])
def test_stops_where_the_official_loop_stops_with_its_plan(tol):
    """The official loop starts from the uniform c and updates r first: the solver makes the same iterates, so at
    any tolerance it stops at the same iteration with the same plan and labels. Catches a start from the uniform r
    (half an iteration off: at a loose tolerance, stopped after the first check, its labels differed on this
    48 x 4 problem) and ``>=`` for the official ``err > tol``."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(48, 4, generator=g) * 3
    labels, q_ref, iterations = official_loop(logits, 10.0, tol)
    result = sinkhorn_knopp(logits, 10.0, tol=tol, chunk_size=20)
    assert result.iterations == iterations
    assert torch.allclose(plan(logits, 10.0, result), q_ref, rtol=1e-9, atol=0)
    assert torch.equal(result.labels, labels)


def test_chunks_dtype_and_purity():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1001, 13, generator=g)
    before = logits.clone()
    whole = sinkhorn_knopp(logits, 10.0, tol=1e-8)
    chunked = sinkhorn_knopp(logits, 10.0, tol=1e-8, chunk_size=50)
    single = sinkhorn_knopp(logits, 10.0, tol=1e-3, dtype=torch.float32, chunk_size=100)
    assert torch.equal(logits, before)  # the input is not modified
    assert torch.equal(whole.labels, chunked.labels) and whole.iterations == chunked.iterations
    assert torch.allclose(whole.log_r, chunked.log_r, atol=1e-9)
    assert (single.labels == whole.labels).float().mean() > 0.99
    # the official stopping rule: checked every 10 iterations
    assert whole.error < 1e-8 and (whole.iterations - 1) % 10 == 0


def test_extreme_logits_stay_finite_and_balanced():
    """lambda = 25 (SeLa's ImageNet value) on sharp logits, and a cluster nobody likes (its
    column underflows to 0 until r has grown enough: no inf or NaN on the way)."""
    g = torch.Generator().manual_seed(3)
    n, k = 2000, 20
    logits = torch.randn(n, k, generator=g) * 3
    logits[:, 5] = -1000.0
    for dtype in (torch.float32, torch.float64):
        result = sinkhorn_knopp(logits, 25.0, tol=1e-1, dtype=dtype)
        assert torch.isfinite(result.log_r).all() and torch.isfinite(result.log_c).all()
        counts = torch.bincount(result.labels, minlength=k)
        assert counts.min() >= 0.8 * n / k and counts.max() <= 1.2 * n / k, (dtype, counts)
        assert result.error < 1e-1


def test_bench_sinkhorn_command_prints_and_appends_its_table(tmp_path):
    """``python -m harness bench sinkhorn`` (the command leaderboards/bench-sinkhorn.md names) times each size
    in a fresh process and appends the table under a heading to ``--out``."""
    import subprocess
    import sys

    out = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, "-m", "harness", "bench", "sinkhorn", "--sizes", "600,900", "--clusters",
                           "30", "--dtypes", "float32", "--max-iter", "20", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| 600") or
            line.startswith("| 900")]
    assert [r[0].strip() for r in rows] == ["600", "900"] and all(r[1].strip() == "30" for r in rows)
    assert "lambda=25.0" in out.read_text() and "| 600 |" in done.stdout
