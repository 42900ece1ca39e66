"""NPID (Wu et al., CVPR 2018): non-parametric instance discrimination with a memory bank."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.distributed import all_gather_cat
from methods.base import Batch, DataInfo, Method, register_method
from methods.heads import make_head
from methods.memory import MemoryBank


@register_method("npid")
class NPID(Method):
    """Each image is its own class; its prototype is the bank entry M[i] (Eq. 2).

    The loss is cross-entropy of f_i M^T / T against i over the whole bank (the full
    softmax the CLD CIFAR scripts use, ``nce_k: 0``), or NPID's NCE approximation with
    ``nce_k`` uniform noise samples (Sec. 3.2) for large N. Features are the L2-normalised
    128-d output of a linear head, evaluated as representation ``head`` (weighted kNN in the paper).
    """

    description = "NPID: memory-bank instance discrimination, full softmax over N (T=0.1)"
    defaults = {
        "method": {"temperature": 0.1, "feat_dim": 128, "bank_momentum": 0.5, "nce_k": 0,
                   "head": "linear", "head_hidden": 512},
        # CLD's CIFAR NPID recipe (its NPID row, 80.8 kNN on CIFAR-10): bs 256, lr 0.03 x 256/128,
        # 5 warm-up epochs then cosine per iteration; NPID's weight decay 5e-4 and single view.
        "paper": {"batch_size": 256, "lr": 0.06, "weight_decay": 5e-4, "warmup": 0.025, "min_lr": 1e-6,
                  "views": 1, "augment": "cld"},
        # Digits (1,300 images, 15 epochs): at T=0.1 and lr 0.06 the randomly initialised bank's targets
        # wreck the encoder before the bank holds real features (kNN 75.8 vs 95.5 for the random encoder),
        # so a softer softmax, a smaller lr and a warm-up of 3 epochs while the bank fills.
        "cpu": {"batch_size": 128, "lr": 0.02, "weight_decay": 5e-4, "warmup": 0.2, "views": 1,
                "augment": "mild", "temperature": 0.5},
    }
    search_space = {"lr": ("log", 0.01, 0.5), "temperature": ("float", 0.05, 0.5)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.head = make_head(cfg["head"], backbone.out_dim, cfg["feat_dim"], cfg["head_hidden"])
        self.bank = MemoryBank(info.num_samples, cfg["feat_dim"], cfg["bank_momentum"])
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(h), dim=1)

    def instance_loss(self, f: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """NPID's loss for one view; the bank update (of the global batch under DDP) waits for ``after_optimizer_step``."""
        self._pending.append((all_gather_cat(index), all_gather_cat(f.detach())))
        if self.cfg["nce_k"] > 0:
            noise = torch.randint(len(self.bank.memory), (len(f), self.cfg["nce_k"]), device=f.device)
            return self.bank.nce_loss(f, index, noise, self.cfg["temperature"])
        return F.cross_entropy(self.bank.logits(f, self.cfg["temperature"]), index)

    def training_step(self, batch: Batch) -> torch.Tensor:
        views = [self.embed(self.backbone(v)) for v in batch.views]
        return sum(self.instance_loss(f, batch.index) for f in views) / len(views)

    def after_optimizer_step(self) -> None:
        for index, f in self._pending:  # every view updates the bank, in order
            self.bank.update(index, f)
        self._pending.clear()

    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {"backbone": h, "head": self.embed(h)}
