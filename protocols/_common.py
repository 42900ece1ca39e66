"""Input checks and scoring shared by the protocols.

Bad input raises a one-line ``ValueError`` naming the argument and the bad value
(scikit-learn style). Accuracies are fractions in [0, 1] throughout the package.
"""
from __future__ import annotations

from typing import Any

import numpy as np

ArrayLike = Any  # a NumPy array, a torch tensor or a list


def to_numpy(x: ArrayLike) -> np.ndarray:
    """NumPy view of an array, tensor (any device) or list."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_labels(y: ArrayLike, name: str) -> np.ndarray:
    """A non-empty 1-D label array (any ints or strings)."""
    y = to_numpy(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D labels, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty")
    return y


def check_features(x: ArrayLike, name: str, ndim: int = 2) -> np.ndarray:
    """A non-empty, finite float32 array with ``ndim`` dimensions."""
    x = to_numpy(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    bad = x.size - np.count_nonzero(np.isfinite(x))
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or inf values")
    return x


def check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} have different lengths: {len(a)} != {len(b)}")


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_a} and {name_b} have different feature dims: "
                         f"{a.shape[-1]} != {b.shape[-1]}")


def check_classes(y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct labels and each sample's index into them; needs at least two classes."""
    classes, index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{name} has a single class ({classes[0].item()!r}); need at least 2")
    return classes, index


def check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_count(k: int, n: int, name: str, what: str) -> None:
    """``1 <= k <= n`` for an integer ``k`` drawn from the ``n`` samples of ``what``."""
    check_positive_int(k, name)
    if k > n:
        raise ValueError(f"{name}={k} is larger than {what} ({n} samples)")


def check_choice(value: str, name: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


def topk_accuracy(y_true: np.ndarray, ranked: np.ndarray) -> dict[str, float]:
    """``top1`` (and ``top5`` when at least 5 classes are ranked) of predictions ranked best
    first, ``ranked`` (n, >=1) holding labels comparable with ``y_true``; fractions in [0, 1]."""
    hits = ranked == y_true[:, None]
    out = {"top1": float(hits[:, 0].mean())}
    if ranked.shape[1] >= 5:
        out["top5"] = float(hits[:, :5].any(axis=1).mean())
    return out
