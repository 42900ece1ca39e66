"""Class-conditional autoencoder (Chen, Fu et al. 2022): coarse cross-entropy + reconstruction.

The reconstruction term keeps information the coarse labels do not ask for; Thanos
concatenates this encoder with the SupCon + class-conditional InfoNCE one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, DataInfo, register_method
from methods.supcon import CPU, PAPER, CoarseLabelMethod


class ConvDecoder(nn.Module):
    """Embedding -> image: a linear map to a ``width``-channel grid 2^k times smaller than the image (k <= 3),
    then k stages of 2x upsampling + 3x3 conv-BN-ReLU halving the width, then a 3x3 conv to the channels.

    The resize-convolution layout and channel plan (512-256-128-64 on 32x32) of the official
    ResNet-18 decoder (pl_bolts), without its residual blocks.
    """

    def __init__(self, in_dim: int, image_shape: tuple[int, int, int], width: int) -> None:
        super().__init__()
        c, h, w = image_shape
        k = 0
        while k < 3 and h % 2 ** (k + 1) == 0 and w % 2 ** (k + 1) == 0 and min(h, w) // 2 ** (k + 1) >= 2:
            k += 1
        self.grid = (width, h // 2 ** k, w // 2 ** k)
        self.linear = nn.Linear(in_dim, width * self.grid[1] * self.grid[2])
        layers: list[nn.Module] = []
        for i in range(k):
            cin, cout = width >> i, max(1, width >> (i + 1))
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(max(1, width >> k), c, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.linear(z).view(-1, *self.grid))


@register_method("cond_autoencoder")
class CondAutoencoder(CoarseLabelMethod):
    """Coarse cross-entropy + ``recon_weight`` * MSE between the decoded embedding and the normalised view, both views."""

    description = ("class-conditional autoencoder: coarse cross-entropy + MSE reconstruction of the input; "
                   "published CIFAR-10 2->10 fine accuracy 71.7 (ViT)")
    defaults = {
        # HazyResearch/thanos-code config/experiment/cifar10_cep_autoencoder_coarselabels.yaml: the classification
        # and autoencoder tasks, MSE weight 1.0 (config/task/loss/mse_loss.yaml); the optimisation of methods.supcon.PAPER.
        "method": {"recon_weight": 1.0, "decoder_width": 512},
        "paper": PAPER,
        "cpu": {**CPU, "decoder_width": 32},
    }
    search_space = {"lr": ("log", 1e-4, 1e-2), "recon_weight": ("log", 0.1, 10.0)}

    def __init__(self, backbone: nn.Module, cfg: dict, info: DataInfo) -> None:
        super().__init__(backbone, cfg, info)
        self.decoder = ConvDecoder(backbone.out_dim, info.image_shape, cfg["decoder_width"])

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        z = self.embed_views(batch)
        ce = self.coarse_ce(z, batch.labels)
        mse = F.mse_loss(self.decoder(z), torch.cat(batch.views))
        return ce + self.cfg["recon_weight"] * mse, {"ce": ce.detach(), "mse": mse.detach()}
