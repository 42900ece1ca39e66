"""Encoders the harness gives to methods. Each returns pooled features and exposes ``out_dim``."""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.registry import Registry

BACKBONES: Registry = Registry("backbone")


def register_backbone(name: str, description: str):
    def decorator(fn):
        fn.description = description
        return BACKBONES.register(name)(fn)
    return decorator


def create_backbone(name: str, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised backbone by name."""
    return BACKBONES.get(name)(in_channels)


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU stages and global average pooling: the CPU-scale encoder."""

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(*block(in_channels, width, False), *block(width, 2 * width, True),
                                      *block(2 * width, 4 * width, False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_backbone("small_cnn", "3-stage conv-BN-ReLU CNN, 128-d output: the CPU-scale encoder")
def small_cnn(in_channels: int) -> nn.Module:
    return SmallCNN(in_channels)


def _torchvision_resnet(arch: str, in_channels: int, cifar_stem: bool, default_init: bool = False) -> nn.Module:
    """torchvision's ``arch`` without its fc; ``default_init`` re-initialises every layer with PyTorch's
    default (``reset_parameters``: kaiming-uniform convolutions) instead of torchvision's kaiming-normal."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        # CIFAR variant (He et al. 2016, Sec. 4.2; used by NPID, CLD, SimCLR's CIFAR runs): 3x3 stride-1 stem, no max-pool.
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    if default_init:
        for layer in net.modules():
            if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)):
                layer.reset_parameters()
    return net


for _arch in ("resnet18", "resnet34", "resnet50"):
    register_backbone(_arch, f"torchvision {_arch} (ImageNet stem), pooled output")(
        lambda c, a=_arch: _torchvision_resnet(a, c, cifar_stem=False))
for _arch in ("resnet18", "resnet34"):
    register_backbone(f"{_arch}_cifar", f"{_arch} with the CIFAR stem (3x3 conv, no max-pool)")(
        lambda c, a=_arch: _torchvision_resnet(a, c, cifar_stem=True))
# The ResNet of CLD's and lemniscate's models/resnet_cifar.py (kuangliu/pytorch-cifar): the same layers and
# state-dict shapes as resnet18_cifar, but no initialisation loop, so every layer has PyTorch's default.
register_backbone("resnet18_cifar_default_init", "resnet18_cifar with PyTorch's default layer initialisation "
                  "(CLD's and lemniscate's resnet_cifar.py)")(
    lambda c: _torchvision_resnet("resnet18", c, cifar_stem=True, default_init=True))


class Flatten(nn.Module):
    """Raw pixels as features (the ``pixels`` baseline)."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


# The paper-specific ViT lives in its own module and registers itself on import.
from harness.models import vit  # noqa: E402,F401
