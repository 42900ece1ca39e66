"""Thanos (Chen, Fu et al. 2022): the frozen SupCon + class-conditional InfoNCE encoder and the frozen
class-conditional autoencoder's encoder side by side, their embeddings concatenated.

Nothing is trained here: the harness trains (or loads) the two component runs of the same
dataset, seed and budget and passes them in ``info.extra["components"]``; the record's
spec lists their specs. Published CIFAR-10 2->10 fine accuracy: 79.1 (ViT).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from methods.base import DataInfo, Method, register_method


class ConcatEncoder(nn.Module):
    """Encoders applied to the same input, outputs concatenated along features (``out_dim`` = their sum)."""

    def __init__(self, encoders: list[nn.Module]) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.out_dim = sum(e.out_dim for e in encoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([e(x) for e in self.encoders], 1)


@register_method("thanos")
class Thanos(Method):
    """The components' frozen backbones concatenated; ``representations`` = {"backbone": concat}."""

    description = ("Thanos: frozen supcon_spread and cond_autoencoder encoders concatenated (evaluation-time "
                   "combination of stored runs); published CIFAR-10 2->10 fine accuracy 79.1 (ViT)")
    trains = False
    components = ("supcon_spread", "cond_autoencoder")
    #: Its components' paper augmentation: the transfer suites' linear head trains on it (``augment_preset: training``).
    defaults = {"paper": {"augment": "simclr", "augment_overrides": {"crop_scale": [0.2, 1.0]}}, "cpu": {}}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        trained = info.extra["components"]
        encoders = [trained[name].backbone for name in self.components]
        super().__init__(ConcatEncoder(encoders).requires_grad_(False).eval(), cfg, info)
