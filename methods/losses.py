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
    target = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # n..2n-1, then 0..n-1
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


#: Similarities of the coarse-label losses: ``cosine`` as the paper writes it; ``official`` as
#: HazyResearch/thanos-code computes it (unagi/tasks/loss_fns/contrastive_loss.py, ``lc_norm``).
THANOS_SIMILARITIES = ("official", "cosine")


def thanos_similarity(anchors: torch.Tensor, candidates: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """Similarity matrix of anchors (n, d) and candidates (n, d) for :func:`supcon_loss` and
    :func:`class_conditional_info_nce`.

    ``cosine``: cos(a_i, c_j). ``official``: <a_i, c_j> / (|a_j| |c_j|), the official code's
    ``einsum("b d, c d -> b c", vi, vj).div(norm(vi) * norm(vj))``, whose (n,) divisor broadcasts
    over columns, so entry (i, j) is divided by the norms of sample j in both views. The two
    agree on unit vectors; the official encoder's outputs are not normalised.
    """
    if similarity == "cosine":
        return F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).t()
    if similarity == "official":
        return anchors @ candidates.t() / (anchors.norm(dim=1) * candidates.norm(dim=1))
    raise ValueError(f"unknown similarity {similarity!r} (valid: {', '.join(THANOS_SIMILARITIES)})")


def _class_logits(anchors: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, temperature: float,
                  similarity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits s[i, j] = sim(anchor_i, candidate_j) / T and the same-label mask (diagonal included)."""
    return thanos_similarity(anchors, candidates, similarity) / temperature, labels[:, None] == labels[None, :]


def supcon_loss(anchors: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, temperature: float,
                clip_pos: float | None = 1.0, similarity: str = "cosine") -> torch.Tensor:
    """SupCon as in Chen, Fu et al. 2022 (Perfectly Balanced; their official ``ContrastiveLoss``, type sup_con).

    Row i of ``anchors`` and row i of ``candidates`` are two views of sample i with label
    ``labels[i]``; only anchors -> candidates is contrasted (the official code: anchors from
    view 1, candidates from view 0). With s = :func:`thanos_similarity` / T, P(i) the candidates of i's class
    (i itself included) and N(i) the others, each positive is contrasted against itself plus
    the negatives:  L_i = 1/|P(i)| sum_{p in P(i)} [ -min(s_ip, clip_pos) + log(e^{s_ip} + sum_{n in N(i)} e^{s_in}) ].
    ``clip_pos`` clamps the numerator's logit only (the official default 1.0: with T=0.5 the
    numerator gives no gradient once a positive's cosine exceeds 0.5, only the denominators
    still pull it closer); ``None`` disables it (the official code clamps only when clip_pos == 1.0:
    methods.supcon.SupCon does the same with the ``official`` similarity). Mean over anchors.
    """
    sim, pos = _class_logits(anchors, candidates, labels, temperature, similarity)
    neg_lse = sim.masked_fill(pos, float("-inf")).logsumexp(1, keepdim=True)  # -inf without negatives
    numerator = sim if clip_pos is None else sim.clamp(max=clip_pos)
    per_pair = torch.logaddexp(sim, neg_lse) - numerator
    return ((per_pair * pos).sum(1) / pos.sum(1)).mean()


def class_conditional_info_nce(anchors: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor,
                               temperature: float, similarity: str = "cosine") -> torch.Tensor:
    """Class-conditional InfoNCE (Chen, Fu et al. 2022: the spread term of their L_spread = SupCon + this).

    Instance discrimination inside the class: anchor i's positive is its own other view and
    the contrast set is the candidates of its class, L_i = -s_ii + log sum_{p in P(i)} e^{s_ip},
    s = :func:`thanos_similarity` / T, anchors -> candidates only as in :func:`supcon_loss`. Mean over anchors.
    """
    sim, pos = _class_logits(anchors, candidates, labels, temperature, similarity)
    return (sim.masked_fill(~pos, float("-inf")).logsumexp(1) - sim.diagonal()).mean()


def column_nt_xent(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent between the columns of two views' head outputs (n, K) (CC's cluster-level contrast,
    Li et al. 2021; CD's feature heads): column k of one view is positive with column k of the
    other, the other 2K-2 columns are negatives. Mean over the 2K columns."""
    return nt_xent(p1.t(), p2.t(), temperature)
