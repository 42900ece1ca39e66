"""Projection and classification heads shared by methods."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.errors import choices_error


def mlp(in_dim: int, hidden: int, out_dim: int, *, bn: bool = False, bias: bool = True,
        out_bn: bool = False) -> nn.Sequential:
    """Linear-(BN)-ReLU-Linear-(BN): SimCLR's projector and its variants."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=bias and not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim, bias=bias and not out_bn)]
    if out_bn:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers)


class NormLinear(nn.Module):
    """Linear layer on unit-norm inputs with unit-norm weight rows (cosine classifier; CLD's option).

    Initialised as CLD's ``NormedLinear`` (CLD-UnsupervisedLearning, models/resnet_cifar.py):
    uniform(-1, 1) entries, then every output's weight vector rescaled to unit norm
    (``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`` on its (in, out) matrix). The forward
    pass normalises the rows anyway, but their norm sets the size of the weight gradients
    (they scale as 1 / norm) and how fast weight decay shrinks them.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.empty(out_dim, in_dim).uniform_(-1, 1), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


#: Projection heads by name (see :func:`make_head`).
HEADS = ("linear", "mlp", "normlinear")


def make_head(kind: str, in_dim: int, out_dim: int, hidden: int = 512) -> nn.Module:
    """A projection head by name: ``linear`` (NPID), ``normlinear`` (CLD's NormedLinear option), ``mlp`` (MoCo v2)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "normlinear":
        return NormLinear(in_dim, out_dim)
    if kind == "mlp":
        return mlp(in_dim, hidden, out_dim)
    raise choices_error("head", kind, HEADS)
