"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, NPID).

Features are L2-normalised; each test sample's k most cosine-similar training samples
vote for their class with weight ``exp(s / temperature)`` and the class with the largest
sum wins. The search is exact, by FAISS (``IndexFlatIP``) or by a chunked torch matmul +
top-k, queries in chunks so memory stays bounded however many there are.

One search at the largest k serves any grid of (k, temperature): the k nearest are the first k
of the largest-k nearest, so the protocol scores its sensitivity grid at the cost of one search.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from protocols._common import (ArrayLike, check_choice, check_classes, check_count,
                               check_features, check_labels, check_positive, check_positive_int,
                               check_same_dim, check_same_length, topk_accuracy)
from protocols.base import EvalContext, register_protocol

#: Where the neighbour search runs: FAISS when installed (``auto``), or torch on the features' device.
KNN_BACKENDS = ("auto", "faiss", "torch")

SIMILARITY_BLOCK = 2**26  # floats in one torch similarity block (256 MB): sets the default chunk

Search = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _faiss_search(train: torch.Tensor, k: int, device: str, required: bool) -> Search | None:
    """Exact inner-product search with FAISS (GPU index on a CUDA device), None without faiss."""
    try:
        import faiss
    except ImportError:
        if required:
            raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu)") from None
        return None
    index = faiss.IndexFlatIP(train.shape[1])
    if device.startswith("cuda") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, torch.device(device).index or 0, index)
        index.referenced_objects = [resources]  # faiss's idiom: the resources outlive the index
    index.add(train.cpu().numpy())

    def search(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sims, idx = index.search(queries.cpu().numpy(), k)
        return torch.from_numpy(sims).to(device), torch.from_numpy(idx).to(device)

    return search


def _torch_search(train: torch.Tensor, k: int, chunk: int) -> Search:
    """Exact search by matmul + topk, into one reused similarity buffer (a fresh block per
    chunk costs page faults on CPU)."""
    buffer = torch.empty(chunk, len(train), device=train.device)

    def search(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.mm(queries, train.T, out=buffer[:len(queries)]).topk(k, dim=1)

    return search


def _ranked_classes(train_x: np.ndarray, train_idx: np.ndarray, test_x: np.ndarray,
                    num_classes: int, settings: Sequence[tuple[int, float]], backend: str,
                    chunk_size: int | None, device: str, top: int) -> dict[tuple[int, float], np.ndarray]:
    """Per (k, temperature) in ``settings``: the ``top`` classes (indices into the training classes)
    of each test sample, best first, from one search at the largest k."""
    train = F.normalize(torch.from_numpy(train_x).to(device), dim=1)
    labels = torch.from_numpy(train_idx).to(device)
    chunk = min(len(test_x), chunk_size or max(1, SIMILARITY_BLOCK // len(train_x)))
    k_max = max(k for k, _ in settings)
    search = None if backend == "torch" else _faiss_search(train, k_max, device, backend == "faiss")
    search = search or _torch_search(train, k_max, chunk)
    ranked: dict[tuple[int, float], list[torch.Tensor]] = {s: [] for s in settings}
    for start in range(0, len(test_x), chunk):
        queries = F.normalize(torch.from_numpy(test_x[start:start + chunk]).to(device), dim=1)
        all_sims, all_idx = search(queries)  # descending similarity: the first k are the k nearest
        for k, temperature in settings:
            sims, idx = all_sims[:, :k], all_idx[:, :k]
            # exp((s - s_max) / T): the per-query factor exp(-s_max / T) leaves the ranking
            # unchanged and keeps small temperatures from overflowing
            weights = ((sims - sims.max(dim=1, keepdim=True).values) / temperature).exp()
            votes = torch.zeros(len(queries), num_classes, device=device).scatter_add_(1, labels[idx], weights)
            # classes by summed vote, as lemniscate's test.py (probs.sort(1, True)); its sort is not stable, so
            # classes with equal votes (those without any when fewer than ``top`` got votes) came in an
            # unspecified order: here a stable sort puts them in class order
            ranked[k, temperature].append(votes.sort(dim=1, descending=True, stable=True).indices[:, :top].cpu())
    return {s: torch.cat(parts).numpy() for s, parts in ranked.items()}


def _check_knn_inputs(train_x, train_y, test_x, k, temperature, backend, chunk_size):
    train_x, test_x = check_features(train_x, "train_x"), check_features(test_x, "test_x")
    train_y = check_labels(train_y, "train_y")
    check_same_length(train_x, train_y, "train_x", "train_y")
    check_same_dim(train_x, test_x, "train_x", "test_x")
    check_count(k, len(train_x), "k", "the training set")
    check_positive(temperature, "temperature")
    check_choice(backend, "backend", KNN_BACKENDS)
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    classes, train_idx = check_classes(train_y, "train_y")
    return train_x, test_x, classes, train_idx


def weighted_knn_predict(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, k: int = 200,
                         temperature: float = 0.1, backend: str = "auto",
                         chunk_size: int | None = None, device: str = "cpu") -> np.ndarray:
    """Predicted labels (n_test,) by NPID's weighted kNN rule (Wu et al. 2018, eq. 9 and §3.5).

    Cosine similarity ``s`` on L2-normalised features; the ``k`` nearest training samples
    vote for their class with weight ``exp(s / temperature)``. ``backend``: ``"faiss"``
    (exact ``IndexFlatIP``, a GPU index on a CUDA ``device``), ``"torch"`` (matmul + topk on
    ``device``) or ``"auto"`` (FAISS if installed). Queries go ``chunk_size`` at a time
    (default: a 256 MB similarity block). Labels may be any ints or strings.
    """
    train_x, test_x, classes, train_idx = _check_knn_inputs(train_x, train_y, test_x, k,
                                                            temperature, backend, chunk_size)
    ranked = _ranked_classes(train_x, train_idx, test_x, len(classes), [(k, temperature)], backend,
                             chunk_size, device, top=1)
    return classes[ranked[k, temperature][:, 0]]


def knn_accuracy(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike,
                 k: int = 200, temperature: float = 0.1, backend: str = "auto",
                 chunk_size: int | None = None, device: str = "cpu") -> dict[str, float]:
    """``top1`` (and ``top5`` with at least 5 classes) of :func:`weighted_knn_predict`,
    as fractions in [0, 1]; top-5 ranks classes by their summed vote, as NPID's code does."""
    return knn_grid_accuracy(train_x, train_y, test_x, test_y, [k], [temperature], backend,
                             chunk_size, device)[k, temperature]


def knn_grid_accuracy(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike,
                      ks: Sequence[int], temperatures: Sequence[float], backend: str = "auto",
                      chunk_size: int | None = None,
                      device: str = "cpu") -> dict[tuple[int, float], dict[str, float]]:
    """:func:`knn_accuracy` at every (k, temperature) of ``ks`` x ``temperatures``, from one
    search at the largest k."""
    ks, temperatures = list(ks), list(temperatures)
    if not ks or not temperatures:
        raise ValueError(f"the kNN grid needs at least one k and one temperature, got {ks} and {temperatures}")
    for k in ks:
        check_positive_int(k, "k")
    for temperature in temperatures:
        check_positive(temperature, "temperature")
    train_x, test_x, classes, train_idx = _check_knn_inputs(train_x, train_y, test_x, max(ks), temperatures[0],
                                                            backend, chunk_size)
    test_y = check_labels(test_y, "test_y")
    check_same_length(test_x, test_y, "test_x", "test_y")
    settings = list(dict.fromkeys((k, t) for k in ks for t in temperatures))
    ranked = _ranked_classes(train_x, train_idx, test_x, len(classes), settings, backend,
                             chunk_size, device, top=min(5, len(classes)))
    return {s: topk_accuracy(test_y, classes[r]) for s, r in ranked.items()}


def grid_key(k: int, temperature: float) -> str:
    """The stable name of a grid point, ``k20_t0.07``: ``%g`` prints a float's shortest 6-digit form,
    so 0.07 is ``0.07`` whatever sum produced it."""
    return f"k{k}_t{temperature:g}"


#: The sensitivity grid every kNN evaluation also scores (issue 16: how rankings move with k and T).
GRID_K = (10, 20, 100, 200)
GRID_TEMPERATURE = (0.07, 0.1, 0.5)


@register_protocol("knn", defaults={"k": 200, "temperature": 0.1, "backend": "auto",
                                    "grid_k": list(GRID_K), "grid_temperature": list(GRID_TEMPERATURE)},
                   choices={"backend": KNN_BACKENDS})
def knn_protocol(ctx: EvalContext, rep: str, *, k: int, temperature: float, backend: str,
                 grid_k: Sequence[int] = (), grid_temperature: Sequence[float] = ()) -> dict[str, float]:
    """Weighted kNN (NPID) top-1/top-5: train+val features vote for each test sample's fine label.

    ``top1``/``top5`` are at (``k``, ``temperature``); every point of ``grid_k`` x ``grid_temperature``
    (k clamped to the memory set's size) is also stored, as ``grid/k20_t0.07/top1``, from the same
    search. Called without a grid (the function's defaults), only the headline is scored.
    """
    x, y = ctx.features(rep), ctx.labels("fine")
    train, test = ctx.split("train_full"), ctx.split("test")
    ks = sorted({min(int(g), len(train)) for g in grid_k})
    temperatures = [float(t) for t in grid_temperature] if ks else []
    grid = knn_grid_accuracy(x[train], y[train], x[test], y[test], [k, *ks], [temperature, *temperatures],
                             backend=backend, device=ctx.device)
    out = dict(grid[k, temperature])
    for gk in ks:
        for gt in temperatures:
            out |= {f"grid/{grid_key(gk, gt)}/{name}": value for name, value in grid[gk, gt].items()}
    return out


VAL_PROTOCOL = "val_knn"


@register_protocol(VAL_PROTOCOL, defaults={"k": 200, "temperature": 0.1, "backend": "auto"},
                   choices={"backend": KNN_BACKENDS})
def val_knn_protocol(ctx: EvalContext, rep: str, *, k: int, temperature: float, backend: str) -> dict[str, float]:
    """Weighted kNN scored on the **validation** split: train-split features vote for each val sample.

    What ``harness tune`` maximises, and what a suite lists to choose settings without looking at the
    test split. ``k`` is clamped to the training split's size.
    """
    x, y = ctx.features(rep), ctx.labels("fine")
    train, val = ctx.split("train"), ctx.split("val")
    if len(val) == 0:
        raise ValueError("the validation split is empty (val_fraction 0): val_knn has nothing to score")
    return knn_accuracy(x[train], y[train], x[val], y[val], k=min(k, len(train)), temperature=temperature,
                        backend=backend, device=ctx.device)
