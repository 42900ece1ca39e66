"""Protocol registry and the evaluation context protocols receive from the harness.

A *protocol* is a thin wrapper around the pure functions of this package: it takes
an :class:`EvalContext` (features extracted once per run, labels, split indices,
the frozen encoder) and returns a flat ``{metric: value}`` dict. The harness
prefixes each metric with the protocol's name (``knn/top1``) and stores the
protocol's parameters next to the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from harness.registry import Registry


class EvalContext(Protocol):
    """What the harness hands a protocol. All arrays index the dataset's full sample list."""

    seed: int
    device: str

    def split(self, name: str) -> np.ndarray:
        """Indices of a split: ``train``, ``val``, ``train_full`` (train+val), ``test``, ``all``."""

    def labels(self, level: str = "fine") -> np.ndarray:
        """Integer labels of every sample, ``fine`` or ``coarse``."""

    def num_classes(self, level: str = "fine") -> int: ...

    def features(self, kind: str) -> np.ndarray:
        """Float32 features (N, D) of a representation (``backbone``, ``head``, ...), cached."""

    def assignments(self, kind: str) -> np.ndarray:
        """Integer cluster assignments (N,) of a cluster head (``cluster_head``), cached."""

    def images(self, indices: np.ndarray) -> Any:
        """uint8 image tensor (n, C, H, W) of the given samples (for protocols that train on images)."""

    def encoder(self) -> Any:
        """The frozen backbone (``torch.nn.Module``, eval mode) mapping normalised images to features."""

    def normalize(self, images: Any) -> Any:
        """uint8 images -> float tensors the encoder expects (on ``device``)."""

    def probe_augment(self, images: Any, preset: str = "probe") -> Any:
        """uint8 images -> augmented, normalised float tensors: ``probe``, the linear-eval augmentation
        (random crop and flip); ``training``, the run's own training augmentation (preset and overrides)."""


@dataclass(frozen=True)
class ProtocolSpec:
    """A registered protocol: its function, default parameters and what representations it reads.

    ``inputs`` is a subset of {"features", "assignments", "encoder"}: the harness calls the
    protocol once per feature representation, once per cluster head, or once on the encoder.
    """

    name: str
    fn: Callable[..., dict[str, float]]
    defaults: dict[str, Any] = field(default_factory=dict)
    inputs: frozenset[str] = frozenset({"features"})
    description: str = ""
    #: Parameters that name one of a fixed set of variants; suites are checked against them before training.
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)


PROTOCOLS: Registry[ProtocolSpec] = Registry("protocol")


def register_protocol(name: str, *, defaults: dict[str, Any] | None = None,
                      inputs: tuple[str, ...] = ("features",), choices: dict[str, tuple[str, ...]] | None = None):
    """Register ``fn(ctx, rep, **params) -> dict`` under ``name``.

    ``rep`` is the representation name the harness evaluates (``backbone``, ``head``,
    ``cluster_head``; ``backbone`` for encoder protocols). The first docstring line is
    the description ``harness list`` shows.
    """

    def decorator(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        PROTOCOLS.register(name)(ProtocolSpec(name, fn, dict(defaults or {}), frozenset(inputs),
                                              doc[0] if doc else "", dict(choices or {})))
        return fn

    return decorator
