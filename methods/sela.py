"""SeLa, self-labelling (Asano et al., ICLR 2020): cross-entropy on equipartitioned Sinkhorn pseudo-labels."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.data.augment import Augmenter, get_preset
from methods.base import Batch, DataInfo, Method, register_method
from methods.sinkhorn import sinkhorn_knopp


LABEL_PASSES = ("official", "plain")


@register_method("sela")
class SeLa(Method):
    """``num_heads`` linear heads of ``num_clusters`` clusters on the backbone, each trained with
    cross-entropy against its own pseudo-labels (Sec. 3.1-3.3, Eq. 6). Labels start as a random
    balanced assignment and are re-solved by Sinkhorn-Knopp with ``lam`` on the logits of the
    whole training set every ``label_every`` epochs (official CIFAR: 400 optimisations in 400
    epochs, each for one head in turn; ImageNet: 100 in 400, all heads). The first head is
    exposed as a cluster head (K clusters, compared with C classes by NMI/AMI/ARI).

    ``label_pass`` says how the features for Sinkhorn-Knopp are computed: ``official`` as
    self-label's cifar.py ``opt_sk`` (called inside the training loop, with the network in train
    mode, on the training loader with ``transform_train``): train mode (BatchNorm normalises with,
    and updates, batch statistics) on augmented images, the training augmentation drawn afresh
    with a generator seeded by (run seed, epoch); ``plain``: eval mode on the unaugmented images.
    """

    description = "SeLa: CE on Sinkhorn-Knopp equipartitioned pseudo-labels, several clustering heads"
    defaults = {
        # CIFAR settings of the official scripts/cifar.sh and cifar.py; ImageNet: K=3000, lam=25,
        # label_every=4, cycle_heads=False, sk_tol=0.1 (main.py / sinkhornknopp.py).
        "method": {"num_clusters": 128, "num_heads": 10, "lam": 10.0, "label_every": 1,
                   "cycle_heads": True, "sk_tol": 1e-2, "label_pass": "plain"},
        # self-label scripts/cifar.sh + cifar.py: bs 128, SGD lr 0.03, momentum 0.9, wd 5e-4, 400 epochs
        # with lr x0.1 at 240 and 320 (adjust_learning_rate), ColorJitter(0.4, 0.4, 0.4, 0.4) on every
        # image (transform_train), Sinkhorn features in train mode on augmented images (opt_sk).
        "paper": {"batch_size": 128, "optimizer": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "step", "milestones": [0.6, 0.8], "views": 1, "augment": "cld",
                  "label_pass": "official"},
        "cpu": {"batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                "schedule": "cosine", "views": 1, "augment": "mild", "num_clusters": 30, "num_heads": 3,
                "cycle_heads": False},
    }
    search_space = {"lr": ("log", 0.005, 0.2), "num_clusters": ("categorical", [16, 32, 64, 128]),
                    "lam": ("float", 5.0, 30.0)}
    choices = {"label_pass": LABEL_PASSES}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        k, n = cfg["num_clusters"], info.num_samples
        self.heads = nn.ModuleList(nn.Linear(backbone.out_dim, k) for _ in range(cfg["num_heads"]))
        self.register_buffer("labels", torch.stack([torch.randperm(n) % k for _ in self.heads]))

    def label_features(self, epoch: int, loader) -> torch.Tensor:
        """Backbone features of the whole training set, returned in index order, for the labelling pass."""
        if self.cfg["label_pass"] == "plain":
            self.eval()
            features = torch.cat([self.backbone(x).float() for x, _ in loader])
            self.train()
            return features
        # the harness's loader holds the uint8 training images and the run's augmenter (normalisation, flip, size)
        source = loader.augmenter
        augment = Augmenter(get_preset(self.cfg["augment"], **self.cfg["augment_overrides"]),
                            source.mean.flatten().tolist(), source.std.flatten().tolist(),
                            allow_flip=source.allow_flip, out_size=source.out_size)
        generator = torch.Generator().manual_seed((torch.initial_seed() * 1_000_003 + epoch) % 2**63)
        # in a shuffled order, as cifar.py's pass over its shuffling trainloader: train-mode BatchNorm normalises
        # each batch by its own statistics, so which images share a batch matters
        order = torch.randperm(len(loader.images), generator=generator).to(loader.images.device)
        shuffled = torch.cat([self.backbone(augment(loader.images[batch], generator)).float()
                              for batch in order.split(loader.batch_size)])
        return torch.empty_like(shuffled).index_copy_(0, order, shuffled)

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, loader) -> None:
        every = self.cfg["label_every"]
        if epoch % every:
            return
        features = self.label_features(epoch, loader)
        heads = [epoch // every % len(self.heads)] if self.cfg["cycle_heads"] else range(len(self.heads))
        for h in heads:
            self.labels[h] = sinkhorn_knopp(self.heads[h](features), self.cfg["lam"], tol=self.cfg["sk_tol"]).labels

    def training_step(self, batch: Batch) -> torch.Tensor:
        h = self.backbone(batch.views[0])
        return torch.stack([F.cross_entropy(head(h), self.labels[i, batch.index])
                            for i, head in enumerate(self.heads)]).mean()

    def cluster_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cluster": self.heads[0](self.backbone(x))}
