"""MoCo (He et al., CVPR 2020; v2: Chen et al. 2020): momentum key encoder and a queue of negatives."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.engine.distributed import get_world_size, own_rows
from harness.errors import UsageError
from harness.models.batchnorm import batchnorm_groups, split_batchnorms
from methods.base import Batch, DataInfo, Method, register_method
from methods.heads import HEADS, make_head
from methods.losses import info_nce
from methods.memory import QUEUE_INITS, MomentumEncoder, Queue


@register_method("moco")
class MoCo(Method):
    """InfoNCE (Eq. 1) of a query against its momentum-encoded key and the queued keys.

    Key encoder = EMA of backbone + head (Eq. 2); keys use shuffle-and-split BN (``bn_splits``
    groups, Sec. 3.3); ``queue_init`` sets the random keys the queue starts with. The
    L2-normalised head output is evaluated as representation ``head`` (weighted kNN).
    The query's backbone normalises ``bn_splits`` groups apart as well (:attr:`split_queries`).
    """

    #: The query's backbone BatchNorms normalise ``bn_splits`` groups of the batch apart and keep the mean of
    #: the groups' running statistics, as the ``SplitBatchNorm`` of MoCo's CIFAR-10 demo does in both encoders
    #: (on one GPU, the per-GPU BatchNorm of the paper's 8 GPUs). CLD's MoCo normalises its queries over the
    #: whole batch.
    split_queries = True

    description = "MoCo: momentum encoder, queue of negatives, InfoNCE; MoCo's CIFAR-10 demo recipe at paper scale"
    defaults = {
        "method": {"temperature": 0.07, "queue_size": 4096, "ema": 0.999, "bn_splits": 8, "feat_dim": 128,
                   "head": "mlp", "head_hidden": 512, "queue_init": "normal"},
        # MoCo's official CIFAR-10 demo (facebookresearch/moco, branch colab-notebook,
        # colab/moco_cifar10_demo.ipynb; kNN 82.6 at 200 epochs, asymmetric loss): ResNet-18 whose fc
        # is the 128-d head, bs 512, lr 0.06, wd 5e-4, cosine, T 0.1, queue 4,096, m 0.99,
        # SplitBatchNorm with 8 groups, SimCLR's CIFAR augmentation; queue drawn as moco/builder.py.
        # CLD's MoCo row is moco_cld with cld_weight 0 (suites).
        "paper": {"batch_size": 512, "lr": 0.06, "weight_decay": 5e-4, "augment": "simclr", "temperature": 0.1,
                  "ema": 0.99, "head": "linear", "lr_update": "epoch_end"},
        "cpu": {"batch_size": 128, "lr": 0.06, "weight_decay": 5e-4, "warmup": 0.05, "augment": "mild",
                "queue_size": 512, "ema": 0.99, "bn_splits": 4, "head_hidden": 128},
    }
    search_space = {"lr": ("log", 0.01, 0.5), "temperature": ("float", 0.05, 0.5), "ema": ("float", 0.9, 0.999)}
    choices = {"head": HEADS, "queue_init": QUEUE_INITS}
    ranges = {"ema": (0.0, 1.0)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.head = make_head(cfg["head"], backbone.out_dim, cfg["feat_dim"], cfg["head_hidden"])
        self.key_encoder = MomentumEncoder(backbone, self.head)
        self.queue = Queue(cfg["queue_size"], cfg["feat_dim"], cfg["queue_init"])
        self._keys: torch.Tensor | None = None
        self.query_splits = 1
        if self.split_queries and cfg["bn_splits"] > 1:
            self.check_config(cfg, get_world_size())
            self.query_splits = cfg["bn_splits"] // get_world_size()  # this rank's rows hold its share of the groups
            split_batchnorms(backbone)

    @classmethod
    def check_config(cls, cfg: dict, world: int = 1) -> None:
        """The query groups (:attr:`split_queries`) are of equal size, as the demo's, and each rank normalises its
        own share of them."""
        if not cls.split_queries or cfg["bn_splits"] == 1:
            return
        if cfg["batch_size"] % cfg["bn_splits"]:
            raise UsageError(f"batch_size {cfg['batch_size']} does not split into bn_splits {cfg['bn_splits']} "
                             f"equal groups of queries; use a multiple of {cfg['bn_splits']}")
        if cfg["bn_splits"] % world:
            raise UsageError(f"bn_splits {cfg['bn_splits']} does not split over {world} ranks (each rank "
                             f"normalises its own groups of queries); use a multiple of {world}")

    def encode_query(self, view: torch.Tensor) -> torch.Tensor:
        """The backbone's features of the query view, ``bn_splits`` groups normalised apart (:attr:`split_queries`)."""
        with batchnorm_groups(self.backbone, self.query_splits, average_running_stats=True):
            return self.backbone(view)

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(h), dim=1)

    def contrast(self, queries: list[torch.Tensor], key_view: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE of the queries against the key of ``key_view``; the keys (of the global batch
        under DDP) are enqueued after the step."""
        self._keys = F.normalize(self.key_encoder(key_view, self.cfg["bn_splits"]), dim=1)
        keys = own_rows(self._keys, len(key_view))
        return sum(info_nce(q, keys, self.queue.keys, self.cfg["temperature"]) for q in queries) / len(queries)

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.contrast([self.embed(self.encode_query(batch.views[0]))], batch.views[1])

    def after_optimizer_step(self) -> None:
        self.key_encoder.update(self.backbone, self.head, momentum=self.cfg["ema"])
        self.queue.push(self._keys)

    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {"backbone": h, "head": self.embed(h)}
