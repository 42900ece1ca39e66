"""Reference rows every leaderboard needs: raw pixels, a random encoder, supervised training."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.models.backbones import Flatten
from methods.base import Batch, DataInfo, Method, register_method


@register_method("pixels")
class Pixels(Method):
    """Raw normalised pixels as features, no training (the floor a method must beat)."""

    description = "raw pixels as features, no training"
    trains = False

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(Flatten(math.prod(info.image_shape)), cfg, info)


@register_method("random")
class RandomInit(Method):
    """The backbone at its random initialisation, no training."""

    description = "randomly initialised backbone, no training"
    trains = False


@register_method("supervised")
class Supervised(Method):
    """Cross-entropy on the fine training labels: the upper bound with full supervision."""

    description = "cross-entropy on fine train labels (upper bound)"
    label_level = "fine"
    defaults = {
        "paper": {"batch_size": 256, "lr": 0.1, "weight_decay": 5e-4, "views": 1, "augment": "probe"},
        "cpu": {"batch_size": 128, "lr": 0.05, "weight_decay": 5e-4, "views": 1, "augment": "mild"},
    }
    search_space = {"lr": ("log", 1e-3, 0.5), "weight_decay": ("log", 1e-6, 1e-3)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.classifier = nn.Linear(backbone.out_dim, info.num_classes)

    def training_step(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.classifier(self.backbone(batch.views[0])), batch.labels)
