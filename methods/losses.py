"""Losses shared by several methods (lightly-style small functions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2n views (SimCLR, Chen et al. 2020, Eq. 1; CC's instance loss).

    Row i of ``z1`` and row i of ``z2`` are positives; the other 2n-2 rows are negatives.
    Similarity is cosine. Returns the mean over all 2n anchors.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """InfoNCE with an explicit negative set (MoCo, He et al. 2020, Eq. 1).

    ``query``, ``positive``: (n, d) L2-normalised; ``negatives``: (m, d) L2-normalised.
    logits = [q.k+, q.K-^T] / T with the positive at index 0.
    """
    pos = (query * positive).sum(1, keepdim=True)
    neg = query @ negatives.t()
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def entropy(p: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Shannon entropy (nats) of probability vectors along ``dim``."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim)
