"""``HierarchicalProjection``: the projection as an nn.Module, fused or eager."""

from __future__ import annotations

import torch
from torch import nn

from .projection import fused_projection, projection_reference


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bn = self.bn
        # The same bookkeeping as nn.BatchNorm2d.forward, so both paths match it.
        counting = self.training and bn.track_running_stats and bn.num_batches_tracked is not None
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked + 1) if counting else 0.0
        else:
            factor = bn.momentum
        batch_stats = self.training or (bn.running_mean is None and bn.running_var is None)
        track = not self.training or bn.track_running_stats
        if self.sync_group is not None and self.training:
            from .sync import sync_projection

            op, kwargs = sync_projection, {"process_group": self.sync_group}
        elif self.fused:
            op, kwargs = fused_projection, {"backend": self.backend}
        else:
            op, kwargs = projection_reference, {}
        out = op(x, self.conv.weight, bn.weight, bn.bias,
                 bn.running_mean if track else None, bn.running_var if track else None, residual,
                 stride=self.stride, training=batch_stats, momentum=factor, eps=bn.eps,
                 ceil_mode=self.ceil_mode, **kwargs)
        if counting:
            bn.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        return f"stride={self.stride}, ceil_mode={self.ceil_mode}, fused={self.fused}"
