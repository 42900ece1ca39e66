"""Sinkhorn-Knopp for equipartitioned pseudo-labels (SeLa, Asano et al., ICLR 2020, Sec. 3.1).

SeLa's labels solve  max_Q <Q, log P>  s.t. Q in U(r=1/K, c=1/N)  with an entropy term of
weight 1/lambda, whose solution is  Q = diag(r) P^lambda diag(c)  (Eq. 7-8; Cuturi 2013).
The solver runs at ImageNet scale (N = 1.28M, K = 3000) on one (N, K) logits matrix: it
never builds a second N x K matrix, only row chunks of it, on whatever device the logits live.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SinkhornResult:
    """``Q[n, k] = exp(log_c[n] + lam * (logits[n, k] - max_j logits[n, j]) + log_r[k])``, the plan."""

    labels: torch.Tensor  # (N,) argmax_k Q[n, k]
    log_r: torch.Tensor   # (K,) cluster scaling, float64
    log_c: torch.Tensor   # (N,) sample scaling, float64
    iterations: int
    error: float          # the last sum_n |c_n / c_new_n - 1|


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, lam: float, *, tol: float = 1e-2, check_every: int = 10,
                   max_iter: int = 1000, chunk_size: int | None = None,
                   dtype: torch.dtype = torch.float64) -> SinkhornResult:
    """Equipartitioned labels of ``logits`` (N, K) (or log-probabilities: rows may shift freely).

    SeLa's loop (``cifar.py``: from the uniform c, repeat r = (1/K) / (P c), c = (1/N) / (r^T P) with
    P = softmax(logits)^lambda, while sum |c / c_new - 1| > tol, checked every ``check_every``
    iterations), computed in the log domain: softmax(x)^lambda equals exp(lambda x) up to a per-sample
    factor, which c absorbs, so each iteration makes one pass over row chunks of
    exp(lambda x + log r - rowmax) (entries in [0, 1], no overflow at lambda = 25) that yields c and the
    column sums for the next r. A pass before the loop gives the first r from the uniform c, so the
    iterates, the stopping iteration and the labels are the official loop's. ``dtype`` is the chunks'
    precision (float32 halves time and memory, but its rounding puts a floor of roughly 1e-6 N under the
    error); vectors are float64.
    ``chunk_size`` defaults to about 4M elements per chunk on CPU and 128M on GPU.
    """
    n, k = logits.shape
    if chunk_size is None:
        chunk_size = max(1, (2**27 if logits.is_cuda else 2**22) // k)
    acc = dict(device=logits.device, dtype=torch.float64)
    row_max = logits.amax(1).to(dtype)  # exponents are lam * (x - row max) + log r: small, precise in float32
    log_r = torch.zeros(k, **acc)

    buffer = torch.empty(min(chunk_size, n), k, dtype=dtype, device=logits.device)  # reused: no page faults

    def exponents(start: int) -> torch.Tensor:
        x = buffer[:min(chunk_size, n - start)]
        x.copy_(logits[start:start + chunk_size]).sub_(row_max[start:start + chunk_size, None])  # no temporaries
        return torch.add(log_r.to(dtype), x, alpha=lam, out=x)

    # entries are floored at exp(cutoff) ~ K * tiny times their row's largest (1e-34 in float32):
    # no subnormal numbers (slow on CPUs), even after the matvec's division by row sums of up to K
    cutoff = math.log(torch.finfo(dtype).tiny) + math.log(k) + 1

    # SeLa's loop starts from the uniform c with P = softmax(logits)^lambda and updates r first. Here P's rows
    # are scaled by exp(-lambda * row max) instead of the softmax's normaliser, so that start is
    # c_n = (1/N) exp(-s_n), s_n = lambda (logsumexp_k x_nk - max_k x_nk), and the first r = (1/K) / (P c).
    # One pass, in place as the loop's: each chunk's column sums are weighted by exp(log c_n - the chunk's
    # largest log c) and carried in the log domain, so that no column's sum underflows to 0.
    log_c = torch.empty(n, **acc)
    log_col = torch.full((k,), -math.inf, **acc)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        x = buffer[:min(chunk_size, n - start)]
        x.copy_(logits[rows]).sub_(row_max[rows, None]).exp_()
        log_c[rows] = -math.log(n) - lam * x.sum(1).log().double()
        t = exponents(start).clamp_min_(cutoff).exp_()  # log_r is still 0
        top = log_c[rows].max()
        log_col = torch.logaddexp(log_col, (t.t() @ (log_c[rows] - top).exp().to(dtype)).double().log() + top)
    log_r = -math.log(k) - log_col

    iterations, error = 0, math.inf
    while iterations < max_iter:
        log_c_new = torch.empty(n, **acc)
        col = torch.zeros(k, **acc)  # column sums of the plan with rows rescaled to 1/N
        for start in range(0, n, chunk_size):
            t = exponents(start)
            t_max = t.amax(1, keepdim=True)
            t = t.sub_(t_max).clamp_min_(cutoff).exp_()
            t_sum = t.sum(1)
            col += (t.t() @ t_sum.reciprocal()).double()
            log_c_new[start:start + chunk_size] = -math.log(n) - (t_max.squeeze(1) + t_sum.log()).double()
        if iterations % check_every == 0:
            error = (log_c - log_c_new).exp().sub_(1).abs_().sum().item()
        log_c = log_c_new
        iterations += 1
        if error <= tol or iterations == max_iter:  # SeLa's `while err > tol`; r stays the one that made c
            break
        # r <- (1/K) / (P^T c) from this c, as col = N r (P^T c): a column with little mass grows until it gets its share
        log_r -= math.log(k) + (col / n).log()
    labels = torch.cat([exponents(s).argmax(1) for s in range(0, n, chunk_size)])
    return SinkhornResult(labels, log_r, log_c, iterations, error)
