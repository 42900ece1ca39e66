"""Contrastive Clustering (CC, Li et al., AAAI 2021): instance- and cluster-level contrast of two views."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from harness.engine.distributed import gather_with_grad
from methods.base import Batch, DataInfo, Method, register_method
from methods.heads import mlp
from methods.losses import column_nt_xent, entropy, nt_xent


def cluster_loss(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """CC's cluster-level loss (its "cluster-level contrastive head") on soft assignments p1, p2 (n, M).

    NT-Xent over the 2M cluster columns (cosine, ``temperature``) plus, per view, the
    marginal's entropy gap log M - H(p_v), p_v the column sums normalised to 1 (the
    official code's form of -H(Y): it keeps clusters from collapsing into one).
    """
    gap = sum(math.log(p.shape[1]) - entropy(p.sum(0) / p.sum()) for p in (p1, p2))
    return column_nt_xent(p1, p2, temperature) + gap


@register_method("cc")
class ContrastiveClustering(Method):
    """Instance head: MLP to 128-d, NT-Xent (T=0.5) over 2B views. Cluster head: MLP to M
    clusters + softmax, :func:`cluster_loss` (T=1). Evaluated by the cluster head's argmax."""

    description = "CC: instance NT-Xent + cluster-column NT-Xent with a balance term; argmax cluster head"
    defaults = {
        # num_clusters (M) is a hyperparameter; suites set it per dataset (dataset_config).
        # config/config.yaml: feature_dim 128, instance_temperature 0.5, cluster_temperature 1.0.
        "method": {"num_clusters": 10, "instance_dim": 128, "instance_temperature": 0.5,
                   "cluster_temperature": 1.0},
        # Yunfan-Li/Contrastive-Clustering config/config.yaml: Adam (train.py, no scheduler) lr 3e-4,
        # weight_decay 0, batch 256, 1000 epochs; s=0.5 on CIFAR (train.py): the "cc" jitter; pixels in [0, 1]
        # (modules/transform.py ends at ToTensor(): train.py passes no mean and std).
        "paper": {"optimizer": "adam", "lr": 3e-4, "weight_decay": 0.0, "batch_size": 256,
                  "schedule": "constant", "augment": "cc", "input_norm": "none"},
        "cpu": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 64,
                "schedule": "constant", "augment": "mild"},
    }
    search_space = {"lr": ("log", 1e-4, 1e-2), "instance_temperature": ("float", 0.1, 1.0),
                    "cluster_temperature": ("float", 0.5, 2.0)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        d = backbone.out_dim
        self.instance_head = mlp(d, d, cfg["instance_dim"])
        self.cluster_head = nn.Sequential(mlp(d, d, cfg["num_clusters"]), nn.Softmax(dim=1))

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        h1, h2 = self.encode_views(batch.views[:2])
        # both losses couple the samples of the batch: under DDP they see the global batch
        z1, z2, p1, p2 = (gather_with_grad(head(h)) for head in (self.instance_head, self.cluster_head) for h in (h1, h2))
        instance = nt_xent(z1, z2, self.cfg["instance_temperature"])
        cluster = cluster_loss(p1, p2, self.cfg["cluster_temperature"])
        return instance + cluster, {"instance_loss": instance.detach(), "cluster_loss": cluster.detach()}

    def cluster_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cluster": self.cluster_head(self.backbone(x))}
