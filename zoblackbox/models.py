"""Small reference models for the bundled 8x8 digits.

The CNN and the MLP are ``nn.Sequential`` chains; :func:`digits_vit` is a vision transformer
written the ordinary way (modules with a hand-written ``forward``), the kind of model feature
reuse stages by tracing it (:mod:`zoblackbox.staged`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["MODELS", "ViT", "count_params", "digits_cnn", "digits_mlp", "digits_vit"]


def digits_cnn(channels: tuple[int, int] = (8, 16), hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """CNN for 8x8 digits: conv 1->c1, pool, conv c1->c2, pool, fc 4*c2->hidden, fc hidden->classes.

    With the defaults it has 3,658 parameters (conv 1->8, conv 8->16, fc 64->32, fc 32->10).
    """
    c1, c2 = channels
    if min(c1, c2, hidden, num_classes) < 1:
        raise ConfigError(f"channels, hidden and num_classes must be >= 1, got {channels}, {hidden}, {num_classes}")
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * c2, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def digits_mlp(hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """MLP for 8x8 digits: 64 -> hidden -> classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class Attention(nn.Module):
    """Multi-head self-attention with explicit query, key, value and output projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.query(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        k = self.key(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        v = self.value(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A vision transformer (Dosovitskiy et al., ICLR 2021) for small images.

    Non-overlapping ``patch x patch`` patches embedded by a strided convolution, a learned class
    token and positional embedding, ``depth`` pre-norm blocks, a final LayerNorm and a linear
    head on the class token.

    Parameters
    ----------
    image_size : int, default 8
        Height and width of the (square) input images.
    patch : int, default 2
        Patch size; must divide ``image_size``.
    dim : int, default 32
        Token width; must be divisible by ``heads``.
    depth : int, default 2
        Number of transformer blocks.
    heads : int, default 4
        Attention heads.
    mlp : int, default 64
        Hidden width of each block's MLP.
    in_channels : int, default 1
        Input channels.
    num_classes : int, default 10
        Classes.

    Raises
    ------
    ConfigError
        A size below 1, a patch that does not divide the image or a width that heads do not divide.
    """

    def __init__(self, image_size: int = 8, patch: int = 2, dim: int = 32, depth: int = 2, heads: int = 4,
                 mlp: int = 64, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        sizes = {"image_size": image_size, "patch": patch, "dim": dim, "depth": depth, "heads": heads,
                 "mlp": mlp, "in_channels": in_channels, "num_classes": num_classes}
        bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"ViT sizes must be ints >= 1, got {bad}")
        if image_size % patch:
            raise ConfigError(f"patch {patch} does not divide image_size {image_size}")
        if dim % heads:
            raise ConfigError(f"dim {dim} is not divisible by heads {heads}")
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def digits_vit(patch: int = 4, dim: int = 16, depth: int = 2, heads: int = 2, mlp: int = 32,
               num_classes: int = 10) -> ViT:
    """A small :class:`ViT` for the 8x8 digits: by default 4 patches of 4x4 plus a class token, width
    16, two blocks of two heads; 5,018 parameters."""
    return ViT(8, patch, dim, depth, heads, mlp, 1, num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": digits_cnn, "mlp": digits_mlp, "vit": digits_vit}
