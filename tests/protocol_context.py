"""A small, real :class:`protocols.base.EvalContext` over Gaussian blobs, for protocol tests.

Fine classes are well-separated blobs (so every protocol should score 1.0 on them), coarse
classes pair up fine ones, images are per-class uint8 patterns plus noise, the encoder is
a fixed linear map followed by BatchNorm (to catch a probe that updates its statistics),
and ``cluster_head`` assigns each sample its fine class under arbitrary cluster ids.

``relabel`` redraws the fine labels of some splits at random (``blob`` keeps the true
ones): every wiring then scores the same 1.0 no longer, so a protocol that fits on, votes
with or scores the wrong split gets a different number. :func:`record_calls` records the
arrays a wrapper hands the pure function, to check which rows reach the fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch


@dataclass
class BlobContext:
    seed: int = 0
    device: str = "cpu"
    num_fine: int = 6
    per_class: int = 40
    dim: int = 8
    with_val: bool = True  # False: an empty val split (its samples stay in train)
    relabel: tuple[str, ...] = ()  # splits whose fine (and so coarse) labels are redrawn at random
    _data: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        fine = np.repeat(np.arange(self.num_fine), self.per_class)
        n = len(fine)
        means = rng.normal(size=(self.num_fine, self.dim)) * 4
        patterns = rng.integers(0, 256, size=(self.num_fine, 3, 4, 4))
        images = np.clip(patterns[fine] + rng.normal(0, 10, size=(n, 3, 4, 4)), 0, 255)
        order = rng.permutation(n)
        train, val, test = order[: n // 2], order[n // 2: 3 * n // 4], order[3 * n // 4:]
        if not self.with_val:
            train, val = order[: 3 * n // 4], order[:0]
        torch.manual_seed(self.seed)
        self._encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16),
                                            torch.nn.BatchNorm1d(16)).eval()
        self._data = {
            "backbone": (means[fine] + rng.normal(size=(n, self.dim))).astype(np.float32),
            "cluster_head": 100 + 7 * rng.permutation(self.num_fine)[fine],
            "images": torch.from_numpy(images.astype(np.uint8)),
            "splits": {"train": train, "val": val, "test": test, "train_full": np.r_[train, val],
                       "all": np.arange(n)},
        }
        self.blob = fine  # the class each sample's features were drawn from
        relabelled = fine.copy()
        for name in self.relabel:
            part = self._data["splits"][name]
            relabelled[part] = rng.integers(0, self.num_fine, len(part))
        self._data |= {"fine": relabelled, "coarse": relabelled // 2}

    def split(self, name: str) -> np.ndarray:
        return self._data["splits"][name]

    def labels(self, level: str = "fine") -> np.ndarray:
        return self._data[level]

    def num_classes(self, level: str = "fine") -> int:
        return len(np.unique(self._data[level]))

    def features(self, kind: str) -> np.ndarray:
        return self._data[kind]

    def assignments(self, kind: str) -> np.ndarray:
        if kind != "cluster_head":
            raise KeyError(kind)
        return self._data[kind]

    def images(self, indices: np.ndarray) -> torch.Tensor:
        return self._data["images"][indices]

    def encoder(self) -> torch.nn.Module:
        return self._encoder

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - 0.5).to(self.device)

    def probe_augment(self, images: torch.Tensor, preset: str = "probe") -> torch.Tensor:
        x = self.normalize(images)
        return x + {"probe": 0.02, "training": 0.05}[preset] * torch.randn_like(x)


def record_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[SimpleNamespace]:
    """Replace ``module.name`` by a wrapper that calls it and appends each call's
    ``SimpleNamespace(args=..., kwargs=..., result=...)`` to the returned list."""
    original, calls = getattr(module, name), []

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(SimpleNamespace(args=args, kwargs=kwargs, result=result))
        return result

    monkeypatch.setattr(module, name, recording)
    return calls
