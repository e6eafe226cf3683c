"""Stems: the layers before the first stage; their output is level 0 (``x_0``)."""

from __future__ import annotations

from torch import nn

from .blocks import conv_bn
from .hierarchy import check_choice

__all__ = ["STEMS", "make_stem"]

STEMS = ("cifar", "imagenet")


def make_stem(kind: str, in_channels: int, width: int) -> nn.Sequential:
    """The stem of ``kind`` with ``width`` output channels.

    - ``"cifar"``: 3x3 conv (stride 1) -> BN -> ReLU, for 32x32 and 64x64 images.
    - ``"imagenet"``: 7x7 conv (stride 2) -> BN -> ReLU -> 3x3 max-pool (stride 2).
    """
    check_choice("stem", kind, STEMS)
    if kind == "cifar":
        return nn.Sequential(*conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
    return nn.Sequential(*conv_bn(in_channels, width, 7, 2), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))
