"""BatchNorm variants that hold another BatchNorm's tensors: per-group statistics in one pass of a network.

A method that encodes several groups of images, each with its own BatchNorm statistics (the views of a step
in a pass per view, as the official codes of CC, CD, CLD and SimCLR's CIFAR ports do; MoCo's shuffled key
groups, Sec. 3.3), can send them through the network as one batch: every layer but BatchNorm runs once, and
each :class:`SplitBatchNorm` normalises the groups in turn. On a GPU, where a step's time goes to launching
kernels, that is one launch of every other layer instead of one per group. MoCo's CIFAR-10 demo splits its
query batch too (simulating per-GPU BatchNorm on one GPU) and keeps the mean of the groups' running statistics
(``average_running_stats``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_like(cls: type[_BatchNorm], child: _BatchNorm) -> _BatchNorm:
    """A ``cls`` BatchNorm with ``child``'s settings holding its parameters and buffers (the same tensors, not
    copies, so state-dict keys and values are unchanged), in ``child``'s train or eval mode."""
    new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
    new._parameters, new._buffers = child._parameters, child._buffers
    return new.train(child.training)


class SplitBatchNorm(_BatchNorm):
    """BatchNorm of ``splits`` consecutive groups of the batch (``chunk``), each by its own statistics: what a
    pass per group gives. The groups' BatchNorms run in turn on views of the input, so running statistics move as
    after a pass per group, and the memory format (channels-last on a GPU) is kept. ``splits`` 1: plain BN.
    With ``average_running_stats`` every group updates a copy of the running statistics and their mean is kept
    (over every rank's groups under DDP), as the ``SplitBatchNorm`` of MoCo's CIFAR-10 demo
    (``facebookresearch/moco``, branch colab-notebook, ``colab/moco_cifar10_demo.ipynb``) does."""

    splits = 1
    average_running_stats = False

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input with at least 2 dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = super().forward
        if self.average_running_stats and self.training and self.track_running_stats:
            return self._with_averaged_running_stats(x)  # also for one group a rank: averaged over the ranks
        if self.splits == 1:
            return plain(x)
        return torch.cat([plain(group) for group in x.chunk(self.splits)])

    def _with_averaged_running_stats(self, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # a copy of the running mean and variance per group (rows of one tensor), each moved by its group
        groups = x.chunk(self.splits)  # fewer than ``splits`` when the rows do not split evenly
        copies = torch.stack([self.running_mean, self.running_var]).repeat(len(groups), 1, 1)
        out = torch.cat([F.batch_norm(group, running[0], running[1], self.weight, self.bias, True, momentum, self.eps)
                         for group, running in zip(groups, copies)])
        stats = copies.mean(0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # every rank holds as many groups: the mean over all of them
            stats /= dist.get_world_size()
        self.running_mean.copy_(stats[0])
        self.running_var.copy_(stats[1])
        return out


def split_batchnorms(module: nn.Module) -> nn.Module:
    """Every BatchNorm of ``module`` replaced, in place, by a :class:`SplitBatchNorm` holding the same tensors
    (state-dict keys unchanged); returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, SplitBatchNorm):
            setattr(module, name, batchnorm_like(SplitBatchNorm, child))
        else:
            split_batchnorms(child)
    return module


@contextlib.contextmanager
def batchnorm_groups(module: nn.Module, groups: int, *, average_running_stats: bool = False) -> Iterator[None]:
    """Within the block, ``module``'s :class:`SplitBatchNorm` layers normalise ``groups`` consecutive groups of
    their input apart (a pass of ``groups`` stacked batches gives what a pass of each gives; with
    ``average_running_stats``, the running statistics move by the groups' mean instead)."""
    splits = [m for m in module.modules() if isinstance(m, SplitBatchNorm)]
    for m in splits:
        m.splits, m.average_running_stats = groups, average_running_stats
    try:
        yield
    finally:
        for m in splits:
            m.splits, m.average_running_stats = 1, False
