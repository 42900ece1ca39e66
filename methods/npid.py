"""NPID (Wu et al., CVPR 2018): non-parametric instance discrimination with a memory bank."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.engine.distributed import all_gather_cat
from methods.base import Batch, DataInfo, Method, register_method
from methods.heads import HEADS, make_head
from methods.memory import MemoryBank

BANK_UPDATES = ("in_backward", "after_step")


@register_method("npid")
class NPID(Method):
    """Each image is its own class; its prototype is the bank entry M[i] (Eq. 2).

    The loss is cross-entropy of f_i M^T / T against i over the whole bank (the full softmax
    of lemniscate's CIFAR command and of CLD's CIFAR scripts, ``nce_k: 0``), or NPID's NCE
    approximation with ``nce_k`` uniform noise samples (Sec. 3.2) for large N. Features are the
    L2-normalised 128-d output of a linear head, evaluated as representation ``head`` (weighted
    kNN in the paper).

    ``bank_update`` matters only with several views. ``in_backward`` is the official op
    (``LinearAverage`` in lemniscate.pytorch and CLD-UnsupervisedLearning, lib/LinearAverage.py),
    which updates the bank inside backward, one view at a time: autograd runs the last view's op
    first, so the views update the bank last to first, and each earlier view's gradient already
    reads the batch's bank rows as updated by the later views. ``after_step``: every view's
    gradient reads the bank of the forward pass; the views update it first to last after the step.
    """

    description = "NPID: memory-bank instance discrimination, full softmax over N (T=0.1)"
    defaults = {
        "method": {"temperature": 0.1, "feat_dim": 128, "bank_momentum": 0.5, "nce_k": 0,
                   "head": "linear", "head_hidden": 512, "bank_update": "after_step"},
        # lemniscate.pytorch's own CIFAR-10 recipe (cifar.py; README: --nce-k 0 --nce-t 0.1 --lr 0.03):
        # bs 128, SGD lr 0.03, momentum 0.9, wd 5e-4, x0.1 at epochs 120 and 160 of 200, one view,
        # RandomHorizontalFlip commented out. CLD's NPID row is npid_cld with cld_weight 0 (suites).
        "paper": {"batch_size": 128, "lr": 0.03, "weight_decay": 5e-4, "schedule": "step",
                  "milestones": [0.6, 0.8], "views": 1, "augment": "cld", "augment_overrides": {"flip": 0.0},
                  "bank_update": "in_backward"},
        # Digits (1,300 images, 15 epochs): at T=0.1 and lr 0.06 the randomly initialised bank's targets
        # wreck the encoder before the bank holds real features (kNN 75.8 vs 95.5 for the random encoder),
        # so a softer softmax, a smaller lr and a warm-up of 3 epochs while the bank fills.
        "cpu": {"batch_size": 128, "lr": 0.02, "weight_decay": 5e-4, "warmup": 0.2, "views": 1,
                "augment": "mild", "temperature": 0.5},
    }
    search_space = {"lr": ("log", 0.01, 0.5), "temperature": ("float", 0.05, 0.5)}
    choices = {"bank_update": BANK_UPDATES, "head": HEADS}
    ranges = {"bank_momentum": (0.0, 1.0)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.head = make_head(cfg["head"], backbone.out_dim, cfg["feat_dim"], cfg["head_hidden"])
        self.bank = MemoryBank(info.num_samples, cfg["feat_dim"], cfg["bank_momentum"])
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(h), dim=1)

    def view_loss(self, f: torch.Tensor, index: torch.Tensor, batch_rows: torch.Tensor,
                  row_shift: torch.Tensor | None) -> torch.Tensor:
        """NPID's loss of one view. Its value reads the bank M; with the full softmax and a
        ``row_shift``, its gradient reads M + ``row_shift`` at the columns ``batch_rows`` (the bank
        the official op holds when this view's backward runs)."""
        temperature = self.cfg["temperature"]
        if self.cfg["nce_k"] > 0:  # the official NCE op saves its rows at forward time: no shift
            noise = torch.randint(len(self.bank.memory), (len(f), self.cfg["nce_k"]), device=f.device)
            return self.bank.nce_loss(f, index, noise, temperature)
        logits = self.bank.logits(f, temperature)
        if row_shift is not None:
            shift = f @ row_shift.t().to(f.dtype) / temperature  # zero in value, row_shift / T in gradient
            logits = logits.index_add(1, batch_rows, shift - shift.detach())
        return F.cross_entropy(logits, index)

    def instance_losses(self, views: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """NPID's loss of each view's features; the bank rows of the (global, under DDP) batch after
        every view's update are computed here and written by ``after_optimizer_step``."""
        batch_rows = all_gather_cat(index)
        features = [all_gather_cat(f.detach()) for f in views]
        in_backward = self.cfg["bank_update"] == "in_backward"
        before = rows = self.bank.memory[batch_rows]
        losses = {}
        for v in (reversed(range(len(views))) if in_backward else range(len(views))):
            shift = rows - before if in_backward and rows is not before else None
            losses[v] = self.view_loss(views[v], index, batch_rows, shift)
            rows = self.bank.mixed(rows, features[v])
        self._pending = (batch_rows, rows)
        return [losses[v] for v in range(len(views))]

    def training_step(self, batch: Batch) -> torch.Tensor:
        losses = self.instance_losses([self.embed(h) for h in self.encode_views(batch.views)], batch.index)
        return sum(losses) / len(losses)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self._pending is not None:
            batch_rows, rows = self._pending
            self.bank.memory[batch_rows] = rows
            self._pending = None

    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {"backbone": h, "head": self.embed(h)}
