"""Residual blocks: ``BasicBlock`` (ResNet-18/34, the plain CNN) and ``Bottleneck``
(ResNet-50, ResNeXt), both :class:`~hires.models.hierarchy.HierarchicalBlock`."""

from __future__ import annotations

import torch
from torch import nn

from .hierarchy import HierarchicalBlock

__all__ = ["BasicBlock", "Bottleneck", "conv_bn"]


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) -> BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels))


def _shortcut(in_channels: int, out_channels: int, stride: int, enabled: bool) -> nn.Module | None:
    """Identity where shapes agree, else a strided 1x1 conv -> BN; None when disabled."""
    if not enabled:
        return None
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, 1, stride)


class BasicBlock(HierarchicalBlock):
    """Two 3x3 convs: ``F = bn(conv(relu(bn(conv(x)))))``.

    Args:
        in_channels, planes: input and output width (expansion 1).
        stride: stride of the first conv (and of the shortcut).
        shortcut: False drops the short shortcut (the plain CNN).
        side: where projections entering this block are added.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, *, shortcut: bool = True,
                 side: str = "output"):
        super().__init__(side)
        self.conv1 = conv_bn(in_channels, planes, 3, stride)
        self.conv2 = conv_bn(planes, planes, 3)
        self.shortcut = _shortcut(in_channels, planes, stride, shortcut)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


class Bottleneck(HierarchicalBlock):
    """1x1 reduce -> 3x3 (grouped for ResNeXt, strided) -> 1x1 expand (x4).

    The inner width is ``int(planes * base_width / 64) * groups`` (torchvision's
    rule): ``groups=1, base_width=64`` is ResNet-50, ``groups=32, base_width=4``
    ResNeXt-50 32x4d, ``groups=8, base_width=64`` ResNeXt-29 8x64d.

    Args:
        in_channels: input width; the output width is ``4 * planes``.
        planes, groups, base_width: see above.
        stride, shortcut, side: as in :class:`BasicBlock`.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, *, groups: int = 1,
                 base_width: int = 64, shortcut: bool = True, side: str = "output"):
        super().__init__(side)
        width = int(planes * base_width / 64) * groups
        if width < 1:
            raise ValueError(f"Bottleneck: inner width int({planes} * {base_width} / 64) * {groups} is 0; "
                             "use more planes or a larger base_width")
        out_channels = planes * self.expansion
        self.conv1 = conv_bn(in_channels, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups)
        self.conv3 = conv_bn(width, out_channels, 1)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
