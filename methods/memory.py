"""State shared by instance-discrimination methods: NPID's memory bank, MoCo's queue and momentum encoder.

Everything that must survive a checkpoint (bank, queue, queue pointer, NCE constant) is a
registered buffer, so a resumed run continues with the same negatives.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.engine import distributed
from harness.errors import choices_error
from harness.models.batchnorm import batchnorm_groups, split_batchnorms


class MemoryBank(nn.Module):
    """N x d L2-normalised features, one per training image (NPID, Wu et al. 2018, Sec. 3.1-3.2).

    Initialised uniform in +-1/sqrt(d/3) as in the official code; entries are read detached
    and updated after each step by ``M[i] <- normalise(m M[i] + (1 - m) f_i)`` (Eq. 2's proximal
    update, m = 0.5).
    """

    def __init__(self, size: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        self.momentum = momentum
        bound = 1 / math.sqrt(dim / 3)
        self.register_buffer("memory", torch.rand(size, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("log_z", torch.tensor(float("nan")))  # NCE's normaliser, estimated once
        self.z_checked = False  # whether this process has seen log_z set (it may come from a checkpoint)

    def logits(self, f: torch.Tensor, temperature: float) -> torch.Tensor:
        """Non-parametric softmax logits f M^T / T over the whole bank (NPID Eq. 2)."""
        return f @ self.memory.t().to(f.dtype) / temperature

    def nce_loss(self, f: torch.Tensor, index: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
        """NCE approximation of the full softmax (NPID Sec. 3.2, Eqs. 5-8) with K uniform noise samples.

        P(i|v) = exp(v.f_i / T) / Z, Z estimated once from the first batch as N mean(exp(v.f_j / T))
        (lemniscate's NCEAverage; under DDP the mean is over the global batch, every rank's rows, as the
        official single-process run takes it); h(i, v) = P(i|v) / (P(i|v) + K/N). ``noise`` (n, K) holds
        bank indices drawn uniformly. Loss: -[log h(i, v_i) + sum_noise log(1 - h(j, v_i))], averaged over
        the batch.
        """
        n_data = len(self.memory)
        weight = self.memory[torch.cat([index[:, None], noise], 1)].to(f.dtype)  # (n, K+1, d)
        scores = torch.einsum("nkd,nd->nk", weight, f).float() / temperature
        if not self.z_checked:  # this process's first step (a resumed run keeps its checkpoint's log_z)
            per_rank = distributed.all_gather_cat(torch.logsumexp(scores.detach().flatten(), 0).reshape(1))
            estimate = torch.logsumexp(per_rank, 0) - math.log(scores.numel() * len(per_rank)) + math.log(n_data)
            self.log_z.copy_(torch.where(torch.isnan(self.log_z), estimate, self.log_z))  # no host check
            self.z_checked = True
        log_p = scores - self.log_z  # log P(j|v)
        log_noise = math.log(noise.shape[1] / n_data)  # log(K P_n)
        log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_noise))
        log_h = log_p[:, 0] - log_denominator[:, 0]
        log_one_minus_h = log_noise - log_denominator[:, 1:]
        return -(log_h + log_one_minus_h.sum(1)).mean()

    @torch.no_grad()
    def mixed(self, rows: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """normalise(m rows + (1 - m) f): bank rows after Eq. 2's update with the features ``f``."""
        return F.normalize(self.momentum * rows + (1 - self.momentum) * f.float(), dim=1)

    @torch.no_grad()
    def update(self, index: torch.Tensor, f: torch.Tensor) -> None:
        """M[i] <- normalise(m M[i] + (1 - m) f_i)."""
        self.memory[index] = self.mixed(self.memory[index], f)


QUEUE_INITS = ("normal", "uniform")


class Queue(nn.Module):
    """A ring buffer of keys: MoCo's dictionary of negatives (He et al. 2020, Sec. 3.2).

    Its first ``size`` negatives are random: ``init="normal"`` draws unit-norm Gaussian keys
    (facebookresearch/moco, moco/builder.py); ``"uniform"`` draws unnormalised entries uniform in
    +-1/sqrt(d/3), as CLD's ``MemoryMoCo`` (CLD-UnsupervisedLearning, lib/NCEAverage.py) and NPID's bank.
    """

    def __init__(self, size: int, dim: int, init: str = "normal") -> None:
        super().__init__()
        if init == "normal":
            keys = F.normalize(torch.randn(size, dim), dim=1)
        elif init == "uniform":
            bound = 1 / math.sqrt(dim / 3)
            keys = torch.rand(size, dim).mul_(2 * bound).sub_(bound)
        else:
            raise choices_error("queue_init", init, QUEUE_INITS)
        self.register_buffer("keys", keys)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue the newest keys over the oldest ones (wrapping around the end)."""
        size = len(self.keys)
        slots = (self.ptr + torch.arange(len(keys), device=keys.device)) % size
        self.keys[slots] = keys.float()
        self.ptr.copy_((self.ptr + len(keys)) % size)


class MomentumEncoder(nn.Module):
    """An EMA copy of ``modules`` run in sequence, without gradients (MoCo Eq. 2).

    ``update`` sets theta_k <- m theta_k + (1 - m) theta_q for the parameters; the copy keeps
    its own BatchNorm statistics, as MoCo's key encoder does (DDP leaves its BN per group).
    """

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.net = split_batchnorms(copy.deepcopy(nn.Sequential(*modules)).requires_grad_(False))

    @torch.no_grad()
    def update(self, *modules: nn.Module, momentum: float) -> None:
        pairs = list(zip(self.net.parameters(), nn.Sequential(*modules).parameters(), strict=True))
        # one multi-tensor kernel on a GPU instead of a launch per parameter
        torch._foreach_lerp_([key for key, _ in pairs], [query.detach() for _, query in pairs], 1 - momentum)

    def _encode_groups(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """``self.net`` on ``groups`` consecutive groups of ``x`` (``chunk``), each with its own BatchNorm statistics,
        in one pass (:class:`~harness.models.batchnorm.SplitBatchNorm`): the keys of a pass per group, with 8
        groups 8 times fewer launches of every other layer."""
        with batchnorm_groups(self.net, groups):
            return self.net(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, bn_splits: int = 1) -> torch.Tensor:
        """Keys of the global batch with shuffle-and-split BatchNorm (MoCo Sec. 3.3, official CIFAR demo).

        The batch (gathered over ranks under DDP) is shuffled and cut into ``bn_splits`` groups
        that each get their own BN statistics, so a query and its key never share batch
        statistics; under DDP rank r encodes groups r, r + world, ... (MoCo's shuffling BN across
        GPUs) when the groups split evenly over the ranks. Keys come back in the global batch's order.
        """
        x = distributed.all_gather_cat(x)
        perm = torch.randperm(len(x), device=x.device)
        shuffled = x[perm]
        groups = shuffled.chunk(bn_splits)
        world, rank = distributed.get_world_size(), distributed.get_rank()
        if world > 1 and len(groups) % world == 0 and len({len(g) for g in groups}) == 1:
            mine = groups[rank::world]
            mine = self._encode_groups(torch.cat(mine), len(mine)).view(len(mine), len(groups[0]), -1)
            out = distributed.all_gather_cat(mine[None]).transpose(0, 1).reshape(len(x), -1)  # back in group order
        else:
            out = self._encode_groups(shuffled, bn_splits)
        return out[perm.argsort()]
