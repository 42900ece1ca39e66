"""MoCo v2 (He et al., CVPR 2020; Chen et al. 2020): momentum key encoder and a queue of negatives."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.distributed import own_rows
from methods.base import Batch, DataInfo, Method, register_method
from methods.heads import make_head
from methods.losses import info_nce
from methods.memory import MomentumEncoder, Queue


@register_method("moco")
class MoCo(Method):
    """InfoNCE (Eq. 1) of a query against its momentum-encoded key and the queued keys.

    Key encoder = EMA of backbone + head (Eq. 2, m = 0.999); keys use shuffle-and-split BN
    (``bn_splits`` groups, Sec. 3.3). MoCo v2's 2-layer MLP head; the L2-normalised head
    output is evaluated as representation ``head`` (kNN with T = 0.07 in CLD's tables).
    """

    description = "MoCo v2: momentum encoder, queue of negatives, InfoNCE (T=0.07), MLP head"
    defaults = {
        "method": {"temperature": 0.07, "queue_size": 4096, "ema": 0.999, "bn_splits": 8, "feat_dim": 128,
                   "head": "mlp", "head_hidden": 512},
        # CLD's CIFAR MoCo recipe: base lr 0.03 per 128 images, bs 256, 5 warm-up epochs then cosine,
        # queue 12,288 (CIFAR-10; the CIFAR-100 suite sets 4,096), MoCo's CIFAR weight decay 5e-4.
        "paper": {"batch_size": 256, "lr": 0.06, "weight_decay": 5e-4, "warmup": 0.025, "min_lr": 1e-6,
                  "augment": "cld", "queue_size": 12288},
        "cpu": {"batch_size": 128, "lr": 0.06, "weight_decay": 5e-4, "warmup": 0.05, "augment": "mild",
                "queue_size": 512, "ema": 0.99, "bn_splits": 4, "head_hidden": 128},
    }
    search_space = {"lr": ("log", 0.01, 0.5), "temperature": ("float", 0.05, 0.5), "ema": ("float", 0.9, 0.999)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.head = make_head(cfg["head"], backbone.out_dim, cfg["feat_dim"], cfg["head_hidden"])
        self.key_encoder = MomentumEncoder(backbone, self.head)
        self.queue = Queue(cfg["queue_size"], cfg["feat_dim"])
        self._keys: torch.Tensor | None = None

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(h), dim=1)

    def contrast(self, queries: list[torch.Tensor], key_view: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE of the queries against the key of ``key_view``; the keys (of the global batch
        under DDP) are enqueued after the step."""
        self._keys = F.normalize(self.key_encoder(key_view, self.cfg["bn_splits"]), dim=1)
        keys = own_rows(self._keys, len(key_view))
        return sum(info_nce(q, keys, self.queue.keys, self.cfg["temperature"]) for q in queries) / len(queries)

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.contrast([self.embed(self.backbone(batch.views[0]))], batch.views[1])

    def after_optimizer_step(self) -> None:
        self.key_encoder.update(self.backbone, self.head, momentum=self.cfg["ema"])
        self.queue.push(self._keys)

    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {"backbone": h, "head": self.embed(h)}
