"""ResNet-20 (and the other CIFAR ResNets) written as a list of stages.

The CIFAR-10 ResNets of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
Sec. 4.2: a 3x3 convolution with 16 channels, three groups of ``n`` basic blocks with 16, 32 and
64 channels (the first block of the second and third group halves the resolution), global
average pooling and a linear classifier; depth ``6 n + 2``. Shortcuts are parameter-free
(option A: subsample, then zero-pad the new channels), which gives ResNet-20 its 0.27M
parameters (DeepZero's ResNet-20, PAPER.md).

The model is a :class:`~zoblackbox.staged.StagedModel` with one stage per block -- ``stem``,
``layer1_0`` … ``layer3_{n-1}``, ``head`` -- and every block is a
:class:`~zoblackbox.staged.Residual`, so feature reuse restarts the forward at the layer a query
perturbs, inside its block.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .staged import Residual, StagedModel

__all__ = ["PadShortcut", "basic_block", "cifar_resnet", "resnet20"]


class PadShortcut(nn.Module):
    """The parameter-free shortcut of a block that changes shape: subsample, zero-pad channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError(f"a padding shortcut cannot shrink {in_channels} channels to {out_channels}")
        self.stride = stride
        self.pad = (out_channels - in_channels) // 2, out_channels - in_channels - (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


def basic_block(in_channels: int, channels: int, stride: int = 1) -> Residual:
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions.

    Written as a :class:`~zoblackbox.staged.Residual`, so feature reuse restarts inside the block
    at the perturbed layer (and forms its output from explicit deltas).
    """
    body = nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(channels),
    )
    shortcut = PadShortcut(in_channels, channels, stride) if stride != 1 or in_channels != channels else None
    return Residual(body, shortcut, nn.ReLU())


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> StagedModel:
    """The CIFAR ResNet of the given depth (``6 n + 2``: 20, 32, 44, 56, 110) as a staged model.

    Args:
        depth: number of weighted layers; ``(depth - 2) / 6`` basic blocks per group.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        widths: channels of the three groups of blocks.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"depth must be 6 n + 2 for an int n >= 1 (20, 32, 44, ...), got {depth!r}")
    if min(num_classes, in_channels, *widths) < 1 or len(widths) != 3:
        raise ConfigError(f"num_classes, in_channels and the three widths must be >= 1, got "
                          f"{num_classes}, {in_channels}, {widths}")
    blocks = (depth - 2) // 6
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    stages["stem"] = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU())
    channels = widths[0]
    for g, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if g > 0 and b == 0 else 1
            stages[f"layer{g + 1}_{b}"] = basic_block(channels, width, stride)
            channels = width
    stages["head"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    model = StagedModel(stages)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def resnet20(num_classes: int = 10, in_channels: int = 3) -> StagedModel:
    """ResNet-20 for 32x32 images: 269,722 parameters with 10 classes, 11 stages."""
    return cifar_resnet(20, num_classes, in_channels)
