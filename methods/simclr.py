"""SimCLR (Chen et al., ICML 2020): NT-Xent between two augmented views through an MLP projector.

Under DDP the projections are gathered, so the negatives are those of the global batch (Sec. 2.2).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.engine.distributed import gather_with_grad
from methods.base import Batch, DataInfo, Method, register_method
from methods.heads import mlp
from methods.losses import nt_xent


@register_method("simclr")
class SimCLR(Method):
    """Two views, a 2-layer MLP projector, NT-Xent with temperature 0.5 (the CIFAR setting)."""

    description = "SimCLR: NT-Xent (T=0.5) on an MLP projection of two views"
    defaults = {
        "method": {"temperature": 0.5, "proj_dim": 128, "proj_hidden": 512},
        # SimCLR's CIFAR-10 recipe as in its appendix B.9 (SGD variant used by solo-learn-style baselines).
        "paper": {"batch_size": 512, "lr": 0.6, "weight_decay": 1e-6, "warmup": 0.01, "augment": "simclr"},
        "cpu": {"batch_size": 128, "lr": 0.1, "weight_decay": 1e-5, "augment": "mild", "proj_hidden": 128},
    }
    search_space = {"lr": ("log", 0.01, 1.0), "temperature": ("float", 0.1, 1.0)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.projector = mlp(backbone.out_dim, cfg["proj_hidden"], cfg["proj_dim"])

    def training_step(self, batch: Batch) -> torch.Tensor:
        z1, z2 = (gather_with_grad(self.projector(h)) for h in self.encode_views(batch.views[:2]))
        return nt_xent(z1, z2, self.cfg["temperature"])
