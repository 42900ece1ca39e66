"""Coarse-to-fine transfer: how much fine-grained structure survives in features learned
from coarse labels, or none (the CIFAR-100 20-superclass setting of e.g. Bukchin et al.
2021, ANCOR). The same frozen features are scored on fine and on coarse labels by the
L-BFGS probe and the weighted kNN, side by side.
"""
from __future__ import annotations

import numpy as np

from protocols._common import ArrayLike, check_features, to_numpy
from protocols.base import EvalContext, register_protocol
from protocols.knn import knn_accuracy
from protocols.linear import L2_GRID, lbfgs_probe


def coarse_to_fine(train_x: ArrayLike, train_fine: ArrayLike, train_coarse: ArrayLike,
                   test_x: ArrayLike, test_fine: ArrayLike, test_coarse: ArrayLike, *,
                   val_x: ArrayLike | None = None, val_fine: ArrayLike | None = None,
                   val_coarse: ArrayLike | None = None, k: int = 200, temperature: float = 0.1,
                   knn_backend: str = "auto", l2_grid: tuple[float, ...] = L2_GRID,
                   val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
                   device: str = "cpu") -> dict[str, float]:
    """Fine- and coarse-label accuracy of the same features by :func:`lbfgs_probe` and
    :func:`knn_accuracy` (NPID weighted kNN).

    Keys ``{fine,coarse}_lbfgs_{top1,top5,l2}`` and ``{fine,coarse}_knn_{top1,top5}``
    (top5 where there are at least 5 classes); fractions in [0, 1]. The probe picks its L2
    on the validation set (given, or carved from train with ``seed``) and refits on
    train+val; the kNN votes with train+val.
    """
    levels = {"fine": (train_fine, test_fine, val_fine), "coarse": (train_coarse, test_coarse, val_coarse)}
    knn_x = train_x if val_x is None else np.concatenate([check_features(train_x, "train_x"),
                                                           check_features(val_x, "val_x")])
    out = {}
    for level, (train_y, test_y, val_y) in levels.items():
        probe = lbfgs_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y,
                            l2_grid=l2_grid, val_fraction=val_fraction, seed=seed,
                            max_iter=max_iter, device=device)
        out |= {f"{level}_lbfgs_{key}": probe[key] for key in ("top1", "top5", "l2") if key in probe}
        knn_y = train_y if val_x is None else np.concatenate([to_numpy(train_y), to_numpy(val_y)])
        knn = knn_accuracy(knn_x, knn_y, test_x, test_y, k=k, temperature=temperature,
                           backend=knn_backend, device=device)
        out |= {f"{level}_knn_{key}": value for key, value in knn.items()}
    return out


@register_protocol("coarse_to_fine", defaults={"k": 200, "temperature": 0.1,
                                               "l2_grid": list(L2_GRID), "max_iter": 1000})
def coarse_to_fine_protocol(ctx: EvalContext, rep: str, *, k: int, temperature: float,
                            l2_grid: list[float], max_iter: int) -> dict[str, float]:
    """Fine- vs coarse-label accuracy of the features by the L-BFGS probe and weighted kNN."""
    x, fine, coarse = ctx.features(rep), ctx.labels("fine"), ctx.labels("coarse")
    train, val, test = ctx.split("train"), ctx.split("val"), ctx.split("test")
    # no val split: the probe carves one from train
    val_x, val_fine, val_coarse = (x[val], fine[val], coarse[val]) if len(val) else (None, None, None)
    return coarse_to_fine(x[train], fine[train], coarse[train], x[test], fine[test], coarse[test],
                          val_x=val_x, val_fine=val_fine, val_coarse=val_coarse, k=k,
                          temperature=temperature, l2_grid=tuple(l2_grid), seed=ctx.seed,
                          max_iter=max_iter, device=ctx.device)
