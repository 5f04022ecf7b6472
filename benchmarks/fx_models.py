"""Ordinary ``nn.Module`` models (no StagedModel, no Residual) for the torch.fx staging benchmark and tests.

Written the way such models usually are: a ResNet-18-style CIFAR network, a small ViT and a small
GPT-style decoder. Not part of the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, identity or 1x1-conv shortcut.

    ``inplace_add``: the shortcut is added with ``out += shortcut(x)`` (as torchvision writes it);
    ``VectorizedScheduler`` cannot evaluate that under ``vmap`` when only the shortcut is perturbed
    (a per-query value written into a shared one), so the benchmark uses ``out = out + ...``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, inplace_add: bool = True):
        super().__init__()
        self.inplace_add = inplace_add
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace_add:
            out += self.shortcut(x)
        else:
            out = out + self.shortcut(x)
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR-sized images: a 3x3 stem, four stages of two basic blocks, a linear head."""

    def __init__(self, widths=(4, 8, 16, 32), num_classes: int = 10, in_channels: int = 3, inplace_add: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock(c, w, 1 if i == 0 else 2, inplace_add), BasicBlock(w, w, 1, inplace_add)))
            c = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False, context: int = 0):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        if causal:
            self.register_buffer("mask", torch.tril(torch.ones(context, context)).view(1, 1, context, context))

    def forward(self, x):
        B, T, C = x.shape
        h = self.heads
        q = self.q(x).view(B, T, h, C // h).transpose(1, 2)
        k = self.k(x).view(B, T, h, C // h).transpose(1, 2)
        v = self.v(x).view(B, T, h, C // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / (C // h) ** 0.5)
        if self.causal:
            att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, dim: int, heads: int, mlp: int, causal: bool = False, context: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal, context)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return x


class TinyViT(nn.Module):
    """Patch convolution, class token and positional embedding (``nn.Parameter``), pre-LN blocks, head."""

    def __init__(self, image: int = 8, patch: int = 2, dim: int = 16, depth: int = 2, heads: int = 2, mlp: int = 32,
                 in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class TinyGPT(nn.Module):
    """Token and position embeddings, causal pre-LN blocks, a final LayerNorm and an LM head
    (``tied``: the head reuses the token embedding's weight). Returns ``(B * T, vocab)`` logits."""

    def __init__(self, vocab: int = 11, context: int = 8, dim: int = 16, depth: int = 2, heads: int = 2,
                 mlp: int = 32, tied: bool = False):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp, causal=True, context=context) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        T = idx.size(1)
        positions = torch.arange(T, device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        x = self.ln_f(self.blocks(x))
        logits = self.head(x)
        return logits.view(-1, logits.size(-1))
