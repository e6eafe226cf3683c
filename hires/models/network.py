"""``HiResNet``: a stem, stages of residual blocks and a linear head, with the
hierarchical projections of :mod:`hires.models.hierarchy` between levels."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hires_kernels import HierarchicalProjection, pool_source

from .blocks import BasicBlock, Bottleneck
from .hierarchy import SIDES, HierarchicalBlock, check_choice, projection_sources, projection_stride
from .stems import make_stem

__all__ = ["BLOCKS", "HiResNet"]

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class HiResNet(nn.Module):
    """A ResNet/ResNeXt/plain CNN with hierarchical residuals.

    Stage ``l`` has ``depths[l-1]`` blocks of width ``planes[l-1]`` (times the block's
    expansion); the first stage keeps the stem's resolution, every later one halves it
    in its entry block.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        depths, planes: blocks and base width per stage.
        num_classes: outputs of the linear head.
        sources: ``"all"``, ``"stem"`` or ``"none"`` (see :mod:`hires.models.hierarchy`).
        side: ``"output"`` or ``"input"``.
        fused: run the projections with the fused op (only execution changes, never
            parameters or the state_dict).
        stem: ``"cifar"`` or ``"imagenet"``; stem_width: its output channels.
        shortcuts: False drops the blocks' short shortcuts (the plain CNN).
        groups, base_width: bottleneck inner width (ResNeXt), see :class:`Bottleneck`.
        in_channels: image channels.
    """

    def __init__(self, block: str, depths: Sequence[int], planes: Sequence[int], *, num_classes: int = 10,
                 sources: str = "all", side: str = "output", fused: bool = True, stem: str = "cifar",
                 stem_width: int = 64, shortcuts: bool = True, groups: int = 1, base_width: int = 64,
                 in_channels: int = 3):
        super().__init__()
        check_choice("block", block, tuple(BLOCKS))
        check_choice("side", side, SIDES)
        if len(depths) != len(planes) or not depths or min(depths) < 1:
            raise ValueError(f"depths and planes need one positive entry per stage; got {depths} and {planes}")
        self.sources, self.side, self.fused = sources, side, fused
        block_cls = BLOCKS[block]
        extra = {"groups": groups, "base_width": base_width} if block == "bottleneck" else {}
        self.stem = make_stem(stem, in_channels, stem_width)

        widths = [stem_width]        # channels of each level
        factors = [1]                # downsampling of each level relative to the one below
        self.stages = nn.ModuleList()
        for i, (depth, p) in enumerate(zip(depths, planes)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(block_cls(widths[-1] if j == 0 else p * block_cls.expansion, p,
                                        stride if j == 0 else 1, shortcut=shortcuts, side=side, **extra))
            self.stages.append(nn.Sequential(*blocks))
            widths.append(p * block_cls.expansion)
            factors.append(stride)

        # Source level k -> the stages whose entry block it feeds.
        self._targets: dict[int, list[int]] = {}
        for level, srcs in projection_sources(len(depths), sources).items():
            target = level if side == "output" else level - 1
            entry = self.stages[level - 1][0]
            for k in srcs:
                entry.add_projection(k, HierarchicalProjection(
                    widths[k], widths[target], stride=projection_stride(factors, k, target),
                    ceil_mode=True, fused=fused))
                self._targets.setdefault(k, []).append(level - 1)

        self.head = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def hierarchical_blocks(self) -> list[tuple[str, HierarchicalBlock]]:
        """``(name, block)`` for every block that receives projections."""
        return [(n, m) for n, m in self.named_modules()
                if isinstance(m, HierarchicalBlock) and len(m.projections)]

    def num_projections(self) -> int:
        return sum(len(b.projections) for _, b in self.hierarchical_blocks())

    def _pool(self, k: int, x: torch.Tensor, entries: list[HierarchicalBlock],
              pooled: list[dict[int, torch.Tensor]]) -> None:
        """Level ``k`` (``x``) pooled once for every fused projection it feeds, into
        ``pooled[stage][k]``: x is read once for all of them, and in backward its gradient
        written once; each target block then runs its projection at stride 1 with its
        residual fused. Ablated projections are skipped; blocks capturing their addends
        compute theirs themselves, and so does the block of a source's only projection
        (its op pools x itself)."""
        stages = self._targets.get(k, ())
        if len(stages) < 2:
            return
        stages = [i for i in stages if not entries[i].capture_addends and f"P{k}" not in entries[i].ablate]
        projections = [entries[i].projections[entries[i].projection_sources.index(k)] for i in stages]
        if len(stages) > 1 and all(p.fused for p in projections):
            for i, p in zip(stages, pool_source(x, [p.stride for p in projections], ceil_mode=True)):
                pooled[i][k] = p

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last level's feature map."""
        x = self.stem(x)
        entries = [stage[0] for stage in self.stages]
        pooled: list[dict[int, torch.Tensor]] = [{} for _ in entries]
        levels = [x]
        self._pool(0, x, entries, pooled)
        for i, stage in enumerate(self.stages):
            x = entries[i](x, levels, pooled[i])
            for block in stage[1:]:
                x = block(x)
            levels.append(x)
            self._pool(i + 1, x, entries, pooled)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1))
