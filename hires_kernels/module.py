"""``HierarchicalProjection``: the projection as an nn.Module, fused or eager."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .pooling import pool_source
from .projection import check_call, fused_projection, projection_reference

__all__ = ["BatchNormArgs", "HierarchicalProjection", "batch_norm_args", "project_source"]


class BatchNormArgs(NamedTuple):
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    training: bool   # normalise with batch statistics
    momentum: float
    counter: torch.Tensor | None   # num_batches_tracked, when it moves on


def batch_norm_args(training: bool, bn: nn.BatchNorm2d) -> BatchNormArgs:
    """What a projection in ``training`` mode passes to the op for its ``bn``: the same
    bookkeeping as nn.BatchNorm2d.forward, so every path matches it."""
    counter = bn.num_batches_tracked if training and bn.track_running_stats else None
    if bn.momentum is None:
        factor = 1.0 / float(counter + 1) if counter is not None else 0.0
    else:
        factor = bn.momentum
    running_mean, running_var = bn.running_mean, bn.running_var
    batch_stats = training or (running_mean is None and running_var is None)
    if training and not bn.track_running_stats:
        running_mean = running_var = None
    return BatchNormArgs(running_mean, running_var, batch_stats, factor, counter)


class HierarchicalProjection(nn.Module):
    """avgpool(stride) -> 1x1 conv -> BatchNorm, optionally added to ``residual``.

    The parameters live in the submodules ``conv`` (``nn.Conv2d``, 1x1, no bias) and
    ``bn`` (``nn.BatchNorm2d``), so the state_dict is the same whether the module runs
    the fused op (``fused=True``) or the eager composition (``fused=False``), and the
    running statistics follow ``nn.BatchNorm2d`` exactly (``momentum=None`` for a
    cumulative average, ``track_running_stats=False`` for batch statistics always).

    Args:
        in_channels, out_channels: channels of the source level and of the target.
        stride: pooling factor matching the target's spatial size (1 = none).
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``.
        ceil_mode: pool a last, partial window instead of dropping it.
        fused: run the fused op; False runs the eager modules.
        backend: fused backend name (see :func:`hires_kernels.available_backends`);
            None uses ``$HIRES_BACKEND`` or the fastest for the input's device.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, ceil_mode: bool = False, fused: bool = True,
                 backend: str | None = None, affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        if stride < 1:
            raise ValueError(f"HierarchicalProjection: stride must be >= 1, got {stride}")
        self.stride = stride
        self.ceil_mode = ceil_mode
        self.fused = fused
        self.backend = backend
        # A torch.distributed process group whose ranks share batch statistics
        # (SyncBatchNorm-style); set by hires_kernels.sync.convert_sync_projection.
        self.sync_group = None
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, pooled: bool = False
                ) -> torch.Tensor:
        """``residual + BN(conv(avgpool(x)))``; ``pooled=True``: ``x`` is already pooled by
        this projection's stride (:func:`hires_kernels.pooling.pool_source`), so no pooling."""
        a = batch_norm_args(self.training, self.bn)
        if self.sync_group is not None and self.training:
            from .sync import sync_projection

            op, kwargs = sync_projection, {"process_group": self.sync_group}
        elif self.fused:
            op, kwargs = fused_projection, {"backend": self.backend}
        else:
            op, kwargs = projection_reference, {}
        out = op(x, self.conv.weight, self.bn.weight, self.bn.bias, a.running_mean, a.running_var, residual,
                 stride=1 if pooled else self.stride, training=a.training, momentum=a.momentum, eps=self.bn.eps,
                 ceil_mode=self.ceil_mode, **kwargs)
        if a.counter is not None:
            a.counter.add_(1)
        return out

    def extra_repr(self) -> str:
        return f"stride={self.stride}, ceil_mode={self.ceil_mode}, fused={self.fused}"


def project_source(x: torch.Tensor, projections: Sequence[HierarchicalProjection],
                   residuals: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """``[p(x, r) for p, r in zip(projections, residuals)]``, with ``x`` pooled once for all of
    them (:func:`hires_kernels.pooling.pool_source`: one read of x, and in backward one
    write of its gradient); each projection then runs at stride 1 on its pooled input.
    Results, running statistics and ``num_batches_tracked`` are those of the separate calls
    up to rounding (the pooled input is rounded to x's dtype, as ``avg_pool2d`` rounds it).
    Every projection's arguments are checked before the first one runs.
    """
    if residuals is None:
        residuals = [None] * len(projections)
    if len(residuals) != len(projections):
        raise ValueError(f"project_source: {len(projections)} projections but {len(residuals)} residuals")
    if not projections:
        return []
    if any(p.ceil_mode != projections[0].ceil_mode for p in projections):
        raise ValueError("project_source: the projections pool with different ceil_mode; call each one instead")
    for p, r in zip(projections, residuals):
        a = batch_norm_args(p.training, p.bn)
        check_call(x, p.conv.weight, p.bn.weight, p.bn.bias, a.running_mean, a.running_var, r, p.stride, a.training,
                   p.bn.eps, p.ceil_mode)
    pooled = pool_source(x, [p.stride for p in projections], ceil_mode=projections[0].ceil_mode)
    return [p(q, r, pooled=True) for p, q, r in zip(projections, pooled, residuals)]
