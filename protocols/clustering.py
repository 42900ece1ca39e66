"""Clustering metrics (ACC, NMI, AMI, ARI) and k-means, as deep-clustering papers report them.

Every metric is computed from one contingency table (classes x clusters) built with
``np.unique`` + ``np.bincount``, so labels may be any ints or strings, need not start at
0 or be contiguous, the number of clusters K may differ from the number of classes C,
and clusters that never occur (empty clusters) simply have no column.

:func:`kmeans` is scikit-learn's ``KMeans`` (k-means++ seeding, best of 10 restarts) in torch on
the features' device, chunked so ImageNet-sized feature sets fit; the ``clustering`` protocol
runs it on feature representations and scores a cluster head's assignments directly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from protocols._common import (ArrayLike, check_choice, check_classes, check_count, check_features,
                               check_labels, check_positive_int, check_same_length)
from protocols.base import EvalContext, register_protocol

EPS = np.finfo(np.float64).eps


def contingency_table(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Counts ``table[c, k]`` of samples with class ``c`` in cluster ``k`` (C x K, int64),
    rows and columns in sorted label order. ``y_true`` needs at least two classes."""
    y_true, y_pred = check_labels(y_true, "y_true"), check_labels(y_pred, "y_pred")
    check_same_length(y_true, y_pred, "y_true", "y_pred")
    classes, t = check_classes(y_true, "y_true")
    clusters, p = np.unique(y_pred, return_inverse=True)
    cells = np.bincount(t * len(clusters) + p, minlength=len(classes) * len(clusters))
    return cells.reshape(len(classes), len(clusters))


def _hungarian(table: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(table, maximize=True)
    return table[rows, cols].sum() / table.sum()


def _majority(table: np.ndarray) -> float:
    return table.max(axis=0).sum() / table.sum()


def hungarian_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Clustering accuracy (ACC): the best one-to-one map of clusters to classes, found by
    the Hungarian algorithm on the contingency table (Kuhn 1955; Xie et al. 2016, DEC).

    Any K clusters and C classes: with K > C the unmatched clusters count as wrong, with
    K < C the unmatched classes do. Returns a fraction in [0, 1].
    """
    return float(_hungarian(contingency_table(y_true, y_pred)))


def majority_vote_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Many-to-one accuracy: each cluster predicts its majority class (the over-clustering
    score of Ji et al. 2019, IIC). Fraction in [0, 1]."""
    return float(_majority(contingency_table(y_true, y_pred)))


def _entropy(counts: np.ndarray) -> float:
    n = counts.sum()
    return float(-np.sum(counts / n * (np.log(counts) - math.log(n))))


def _mutual_info(table: np.ndarray) -> float:
    """MI in nats from the non-zero cells, term for term as ``sklearn.metrics.mutual_info_score``."""
    a, b, n = table.sum(axis=1), table.sum(axis=0), table.sum()
    if len(b) == 1:
        return 0.0
    i, j = np.nonzero(table)
    nij = table[i, j].astype(np.float64)
    log_outer = 2 * math.log(n) - np.log(a[i]) - np.log(b[j])
    mi = nij / n * (np.log(nij) - math.log(n)) + nij / n * log_outer
    mi[np.abs(mi) < EPS] = 0.0
    return max(float(mi.sum()), 0.0)


def _expected_mutual_info(a: np.ndarray, b: np.ndarray, n: int) -> float:
    """E[MI] of two random labellings with marginals ``a`` and ``b`` under the
    hypergeometric model (Vinh, Epps & Bailey 2010), vectorised over (row, column) pairs.

    Each pair sums ``nij/n log(n nij / (a b)) P(nij)`` over ``nij``; we sum over a window
    of 12 standard deviations + 12 around the mode of ``P`` (outside it the terms are
    below 1e-25 of the largest), stepping ``P(nij + 1) = P(nij) (a - nij)(b - nij) /
    ((nij + 1)(n - a - b + nij + 1))``. Pairs with equal marginals are computed once.
    scikit-learn loops over every ``nij`` in Cython: over a minute at K = C = 1000 on 1.2M
    samples, against well under a second here.
    """
    if len(a) == 1 or len(b) == 1:
        return 0.0
    (ua, ca), (ub, cb) = np.unique(a, return_counts=True), np.unique(b, return_counts=True)
    A, B = np.repeat(ua, len(ub)), np.tile(ub, len(ua))
    mode = (A + 1) * (B + 1) // (n + 2)
    A, B, N = A.astype(np.float64), B.astype(np.float64), float(n)
    sd = np.sqrt(A * B * (N - A) * (N - B) / (N * N * (N - 1)))
    width = np.ceil(12 * sd).astype(np.int64) + 12
    lo = np.maximum(np.maximum(1, mode - width), (A + B - N).astype(np.int64))
    hi = np.minimum(np.minimum(A, B).astype(np.int64), mode + width)
    # pairs sorted by window length, so the pairs still summing at step t are a prefix
    order = np.argsort(lo - hi, kind="stable")
    A, B, span = A[order], B[order], (hi - lo)[order]
    weight = np.outer(ca, cb).ravel()[order].astype(np.float64)
    nij = lo[order].astype(np.float64)
    p = np.exp(gammaln(A + 1) + gammaln(B + 1) + gammaln(N - A + 1) + gammaln(N - B + 1)
               - gammaln(N + 1) - gammaln(nij + 1) - gammaln(A - nij + 1) - gammaln(B - nij + 1)
               - gammaln(N - A - B + nij + 1))
    log_nab = math.log(N) - np.log(A) - np.log(B)
    emi = 0.0
    for t in range(int(span[0]) + 1):
        m = np.searchsorted(-span, -t, side="right")  # pairs with span >= t
        x, a_, b_ = nij[:m], A[:m], B[:m]
        emi += float(weight[:m] @ (x / N * (np.log(x) + log_nab[:m]) * p[:m]))
        p[:m] *= (a_ - x) * (b_ - x) / ((x + 1) * (N - a_ - b_ + x + 1))
        x += 1
    return emi


def _clamp_away_from_zero(x: float) -> float:
    return min(x, -EPS) if x < 0 else max(x, EPS)


def _adjusted_rand(table: np.ndarray) -> float:
    """ARI (Hubert & Arabie 1985) from pair counts in exact integer arithmetic, as sklearn."""
    n = int(table.sum())
    sum_squares = int((table ** 2).sum())
    rows, cols = int((table.sum(axis=1) ** 2).sum()), int((table.sum(axis=0) ** 2).sum())
    tp, fp, fn = sum_squares - n, cols - sum_squares, rows - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fp == 0 and fn == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def cluster_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """``acc`` (Hungarian), ``nmi``, ``ami``, ``ari`` and, when the number of distinct
    predicted clusters K differs from the number of classes C, ``acc_majority``.

    NMI and AMI use the arithmetic mean of the two entropies as normaliser (Vinh et al.
    2010; scikit-learn's default since 0.22, before which NMI used the geometric mean and
    AMI the maximum).
    All values equal scikit-learn's ``normalized_mutual_info_score``,
    ``adjusted_mutual_info_score`` and ``adjusted_rand_score`` (to float rounding) and are
    computed from one contingency table. Accuracies are fractions in [0, 1].
    """
    table = contingency_table(y_true, y_pred)
    a, b, n = table.sum(axis=1), table.sum(axis=0), int(table.sum())
    mi, h_mean = _mutual_info(table), (_entropy(a) + _entropy(b)) / 2
    if len(b) == 1:
        ami = 0.0
    else:
        emi = _expected_mutual_info(a, b, n)
        ami = _clamp_away_from_zero(mi - emi) / _clamp_away_from_zero(h_mean - emi)
    out = {"acc": float(_hungarian(table)), "nmi": 0.0 if mi == 0 else mi / h_mean,
           "ami": float(ami), "ari": float(_adjusted_rand(table))}
    if table.shape[0] != table.shape[1]:
        out["acc_majority"] = float(_majority(table))
    return out


KMEANS_INITS = ("k-means++", "random")
KMEANS_BACKENDS = ("torch", "faiss")
CHUNK_ELEMENTS = 2**24  # entries of a row chunk's distance (or difference) matrix: 64 MB of float32


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _kmeans_faiss(faiss, x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int, gpu: bool) -> np.ndarray:
    km = faiss.Kmeans(x.shape[1], k, niter=max_iter, nredo=n_init, seed=seed, gpu=gpu, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=len(x))  # no subsampling: all points
    km.train(x)
    return km.index.search(x, 1)[1].ravel()


def _row_chunks(n: int, width: int, chunk_elements: int):
    """Slices of ``n`` rows, each small enough that a (rows, width) matrix has at most
    ``chunk_elements`` entries (at least one row)."""
    rows = max(1, chunk_elements // width)
    return (slice(start, min(start + rows, n)) for start in range(0, n, rows))


def _sq_distances(xs: torch.Tensor, xs_sq: torch.Tensor, centres: torch.Tensor, centres_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (rows, m) as ``|x|^2 - 2 x.c + |c|^2``, clamped at 0 (one GEMM)."""
    return torch.addmm(centres_sq, xs, centres.T, alpha=-2).add_(xs_sq[:, None]).clamp_min_(0)


def _nearest_centre(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor,
                    chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's nearest centre and squared distance to it, by row chunks: the largest
    ``x.c - |c|^2 / 2`` (one GEMM and one pass over each chunk), then ``|x|^2 - 2`` times it."""
    neg_half_sq = centres.pow(2).sum(1).div_(-2)
    labels = torch.empty(len(x), dtype=torch.int64, device=x.device)
    scores = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for rows in _row_chunks(len(x), len(centres), chunk_elements):
        scores[rows], labels[rows] = torch.addmm(neg_half_sq, x[rows], centres.T).max(dim=1)
    return labels, (x_sq - 2 * scores).clamp_min_(0)


def _kmeans_plusplus(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator,
                     chunk_elements: int) -> torch.Tensor:
    """Greedy k-means++ seeding, as scikit-learn's ``_kmeans_plusplus`` (Arthur & Vassilvitskii
    2007): the first centre uniformly, then at each step ``2 + int(log k)`` candidates drawn
    with probability proportional to the squared distance to the nearest chosen centre, keeping
    the candidate that lowers the total squared distance most. Returns the chosen row indices."""
    n, trials = len(x), 2 + int(math.log(k))
    chosen = torch.empty(k, dtype=torch.int64, device=x.device)
    chosen[0] = torch.randint(n, (1,), generator=gen).item()

    def distances_to(rows: torch.Tensor) -> torch.Tensor:  # (n, len(rows)) float64
        c = x[rows]
        c_sq = c.pow(2).sum(1)
        return torch.cat([_sq_distances(x[s], x_sq[s], c, c_sq)
                          for s in _row_chunks(n, len(rows), chunk_elements)]).double()

    closest = distances_to(chosen[:1])[:, 0]
    potential = closest.sum()
    for step in range(1, k):
        draws = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device) * potential
        candidates = torch.searchsorted(closest.cumsum(0), draws).clamp_max_(n - 1)
        closest_if = torch.minimum(closest[:, None], distances_to(candidates))
        potentials = closest_if.sum(0)
        best = potentials.argmin()
        closest, potential, chosen[step] = closest_if[:, best], potentials[best], candidates[best]
    return chosen


def _update_centres(x: torch.Tensor, labels: torch.Tensor, dists: torch.Tensor, centres: torch.Tensor,
                    chunk_elements: int) -> torch.Tensor:
    """Lloyd's update: each centre becomes the mean of its points (float32 sums within a chunk,
    as scikit-learn sums float32 data; float64 across chunks).

    An empty cluster is re-seeded as scikit-learn's ``_relocate_empty_clusters_dense`` does: the
    points farthest from their centre (``dists``, to the centres that assigned ``labels``) become
    the empty clusters' new centres, largest distance to the lowest empty index, and leave their
    old cluster's mean. When every point sits on its centre there is nothing to move, and a
    cluster left without points keeps its previous centre.
    """
    k = len(centres)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for rows in _row_chunks(len(x), k, chunk_elements):
        sums += torch.zeros_like(centres).index_add_(0, labels[rows], x[rows]).double()
    counts = torch.bincount(labels, minlength=k)
    empty = torch.nonzero(counts == 0).squeeze(1)
    if len(empty) and dists.max() > 0:
        far = dists.topk(len(empty)).indices
        moved = x[far].double()
        sums.index_add_(0, labels[far], -moved)
        counts.index_add_(0, labels[far], torch.full_like(far, -1))
        sums[empty], counts[empty] = moved, 1
    means = (sums / counts.clamp_min(1)[:, None]).to(x.dtype)
    return torch.where(counts[:, None] > 0, means, centres)


def _inertia(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, chunk_elements: int) -> float:
    """Sum of squared distances of the points to their centres, exact differences, float64."""
    return float(sum((x[s] - centres[labels[s]]).double().pow(2).sum()
                     for s in _row_chunks(len(x), x.shape[1], chunk_elements)))


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, max_iter: int, shift_tol: float,
           chunk_elements: int) -> tuple[torch.Tensor, float]:
    """Lloyd's iterations with scikit-learn's stopping rule (``_kmeans_single_lloyd``): stop when
    the labels repeat (strict convergence) or the squared centre shift summed over centres is at
    most ``shift_tol``; otherwise reassign once to the final centres. Returns labels and inertia."""
    previous, converged = None, False
    for _ in range(max_iter):
        labels, dists = _nearest_centre(x, x_sq, centres, chunk_elements)
        updated = _update_centres(x, labels, dists, centres, chunk_elements)
        shift = float((updated - centres).double().pow(2).sum())
        centres = updated
        if previous is not None and torch.equal(labels, previous):
            converged = True
            break
        if shift <= shift_tol:
            break
        previous = labels
    if not converged:
        labels, _ = _nearest_centre(x, x_sq, centres, chunk_elements)
    return labels, _inertia(x, labels, centres, chunk_elements)


def _kmeans_torch(x: np.ndarray, k: int, seed: int, init: str, n_init: int, max_iter: int, tol: float,
                  device: str, chunk_elements: int) -> np.ndarray:
    x = torch.from_numpy(x).to(device)
    x = x - x.sum(0, dtype=torch.float64).div(len(x)).to(x.dtype)  # centred, as sklearn: exact expansions
    x_sq = x.pow(2).sum(1)
    shift_tol = tol * float(x_sq.double().sum()) / x.numel()  # sklearn's _tolerance: tol x mean feature variance
    best_inertia, best_labels = math.inf, None
    for restart in range(n_init):
        gen = torch.Generator().manual_seed(seed * n_init + restart)
        if init == "k-means++":
            rows = _kmeans_plusplus(x, x_sq, k, gen, chunk_elements)
        else:
            rows = torch.randperm(len(x), generator=gen)[:k].to(device)
        labels, inertia = _lloyd(x, x_sq, x[rows].clone(), max_iter, shift_tol, chunk_elements)
        if inertia < best_inertia:
            best_inertia, best_labels = inertia, labels
    return best_labels.cpu().numpy()


def kmeans(features: ArrayLike, k: int, seed: int, *, init: str = "k-means++", n_init: int = 10,
           max_iter: int = 300, tol: float = 1e-4, backend: str = "torch", device: str = "cpu",
           chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """k-means labels (n,) of ``features`` (n, D), the lowest-inertia of ``n_init`` restarts.

    The defaults are scikit-learn's ``KMeans(init="k-means++", n_init=10, max_iter=300,
    tol=1e-4)`` as CD's official evaluation calls it (``Hoper-J/Contrastive-Disentangling``,
    ``utils/metrics.py``): greedy k-means++ seeding with ``2 + int(log k)`` local trials (or
    ``init="random"``: k distinct random points), Lloyd's iterations until the labels repeat or
    the summed squared centre shift is at most ``tol`` times the mean feature variance, empty
    clusters re-seeded from the points farthest from their centres.

    ``backend="torch"`` runs in torch on ``device`` (a GPU when given one), distances in float32
    GEMMs over row chunks whose distance matrices hold at most ``chunk_elements`` entries
    (default 2**24, 64 MB: 16,777 rows at k=1000, so 1.28M x 128 features fit), inertia in float64. Restart ``i`` draws its random
    numbers from a CPU generator seeded with ``seed * n_init + i``: ``kmeans(seed=s,
    n_init=m)`` is the best of ``kmeans(seed=s*m + i, n_init=1)`` for ``i < m``, and different
    seeds never share a restart. ``backend="faiss"`` runs ``faiss.Kmeans`` (Johnson et al.
    2017; on the GPU for a CUDA ``device``) on all points: random seeding only, exactly
    ``max_iter`` iterations (``tol`` unused), FAISS's own empty-cluster rule.
    """
    x = check_features(features, "features")
    check_count(k, len(x), "k", "the number of samples")
    check_choice(init, "init", KMEANS_INITS)
    check_positive_int(n_init, "n_init")
    check_positive_int(max_iter, "max_iter")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    check_choice(backend, "backend", KMEANS_BACKENDS)
    x = np.ascontiguousarray(x)
    if backend == "torch":
        check_positive_int(chunk_elements, "chunk_elements")
        return _kmeans_torch(x, k, seed, init, n_init, max_iter, tol, device, chunk_elements)
    faiss = _faiss()
    if faiss is None:
        raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu)")
    if init != "random":
        raise ValueError(f"backend='faiss' seeds at random only; got init={init!r} (use init='random' or backend='torch')")
    gpu = device.startswith("cuda") and faiss.get_num_gpus() > 0
    return _kmeans_faiss(faiss, x, k, seed, n_init, max_iter, gpu)


def _head_assignments(ctx: EvalContext, rep: str) -> np.ndarray | None:
    """The assignments of ``rep`` if it is a cluster head, None if it is a feature representation."""
    try:
        return ctx.assignments(rep)
    except KeyError:
        return None


@register_protocol("clustering", defaults={"split": "all", "k": None, "coarse": False, "init": "k-means++",
                                           "n_init": 10, "max_iter": 300, "tol": 1e-4},
                   inputs=("features", "assignments"), choices={"init": KMEANS_INITS})
def clustering_protocol(ctx: EvalContext, rep: str, *, split: str, k, coarse: bool, init: str,
                        n_init: int, max_iter: int, tol: float) -> dict[str, float]:
    """Clustering ACC/NMI/AMI/ARI of k-means on features, or of a cluster head's assignments.

    ``k``: None (the number of fine classes), an int, or a list of ints (keys ``acc@k20``).
    A cluster head's assignments are scored as they are (``k`` unused). With ``coarse``
    the same clusters are also scored against the coarse labels (keys ``coarse_acc``).
    k-means (:func:`kmeans`, on ``ctx.device``) defaults to CD's official evaluation:
    scikit-learn's k-means++ seeding, 10 restarts keeping the lowest inertia, 300 iterations,
    tol 1e-4; ``init: random`` seeds from random points instead. Its seed is the run's seed
    (CD fixes 42), so the k-means draws differ across a suite's seeds like everything else.
    """
    idx = ctx.split(split)
    targets = {"": ctx.labels("fine")[idx]}
    if coarse:
        targets["coarse_"] = ctx.labels("coarse")[idx]
    assignments = _head_assignments(ctx, rep)
    if assignments is not None:
        predictions = {"": assignments[idx]}
    else:
        x = ctx.features(rep)[idx]
        sweep = isinstance(k, (list, tuple))
        ks = list(k) if sweep else [ctx.num_classes("fine") if k is None else k]
        predictions = {f"@k{kk}" if sweep else "": kmeans(x, kk, ctx.seed, init=init, n_init=n_init, max_iter=max_iter,
                                                          tol=tol, device=ctx.device) for kk in ks}
    return {f"{prefix}{name}{suffix}": value
            for suffix, y_pred in predictions.items()
            for prefix, y_true in targets.items()
            for name, value in cluster_metrics(y_true, y_pred).items()}
