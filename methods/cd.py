"""Contrastive Disentangling (CD, arXiv 2409.04867): CC's instance contrast plus feature heads, no class count."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from harness.engine.distributed import gather_with_grad
from methods.base import Batch, DataInfo, Method, register_method
from methods.heads import mlp
from methods.losses import column_nt_xent, entropy, nt_xent


def feature_loss(f1: torch.Tensor, f2: torch.Tensor, temperature: float) -> torch.Tensor:
    """CD's feature-level loss on sigmoid head outputs f1, f2 (n, F) (Sec. 3; official ``FeatureLoss``).

    NT-Xent over the 2F head columns (head j of one view is positive with head j of the
    other; cosine, ``temperature``) minus the mean binary entropy of every output, in bits
    (entropy / log 2), averaged over the two views: it pushes each head to a confident 0/1 split.
    """
    bits = sum(entropy(torch.stack([f, 1 - f], -1)).mean() for f in (f1, f2)) / (2 * math.log(2))
    return column_nt_xent(f1, f2, temperature) - bits


@register_method("cd")
class ContrastiveDisentangling(Method):
    """CC's backbone and instance head (first layer BN, no bias), NT-Xent (T=0.5), plus a
    predictor of F independent sigmoid feature heads on the instance output, :func:`feature_loss`
    (T=1). Evaluated by k-means on the backbone and, as ``head``, on the F head outputs."""

    description = "CD: instance NT-Xent + NT-Xent over sigmoid feature-head columns with a binary-entropy bonus"
    defaults = {
        # config/config.yaml: feature_num 128, hidden_dim 128, instance_temperature 0.5, feature_temperature 1.0
        "method": {"num_features": 128, "instance_dim": 128, "instance_temperature": 0.5,
                   "feature_temperature": 1.0},
        # Hoper-J/Contrastive-Disentangling config/config.yaml: Adam (train.py) lr 3e-4, weight_decay 0,
        # batch 128, 1000 epochs, use_scheduler false (constant lr since commit 79560b4, 2024-08-12; true
        # would mean CosineAnnealingLR(T_max=epochs)); s=0.5 on CIFAR: the "cc" jitter (dataset.py); pixels in
        # [0, 1] (dataset.py's transforms end at ToTensor()).
        "paper": {"optimizer": "adam", "lr": 3e-4, "weight_decay": 0.0, "batch_size": 128,
                  "schedule": "constant", "augment": "cc", "input_norm": "none"},
        "cpu": {"optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0, "batch_size": 128,
                "schedule": "cosine", "augment": "mild"},
    }
    search_space = {"lr": ("log", 1e-4, 1e-2), "num_features": ("categorical", [32, 64, 128, 256]),
                    "feature_temperature": ("float", 0.5, 2.0)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        d, z = backbone.out_dim, cfg["instance_dim"]
        self.instance_head = mlp(d, d, z, bn=True)
        self.feature_head = nn.Sequential(mlp(z, d, cfg["num_features"], bn=True, out_bn=True), nn.Sigmoid())

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        z1, z2 = (self.instance_head(h) for h in self.encode_views(batch.views[:2]))
        f1, f2 = (gather_with_grad(self.feature_head(z)) for z in (z1, z2))  # global batch under DDP
        instance = nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.cfg["instance_temperature"])
        feature = feature_loss(f1, f2, self.cfg["feature_temperature"])
        return instance + feature, {"instance_loss": instance.detach(), "feature_loss": feature.detach()}

    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {"backbone": h, "head": self.feature_head(self.instance_head(h))}
