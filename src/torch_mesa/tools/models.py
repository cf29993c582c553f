"""A reference pre-norm Vision Transformer built from standard ``torch.nn`` layers.

Used by the benchmarks, the demo and the tests as the model torch-mesa is
measured on: the layout of timm's ViT/DeiT (patch embedding, class token,
pre-norm blocks of attention and GELU MLP, final norm, linear head), with
attention computed by ``F.scaled_dot_product_attention`` (``fused_attn=True``)
or written out as ``softmax(q @ k^T) @ v`` (``fused_attn=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VisionTransformer", "vit_base", "vit_small", "vit_tiny"]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused_attn: bool = True, attn_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) each
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = self.softmax((q * self.scale) @ k.transpose(-2, -1))  # (B, H, N, N)
            x = self.attn_drop(attn) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, fused_attn: bool = True, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, fused_attn, attn_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        fused_attn: bool = True,
        drop: float = 0.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        n = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, fused_attn, drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_small(image_size: int = 224, **kw) -> VisionTransformer:
    """ViT-S/16 layout: width 384, depth 12, 6 heads (197 tokens at 224 px)."""
    return VisionTransformer(image_size=image_size, dim=384, depth=12, heads=6, **kw)


def vit_tiny(image_size: int = 224, **kw) -> VisionTransformer:
    """ViT-Ti/16 layout: width 192, depth 12, 3 heads."""
    return VisionTransformer(image_size=image_size, dim=192, depth=12, heads=3, **kw)


def vit_base(image_size: int = 224, **kw) -> VisionTransformer:
    """ViT-B/16 (DeiT-B) layout: width 768, depth 12, 12 heads."""
    return VisionTransformer(image_size=image_size, dim=768, depth=12, heads=12, **kw)
