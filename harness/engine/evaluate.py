"""Evaluate a trained method with the registered protocols, extracting features once per run."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from harness.data.augment import Augmenter, get_preset
from harness.data.datasets import ImageData, SplitManifest
from methods.base import Method
from protocols import PROTOCOLS


class RunContext:
    """The :class:`protocols.base.EvalContext` of one trained method on one dataset.

    Representations (backbone, heads) and cluster-head assignments of every sample are
    computed in one pass over the data without augmentation and cached. ``image_size`` is the
    side the encoder was trained at (the suite's ``image_size``; None: the data's own): every
    batch the encoder sees is resized to it on the device, as CC's and CD's test transform
    ``Resize((image_size, image_size))`` does, and probe crops are resampled to it.
    """

    def __init__(self, method: Method, data: ImageData, manifest: SplitManifest, device: str, seed: int,
                 batch_size: int = 512, image_size: int | None = None) -> None:
        self.method, self.data, self.manifest = method, data, manifest
        self.device, self.seed, self.batch_size = device, seed, batch_size
        self._plain = Augmenter(None, data.mean, data.std, out_size=image_size)
        self._image_size = image_size
        self._augmenters: dict[str, Augmenter] = {}
        self._probe_gen = torch.Generator().manual_seed(seed)
        self._features: dict[str, np.ndarray] | None = None
        self._assignments: dict[str, np.ndarray] = {}
        self.extract_seconds = 0.0

    # -------------------------------------------------------------- EvalContext
    def split(self, name: str) -> np.ndarray:
        return self.manifest.split(name)

    def labels(self, level: str = "fine") -> np.ndarray:
        if level == "fine":
            return self.data.labels
        if level == "coarse":
            if self.data.coarse_labels is None:
                raise ValueError(f"dataset {self.data.name!r} defines no coarse labels")
            return self.data.coarse_labels
        raise ValueError(f"unknown label level {level!r} (valid: coarse, fine)")

    def num_classes(self, level: str = "fine") -> int:
        return self.data.num_classes if level == "fine" else self.data.num_coarse

    def features(self, kind: str) -> np.ndarray:
        self._extract()
        return self._features[kind]

    def assignments(self, kind: str) -> np.ndarray:
        self._extract()
        return self._assignments[kind]

    def images(self, indices: np.ndarray) -> torch.Tensor:
        return self.data.images[torch.as_tensor(indices)]

    def encoder(self) -> torch.nn.Module:
        return self.method.backbone.eval()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self._plain.plain(images.to(self.device))

    def probe_augment(self, images: torch.Tensor, preset: str = "probe") -> torch.Tensor:
        if preset not in self._augmenters:
            cfg = self.method.cfg
            choice = get_preset("probe") if preset == "probe" else get_preset(cfg["augment"], **cfg["augment_overrides"])
            self._augmenters[preset] = Augmenter(choice, self.data.mean, self.data.std, out_size=self._image_size,
                                                 allow_flip=self.data.flips)
        return self._augmenters[preset](images.to(self.device), self._probe_gen)

    # -------------------------------------------------------------- extraction
    def representation_names(self) -> tuple[list[str], list[str]]:
        """(feature representations, cluster heads) this method exposes."""
        self._extract()
        return list(self._features), list(self._assignments)

    @torch.no_grad()
    def _extract(self) -> None:
        if self._features is not None:
            return
        start = time.perf_counter()
        self.method.to(self.device).eval()
        feats: dict[str, list[torch.Tensor]] = {}
        heads: dict[str, list[torch.Tensor]] = {}
        images = self.data.images
        for i in range(0, len(images), self.batch_size):
            x = self.normalize(images[i:i + self.batch_size])
            for k, v in self.method.representations(x).items():
                feats.setdefault(k, []).append(v.float().cpu())
            for k, v in self.method.cluster_heads(x).items():
                heads.setdefault(k, []).append(v.argmax(1).cpu())
        self._features = {k: torch.cat(v).numpy().astype(np.float32) for k, v in feats.items()}
        self._assignments = {k: torch.cat(v).numpy() for k, v in heads.items()}
        self.extract_seconds = time.perf_counter() - start


def evaluate(ctx: RunContext, protocols: dict[str, dict[str, Any]],
             progress: Callable[[str], None] | None = None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Run every protocol on every representation it reads.

    Returns ``{representation: {"protocol/metric": value}}`` and the seconds each protocol took;
    ``progress`` hears one line as each (protocol, representation) ends.
    """
    features, heads = ctx.representation_names()
    metrics: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name, params in protocols.items():
        spec = PROTOCOLS.get(name)
        reps = []
        if "features" in spec.inputs:
            reps += features
        if "assignments" in spec.inputs:
            reps += heads
        if "encoder" in spec.inputs and "backbone" not in reps:
            reps.append("backbone")
        start = time.perf_counter()
        for rep in reps:
            began = time.perf_counter()
            out = spec.fn(ctx, rep, **params)
            metrics.setdefault(rep, {}).update({f"{name}/{k}": float(v) for k, v in out.items()})
            if progress is not None:
                progress(f"evaluated {name} on {rep} ({time.perf_counter() - began:.1f} s)")
        seconds[name] = round(time.perf_counter() - start, 3)
    return metrics, seconds
