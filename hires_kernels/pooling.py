"""``pool_source``: one source level average-pooled once for every stride its
projections need.

A HiResNet level feeds up to three later stages, each through a projection of its own
stride. Pooling the level once for all of them, then running each projection at stride 1
on its pooled input with the block's residual fused, reads the level once in forward
and, in backward, writes its gradient once: ``torch.ops.hires.pool_source`` (csrc/ops.cpp)
pools every stride from sums of the next finer stride's windows, and its backward
(``pool_source_backward``) sums every stride's gradient into one grad_x in the kernel,
where separate pools would leave autograd to add one full-size gradient per target.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import backends

__all__ = ["pool_source"]


def pool_source(x: torch.Tensor, strides: Sequence[int], *, ceil_mode: bool = False) -> list[torch.Tensor]:
    """``[avg_pool2d(x, s, s, ceil_mode=ceil_mode, count_include_pad=False) for s in strides]``,
    with ``x`` itself for a stride of 1 and one shared tensor for a repeated stride.

    Where the extension has kernels for x's device, the strides above 1 are pooled by one
    call that reads x once (each must divide the larger ones, as HiResNet's powers of two
    do); elsewhere (no extension, torch.func transforms, strides that do not nest) by one
    eager ``avg_pool2d`` per stride, with the same results.

    Args:
        x: ``[N, C, H, W]`` in float32, bfloat16, float16 or float64, any layout; the
            results keep its dtype and memory format.
        strides: one pooling factor (kernel = stride, no padding) per target.
        ceil_mode: pool a last, partial window instead of dropping it.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"pool_source: x must be a 4-D tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not all(type(s) is int and s >= 1 for s in strides):
        raise ValueError(f"pool_source: every stride must be an integer >= 1, got {list(strides)}")
    # Dynamo traces the plan's few lines once per graph; the cache serves eager calls.
    plan = _plan.__wrapped__ if torch.compiler.is_compiling() else _plan
    levels, nested, where = plan(tuple(strides))
    if not levels:
        return [x for _ in strides]
    if nested and backends.pools_source(x.device.type) and not torch._C._are_functorch_transforms_active():
        pooled = backends.compiled_pool_source(x, levels, ceil_mode)
    else:
        pooled = [F.avg_pool2d(x, s, s, ceil_mode=ceil_mode, count_include_pad=False) for s in levels]
    return [x if i is None else pooled[i] for i in where]


@functools.lru_cache(maxsize=None)
def _plan(strides: tuple[int, ...]) -> tuple[tuple[int, ...], bool, tuple[int | None, ...]]:
    """(the distinct strides > 1 ascending, whether each divides the next, each stride's
    index among them or None for 1): worked out once per tuple, as this runs every step."""
    levels = tuple(sorted({s for s in strides if s > 1}))
    nested = all(b % a == 0 for a, b in zip(levels, levels[1:]))
    return levels, nested, tuple(levels.index(s) if s > 1 else None for s in strides)
