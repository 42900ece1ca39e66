"""A small Vision Transformer for 32x32 images: the encoder of Chen, Fu et al. 2022 (Thanos).

Their official code (HazyResearch/thanos-code, ``config/encoder/transformer.yaml``,
``config/embedding/square_patch.yaml``, ``unagi/models/embeddings/embeddings.py``,
``unagi/models/encoders/sequence/transformer/``): 4x4 patches embedded by Linear + LayerNorm +
dropout 0.1, width 256, a learned CLS token and learned positions, 7 pre-norm blocks of 8-head
self-attention (``MHA_fused``: one bias-free qkv projection, no output projection, dropout 0.1 of
whole query rows of the attention logits, ``head_dropout``) and a GELU MLP of width 512, dropout
0.05 with stochastic depth rising linearly to 0.05, a final LayerNorm, and the CLS token as the
output. Their ``init_weight`` helpers are never called, so every layer keeps PyTorch's default
initialisation, as here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.models.backbones import register_backbone


class Attention(nn.Module):
    """Multi-head self-attention as the official ``MHA_fused``/``MHA``: q, k, v from one bias-free
    linear map, softmax(q k^T / sqrt(d_head)) v with dropout on the attention weights and on the output,
    no output projection. ``head_dropout`` drops the logits of a whole query row (every head) with that
    probability and rescales the others (``nn.Dropout2d`` over their (batch, query, head, key) logits):
    a dropped row attends uniformly."""

    def __init__(self, width: int, heads: int, dropout: float, head_dropout: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.head_dropout = head_dropout
        self.attn_drop, self.out_drop = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, width = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * self.scale  # (b, heads, query, key)
        if self.training and self.head_dropout > 0:
            keep = torch.rand(b, 1, s, 1, device=x.device) >= self.head_dropout
            logits = logits * keep / (1 - self.head_dropout)
        weights = self.attn_drop(logits.softmax(-1))
        return self.out_drop((weights @ v).transpose(1, 2).reshape(b, s, width))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)), each residual branch with drop-path."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float, head_dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout, head_dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp, width), nn.Dropout(dropout))
        self.drop_path = drop_path

    def _path(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole branch per sample with probability ``drop_path`` in training."""
        if not self.training or self.drop_path == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x * keep / (1 - self.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._path(self.attn(self.norm1(x)))
        return x + self._path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Patch embedding, CLS token + learned positions, pre-norm blocks, final LayerNorm; returns the CLS token.

    Positions are learned for up to ``max_patches`` patches and the first ones are used, so any
    image up to that many patches works (8x8 digits: 4 patches of 4x4).
    """

    def __init__(self, in_channels: int = 3, patch: int = 4, width: int = 256, depth: int = 7, heads: int = 8,
                 mlp: int = 512, dropout: float = 0.05, drop_path: float = 0.05, head_dropout: float = 0.1,
                 embed_dropout: float = 0.1, max_patches: int = 64) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Sequential(nn.Linear(in_channels * patch * patch, width), nn.LayerNorm(width),
                                   nn.Dropout(embed_dropout))
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, width).clamp(-1, 1))
        self.pos = nn.Parameter(0.1 * torch.randn(1, max_patches + 1, width).clamp(-1, 1))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp, dropout, head_dropout,
                                            drop_path * k / max(1, depth - 1)) for k in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        tokens = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], 1)
        if tokens.shape[1] > self.pos.shape[1]:
            raise ValueError(f"ViT: {tokens.shape[1] - 1} patches exceed max_patches={self.pos.shape[1] - 1}")
        tokens = tokens + self.pos[:, :tokens.shape[1]]
        return self.norm(self.blocks(tokens))[:, 0]


@register_backbone("vit_small_patch4", "ViT of Chen, Fu et al. 2022: 4x4 patches, width 256, 7 pre-norm blocks, "
                                       "8 heads, MLP 512, learned positions, CLS output")
def vit_small_patch4(in_channels: int) -> nn.Module:
    return ViT(in_channels)
