"""CLD (Wang, Liu, Yu, CVPR 2021): cross-level instance-group discrimination on top of NPID and MoCo.

A second 128-d "group" head sits beside the instance head. In each batch, each view's group
features are clustered by k-means; each view's features are then classified against the other
view's centroids, with the other view's cluster labels as targets (official CIFAR scripts).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.engine.distributed import gather_with_grad
from methods.base import Batch, DataInfo, register_method
from methods.heads import HEADS, make_head
from methods.moco import MoCo
from methods.npid import NPID


def batch_kmeans(x: torch.Tensor, k: int, iters: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on one batch, as CLD's ``KMeans``: the first ``k`` rows are the initial centroids.

    Each iteration assigns rows to the nearest centroid (Euclidean) and recomputes centroids as
    plain means, which stay differentiable in ``x``; an empty cluster's centroid is zero.
    Returns the last labels (n,) and the centroids (k, d) computed from them.
    """
    centroids = x[:k]
    for _ in range(iters):
        labels = torch.cdist(x.detach(), centroids.detach()).argmin(1)
        onehot = F.one_hot(labels, k).to(x.dtype)
        centroids = onehot.t() @ x / onehot.sum(0).clamp_min(1)[:, None]
    return labels, centroids


def cld_loss(g1: torch.Tensor, g2: torch.Tensor, k: int, temperature: float, iters: int = 5) -> torch.Tensor:
    """L_CLD = 1/2 [CE(g1 C2^T / tau, y2) + CE(g2 C1^T / tau, y1)] for L2-normalised group features.

    (y_v, C_v) = k-means labels and centroids of view v's batch; tau = 0.2 in CLD.
    """
    y1, c1 = batch_kmeans(g1, k, iters)
    y2, c2 = batch_kmeans(g2, k, iters)
    return (F.cross_entropy(g1 @ c2.t() / temperature, y2) + F.cross_entropy(g2 @ c1.t() / temperature, y1)) / 2


class CLDBranch(nn.Module):
    """The group head (linear or NormLinear, then L2 norm) and its weighted cross-level loss.

    With ``cld_weight: 0`` the branch is built (its initialisation draws from the seeded RNG, as the
    official baseline scripts' models do) but frozen: the loss skips it, and every trainable parameter
    must get a gradient each step for DDP to run without ``find_unused_parameters``."""

    def __init__(self, in_dim: int, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = make_head(cfg["group_head"], in_dim, cfg["feat_dim"], cfg["head_hidden"])
        self.requires_grad_(cfg["cld_weight"] != 0)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        g1, g2 = (gather_with_grad(F.normalize(self.head(h), dim=1)) for h in (h1, h2))  # global batch under DDP
        return cld_loss(g1, g2, self.cfg["clusters"], self.cfg["cld_temperature"], self.cfg["kmeans_iters"])


CLD_KEYS = {"clusters": 128, "cld_weight": 1.0, "cld_temperature": 0.2, "kmeans_iters": 5, "group_head": "linear"}
CLD_SEARCH = {"cld_weight": ("log", 0.1, 2.0), "clusters": ("int", 8, 256)}


@register_method("npid_cld")
class NPIDCLD(NPID):
    """NPID + CLD: L = mean over two views of NPID's loss (both views update the bank) + lambda L_CLD.

    With ``cld_weight: 0`` the group branch is skipped: CLD's NPID baseline (its script with the
    CLD term off; the branch would get no gradient).
    """

    description = "NPID+CLD: memory-bank instance loss + cross-view batch k-means group loss"
    defaults = {
        "method": {**NPID.defaults["method"], **CLD_KEYS},
        # CLD-UnsupervisedLearning, scripts/cifar/train_cifar10_npid_cld.sh with train_cifar_npid_cld.py:
        # bs 256, SGD lr 0.03 x 256/128, momentum 0.9, wd 7e-4, 5 warm-up epochs (from lr/100) then
        # cosine per iteration to 1e-6 (lib/lr_scheduler.py), two views, full softmax (nce_k 0), T 0.1,
        # bank momentum 0.5 updated in backward (lib/LinearAverage.py), K=128 (CIFAR-100: 200),
        # 5 k-means iterations, cld_t 0.2, lambda 1, nn.Linear heads, the "cld" augmentation
        # (datasets/dataloader.py).
        "paper": {"batch_size": 256, "lr": 0.06, "weight_decay": 7e-4, "warmup": 0.025, "warmup_start": 0.01,
                  "min_lr": 1e-6, "views": 2, "augment": "cld", "bank_update": "in_backward"},
        "cpu": {**NPID.defaults["cpu"], "views": 2, "clusters": 16},
    }
    search_space = {**NPID.search_space, **CLD_SEARCH}
    choices = {**NPID.choices, "group_head": HEADS}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.cld = CLDBranch(backbone.out_dim, cfg)

    def training_step(self, batch: Batch) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        h1, h2 = self.encode_views(batch.views[:2])
        instance = sum(self.instance_losses([self.embed(h1), self.embed(h2)], batch.index)) / 2
        if self.cfg["cld_weight"] == 0:
            return instance
        cld = self.cld(h1, h2)
        return instance + self.cfg["cld_weight"] * cld, {"cld": cld.detach()}


@register_method("moco_cld")
class MoCoCLD(MoCo):
    """MoCo + CLD: two queries and one key (three views); L = mean InfoNCE of both queries + lambda L_CLD.

    With ``cld_weight: 0`` the group branch is skipped: CLD's MoCo baseline (its script with the
    CLD term off).
    """

    split_queries = False  # train_cifar_moco_cld.py: plain BatchNorm over the whole batch of each query view
    description = "MoCo+CLD: momentum-queue InfoNCE of two queries + cross-view batch k-means group loss"
    defaults = {
        "method": {**MoCo.defaults["method"], **CLD_KEYS},
        # CLD-UnsupervisedLearning, scripts/cifar/train_cifar10_moco_cld.sh with train_cifar_moco_cld.py:
        # bs 256 on one GPU, lr 0.03 x 256/128, momentum 0.9, wd 8e-4, 5 warm-up epochs (from lr/100) then cosine per
        # iteration to 1e-6, three views (two queries, one key), T 0.07, queue 12,288 initialised uniform
        # in +-1/sqrt(d/3) (lib/NCEAverage.py MemoryMoCo), EMA 0.999, key BN over the whole 256-key batch
        # (DistributedShufle on one GPU is a plain permutation), --normlinear instance and group heads,
        # K=200, lambda 0.8, cld_t 0.2, 5 k-means iterations; --aug-plus: MoCo v2's augmentation with
        # crops of 0.2-1 (datasets/dataloader.py), here "simclr_blur" with crop_scale 0.2-1; --erasing:
        # RandomErasing(p=1.0) after normalisation (its defaults: scale 0.02-0.33, ratio 0.3-3.3, value 0).
        # CIFAR-100 (suite overrides): bs 128, lr 0.03, wd 7e-4, K=100, lambda 0.25, queue 4,096, the "cld"
        # augmentation without erasing.
        "paper": {"batch_size": 256, "lr": 0.06, "weight_decay": 8e-4, "warmup": 0.025, "warmup_start": 0.01,
                  "min_lr": 1e-6, "views": 3, "augment": "simclr_blur",
                  "augment_overrides": {"crop_scale": [0.2, 1.0], "erasing": 1.0},
                  "temperature": 0.07, "queue_size": 12288, "queue_init": "uniform", "ema": 0.999,
                  "bn_splits": 1, "head": "normlinear", "group_head": "normlinear", "clusters": 200,
                  "cld_weight": 0.8},
        "cpu": {**MoCo.defaults["cpu"], "views": 3, "clusters": 16},
    }
    search_space = {**MoCo.search_space, **CLD_SEARCH}
    choices = {**MoCo.choices, "group_head": HEADS}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.cld = CLDBranch(backbone.out_dim, cfg)

    def training_step(self, batch: Batch) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        h1, h2 = self.encode_views(batch.views[:2])
        instance = self.contrast([self.embed(h1), self.embed(h2)], batch.views[2])
        if self.cfg["cld_weight"] == 0:
            return instance
        cld = self.cld(h1, h2)
        return instance + self.cfg["cld_weight"] * cld, {"cld": cld.detach()}
