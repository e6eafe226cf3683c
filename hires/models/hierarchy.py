"""The hierarchical residuals: which projections exist, and the blocks that add them.

Levels and the projection rule
------------------------------
A network is a stem followed by stages of blocks. Level 0 is the stem output
(``x_0``); level ``l`` (1..L) is the output of stage ``l``. Stage ``l`` reads
``x_{l-1}`` and its *first* block (the entry block, the one that changes resolution
and width) carries the stage's short shortcut from ``x_{l-1}``. The hierarchical
projections enter that same entry block, from the levels *below* its input:

- ``sources="all"``:  stage ``l`` receives ``P_k(x_k)`` for every ``k <= l - 2``;
- ``sources="stem"``: stage ``l`` receives ``P_0(x_0)`` for every ``l >= 2``;
- ``sources="none"``: no projections (the plain base model).

Level ``l - 1`` is not a source of stage ``l``: it is the block's input and already
arrives through the block's own shortcut (which, in a ResNet-D, is the very same
avg-pool -> 1x1 conv -> BatchNorm). Stage 1 therefore receives nothing. With four
stages (ResNet-18/34/50, ResNeXt-50, the plain CNN) ``"all"`` gives 1 + 2 + 3 = 6
projections and ``"stem"`` gives 3; with three stages (ResNeXt-29) 1 + 2 = 3 and 2.

Where a projection is added (``side``)
--------------------------------------
- ``"output"``: into the entry block's residual sum, before its final ReLU:
  ``relu(F(x) + shortcut(x) + sum_k P_k(x_k))``; ``P_k`` pools ``x_k`` to the
  block's output resolution and maps it to the block's output width.
- ``"input"``: onto the entry block's input: ``x' = x + sum_k P_k(x_k)``, then
  ``relu(F(x') + shortcut(x'))``; ``P_k`` matches the input's resolution and width.

A block chains its projections through the fused op's ``residual`` argument,
``P_2(x_2, residual=P_1(x_1, residual=F + shortcut))``. A fused source that feeds several
stages is pooled once for all of them, right after it is computed
(``HiResNet.forward_features``, :func:`hires_kernels.pool_source`): the source is read once
and its gradient written once, and each target block runs its ``P_k`` at stride 1 on its
pooled input, with the residual still fused.

A projection's pooling stride is the ratio of the
source's and the target's resolution (a power of two); pooling runs in ceil mode,
which equals floor mode when the sizes divide and otherwise matches the
``ceil(H / 2)`` sizes of the strided convolutions (e.g. 7 -> 4).

Analysis interface
------------------
Every block is a :class:`HierarchicalBlock` with

- ``projections``: ``nn.ModuleList`` of the :class:`~hires_kernels.HierarchicalProjection`
  entering it (empty for most blocks), ``projection_sources``: their source levels
  ``k`` in the same order, and ``side``;
- ``capture_addends`` (default False): when True, forward computes every addend
  separately with the eager modules (pool -> ``conv`` -> ``bn``, never the fused op)
  and stores ``addends = {"F": f, "shortcut": s, "P<k>": p_k, ...}`` (detached;
  no ``"shortcut"`` in a block without one, as in the plain CNN; for
  ``side="input"`` the ``P<k>`` are the addends of the block input);
- ``ablate`` (default empty): names ``"P<k>"`` whose projections are skipped in
  forward (their contribution is zero; they are not stored in ``addends`` either).

Both switches cost nothing when off. ``HiResNet.hierarchical_blocks()`` lists
``(name, block)`` for the blocks that have projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hires_kernels import HierarchicalProjection

__all__ = ["SIDES", "SOURCES", "HierarchicalBlock", "check_choice", "projection_sources", "projection_stride"]

SOURCES = ("all", "stem", "none")
SIDES = ("output", "input")


def check_choice(name: str, value, choices) -> None:
    """Raise a ValueError naming ``name`` and the valid ``choices`` unless ``value`` is one."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def projection_sources(num_stages: int, sources: str) -> dict[int, list[int]]:
    """Stage level ``l`` (1-based) -> the source levels ``k`` of its projections
    (only stages that receive any), by the rule in this module's docstring."""
    check_choice("sources", sources, SOURCES)
    if sources == "none":
        return {}
    return {l: (list(range(l - 1)) if sources == "all" else [0]) for l in range(2, num_stages + 1)}


def _eager_projection(proj: HierarchicalProjection, x: torch.Tensor) -> torch.Tensor:
    """``proj(x)`` computed with its eager modules (pool -> conv -> bn)."""
    if proj.stride > 1:
        x = F.avg_pool2d(x, proj.stride, proj.stride, ceil_mode=proj.ceil_mode, count_include_pad=False)
    return proj.bn(proj.conv(x))


class HierarchicalBlock(nn.Module):
    """A residual block, ``relu(F(x) + shortcut(x))``, that can receive projections
    of lower levels on its output or input side (see the module docstring).

    Subclasses build ``self.shortcut`` (a module, or None for no shortcut) and
    implement :meth:`branch` (the residual function ``F``).
    """

    shortcut: nn.Module | None

    def __init__(self, side: str = "output"):
        super().__init__()
        check_choice("side", side, SIDES)
        self.side = side
        self.projections = nn.ModuleList()
        self.projection_sources: list[int] = []
        self.capture_addends = False
        self.addends: dict[str, torch.Tensor] | None = None
        self.ablate: set[str] = set()

    def add_projection(self, source: int, projection: HierarchicalProjection) -> None:
        """Let ``projection`` of level ``source`` enter this block."""
        self.projections.append(projection)
        self.projection_sources.append(source)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual function ``F``."""
        raise NotImplementedError

    def _add_projections(self, base: torch.Tensor, levels, captured: dict | None, pooled: dict | None
                         ) -> torch.Tensor:
        """``base + sum_k P_k(levels[k])`` over the projections not ablated, chained through
        the fused op's ``residual`` (from ``pooled[k]``, level k already pooled with the
        other targets of its source, where given), or summed eagerly into ``captured``."""
        for k, proj in zip(self.projection_sources, self.projections):
            key = f"P{k}"
            if key in self.ablate:
                continue
            if captured is not None:
                p = _eager_projection(proj, levels[k])
                captured[key] = p.detach()
                base = base + p
            elif pooled is not None and k in pooled:
                base = proj(pooled[k], residual=base, pooled=True)
            else:
                base = proj(levels[k], residual=base)
        return base

    def forward(self, x: torch.Tensor, levels=(), pooled: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """``levels``: the outputs of the levels below (index = level); only blocks
        with projections read it. ``pooled``: ``{k: levels[k] pooled by P_k's stride}``
        (by :meth:`HiResNet.forward_features`, one pooling call per source level)."""
        captured = {} if self.capture_addends else None
        if self.side == "input":
            x = self._add_projections(x, levels, captured, pooled)
        out = f = self.branch(x)
        s = None if self.shortcut is None else self.shortcut(x)
        if s is not None:
            out = out + s
        if self.side == "output":
            out = self._add_projections(out, levels, captured, pooled)
        if captured is not None:
            shortcut = {} if s is None else {"shortcut": s.detach()}
            self.addends = {"F": f.detach(), **shortcut, **captured}
        return torch.relu(out)

    def extra_repr(self) -> str:
        if not self.projection_sources:
            return ""
        return f"side={self.side!r}, projection_sources={self.projection_sources}"


def projection_stride(sizes_down: list[int], source: int, target: int) -> int:
    """Pooling factor from level ``source`` to a point at level ``target``:
    the product of the downsampling factors ``sizes_down[source + 1 .. target]``."""
    return math.prod(sizes_down[source + 1:target + 1])
