"""InvCls (Liu et al., AAAI 2021): a one-million-way instance classifier for unsupervised representations.

Every training image is a class. Logits are cosines between the MLP head's 128-d output and
the class weights W (N x 128), divided by tau = 0.15. Three pieces from the paper:
  * contrastive prior (raw-feature initialisation): before training, w_i <- normalise(z_i) from
    one pass of the randomly initialised network, frozen except BatchNorm running statistics;
  * smoothing of the hardest classes: target 1 - alpha on the own class and alpha / K on the K
    other classes with the highest logits;
  * hybrid parallelism for large N: W sharded by class across ranks, features all-gathered,
    the softmax normaliser from an all-reduce of max and sum-exp (:func:`sharded_instance_loss`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from harness.engine import distributed
from harness.engine.distributed import all_gather_cat
from methods.base import Batch, DataInfo, Method, register_method
from methods.heads import mlp


def hardest_classes(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (n, k) of each row's k highest logits other than its own class ``targets``."""
    top = logits.detach().topk(k + 1, dim=1).indices
    keep = top != targets[:, None]
    keep &= keep.cumsum(1) <= k  # drop the own class, or the (k+1)-th when the own class is not among them
    # the k kept columns in order, by a stable sort of the flags (a boolean index would make the host wait)
    return top.gather(1, (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :k])


def smoothed_instance_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """Cross-entropy against the hardest-class-smoothed target q (InvCls Sec. "Smoothing labels of hardest classes").

    q = 1 - alpha on ``targets``, alpha / k on :func:`hardest_classes`, 0 elsewhere; since q sums
    to one, -sum_j q_j log p_j = logsumexp(l) - (1 - alpha) l_y - alpha / k sum_hard l_j,
    which needs no dense (n, N) target. ``k = 0`` is plain cross-entropy.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    if k > 0 and alpha > 0:
        hard = logits.gather(1, hardest_classes(logits, targets, k)).mean(1)
        target_logit = (1 - alpha) * target_logit + alpha * hard
    return (logits.logsumexp(1) - target_logit).mean()


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized row blocks; the backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rows = group, len(x)
        return all_gather_cat(x, group, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


class _ShardedSmoothedCE(torch.autograd.Function):
    """:func:`smoothed_instance_loss` over classes split across ranks; ``logits`` (n, N_r) are this rank's columns.

    Forward all-reduces the row max, the sum of exp and the target-weighted logits; the backward
    is local: d loss / d logits = (softmax - q) / n on this rank's columns.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, offset: int, alpha: float, k: int, group):
        ctx.dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        n, width = logits.shape
        rows = torch.arange(n, device=logits.device)
        own = (targets >= offset) & (targets < offset + width)
        own_rows, own_cols = rows[own], targets[own] - offset
        q = torch.zeros_like(logits)
        if k > 0 and alpha > 0:  # global top-k of the other classes = top-k of the ranks' local top-k
            candidates = logits.clone()
            candidates[own_rows, own_cols] = float("-inf")
            values, columns = candidates.topk(k, dim=1)
            values, columns = all_gather_cat(values, group, dim=1), all_gather_cat(columns + offset, group, dim=1)
            hard = columns.gather(1, values.topk(k, dim=1).indices) - offset
            mine = (hard >= 0) & (hard < width)
            q[rows[:, None].expand_as(hard)[mine], hard[mine]] = alpha / k
            q[own_rows, own_cols] = 1 - alpha
        else:
            q[own_rows, own_cols] = 1.0
        row_max = logits.max(1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - row_max[:, None]).exp()
        sum_exp = exp.sum(1)
        dist.all_reduce(sum_exp, group=group)
        target_logit = (q * logits).sum(1)
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(exp / sum_exp[:, None] - q)
        return (row_max + sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (softmax_minus_q,) = ctx.saved_tensors
        return (softmax_minus_q * (grad / len(softmax_minus_q))).to(ctx.dtype), None, None, None, None, None


def sharded_instance_loss(z: torch.Tensor, targets: torch.Tensor, weight_shard: torch.Tensor, offset: int,
                          temperature: float, alpha: float, k: int, group=None) -> torch.Tensor:
    """InvCls's loss with W sharded by class across the ranks of ``group`` (hybrid parallelism).

    Each rank passes its local batch (``z`` (n, d) head outputs, ``targets`` global image ids; the
    same n on every rank) and its shard of W, rows ``offset .. offset + len(weight_shard)``
    (at least ``k`` rows per shard).
    Features and targets are all-gathered, each rank computes the cosine logits of the whole
    batch against its classes, and the softmax normaliser comes from an all-reduce of the row max
    and the sum of exponentials. Returns the global batch mean, equal on every rank to the dense
    loss; gradients of ``weight_shard`` and ``z`` equal the dense loss's (so data-parallel
    backbone gradients are to be summed over ranks, not averaged).
    """
    z_all = _GatherRows.apply(F.normalize(z, dim=1), group)
    targets_all = all_gather_cat(targets, group, dim=0)
    logits = z_all @ F.normalize(weight_shard, dim=1).t() / temperature
    return _ShardedSmoothedCE.apply(logits, targets_all, offset, alpha, k, group)


@register_method("invcls")
class InvCls(Method):
    """One class per training image; cosine-softmax classifier on a 2-layer MLP head (tau = 0.15).

    ``smooth_k`` is ours to choose (the paper ablates it on ImageNet): 10 hardest classes at
    CIFAR scale, a small fraction of the ~5,000 images that share a CIFAR-10 class; 5 on digits.
    With ``shard_classifier`` and several ranks, each rank holds a contiguous block of W's rows and
    trains with :func:`sharded_instance_loss`; checkpoints still hold the whole W (gathered on save,
    sliced on load), so evaluation and single-process loading do not change.
    """

    description = "InvCls: N-way parametric instance classifier, raw-feature init, hardest-class smoothing"
    defaults = {
        "method": {"temperature": 0.15, "feat_dim": 128, "head_hidden": 512, "smooth_alpha": 0.2, "smooth_k": 10,
                   "shard_classifier": False},
        # The paper's ImageNet optimiser (Liu et al., AAAI 2021, experiment setup; no official code was found):
        # SGD momentum 0.9, wd 1e-4, lr 0.48, 10 warm-up epochs then cosine. The batch of 256 (lr unscaled),
        # tau 0.15, alpha 0.2 and the SimCLR augmentation are CIFAR-10 choices (docs/fidelity.md).
        "paper": {"batch_size": 256, "lr": 0.48, "weight_decay": 1e-4, "warmup": 0.05, "views": 1,
                  "augment": "simclr"},
        "cpu": {"batch_size": 128, "lr": 0.2, "weight_decay": 1e-4, "warmup": 0.05, "views": 1,
                "augment": "mild", "head_hidden": 128, "smooth_k": 5},
    }
    search_space = {"lr": ("log", 0.03, 1.0), "temperature": ("float", 0.05, 0.5), "smooth_alpha": ("float", 0.0, 0.5)}
    ranges = {"smooth_alpha": (0.0, 1.0)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.head = mlp(backbone.out_dim, cfg["head_hidden"], cfg["feat_dim"])
        weight = F.normalize(torch.randn(info.num_samples, cfg["feat_dim"]), dim=1)
        self.sharded = bool(cfg["shard_classifier"]) and distributed.get_world_size() > 1
        self.rows = slice(0, info.num_samples)
        if self.sharded:  # this rank's block of W; checkpoints hold the whole W (gathered on save, sliced on load)
            block = torch.arange(info.num_samples).tensor_split(distributed.get_world_size())[distributed.get_rank()]
            self.rows = slice(int(block[0]), int(block[-1]) + 1)
            weight = weight[self.rows].clone()
            self.register_state_dict_post_hook(self._gather_classifier)
            self.register_load_state_dict_pre_hook(self._take_rows)
        self.classifier = nn.Parameter(weight)

    @staticmethod
    def _gather_classifier(module: "InvCls", state: dict, prefix: str, local_metadata) -> None:
        state[prefix + "classifier"] = distributed.all_gather_uneven(module.classifier.detach())

    @staticmethod
    def _take_rows(module: "InvCls", state: dict, prefix: str, *args) -> None:
        key = prefix + "classifier"
        if key in state and len(state[key]) == module.info.num_samples:
            state[key] = state[key][module.rows]

    def rank_local_parameters(self) -> list[str]:
        return ["classifier"] if self.sharded else []

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(h), dim=1)

    @torch.no_grad()
    def on_train_start(self, loader) -> None:
        """Contrastive prior: one pass in train mode (BatchNorm statistics update, nothing else), w_i <- z_i."""
        self.train()
        for x, index in loader:
            mine = (index >= self.rows.start) & (index < self.rows.stop)
            self.classifier[index[mine] - self.rows.start] = self.embed(self.backbone(x))[mine].float()

    def training_step(self, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        z = self.embed(self.backbone(batch.views[0]))
        if self.sharded:
            # the sharded loss gives each rank the whole gradient of its own rows; DDP then averages the
            # backbone's gradients over ranks, so scale them by the world size to keep the sum
            z = distributed.scale_grad(z, distributed.get_world_size())
            return sharded_instance_loss(z, batch.index, self.classifier, self.rows.start, cfg["temperature"],
                                         cfg["smooth_alpha"], cfg["smooth_k"])
        logits = z @ F.normalize(self.classifier, dim=1).t() / cfg["temperature"]
        return smoothed_instance_loss(logits, batch.index, cfg["smooth_alpha"], cfg["smooth_k"])

    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {"backbone": h, "head": self.embed(h)}
