"""A small Vision Transformer for CIFAR-10 (32x32), written like timm's VisionTransformer
(fused qkv Linear, reshape to (B, N, 3, heads, head_dim), permute, unbind; pre-norm blocks;
class token; learned positional embedding), so its export has the graph of a timm ViT
export and the torch frontend and DPM work on it. Needs torch (import lazily).

`cifar_vit()` defaults (about 0.8 M parameters): patch 4 (64 tokens + class token), width
128, depth 6, 4 heads of 32, MLP 2x. bench/train_vit.py trains it (recipe and top-1 there).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CifarViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 4, dim: int = 128, depth: int = 6, heads: int = 4,
                 mlp_ratio: float = 2.0, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def cifar_vit(**kwargs) -> CifarViT:
    return CifarViT(**kwargs)


def load_cifar_vit(path: str | Path) -> CifarViT:
    """A CifarViT with the weights of `path` (a state dict saved by bench/train_vit.py, whose
    'config' entry gives the architecture), in eval mode."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    model = CifarViT(**state.get("config", {}))
    model.load_state_dict(state["state_dict"])
    return model.eval()
