"""``fuse(model)``: run a model's avg-pool -> 1x1 conv -> BatchNorm paths with the fused op.

Converts, in place and keeping every state_dict key:

- :class:`~hires_kernels.HierarchicalProjection` modules built with ``fused=False``
  (they switch to ``fused=True``);
- ``nn.Sequential(pool, nn.Conv2d 1x1, nn.BatchNorm2d)`` where ``pool`` is
  ``nn.AvgPool2d(kernel_size=s, stride=s, padding=0)`` or ``nn.Identity`` (s = 1):
  the shortcut (``downsample``) of timm's ResNet-D family. It becomes a
  :class:`FusedPoolConvBN`, the same ``nn.Sequential`` with the same children
  ``0, 1, 2``, whose forward calls :func:`~hires_kernels.fused_projection`: on CPU
  and CUDA tensors the compiled op, one call per direction instead of the pool, conv
  and BatchNorm kernels (tests/test_fuse.py checks it on timm's resnet26d and resnet50d).

The pooling of such a Sequential may use ``count_include_pad=True`` (the op's is
False): without padding no window covers padding, in floor and in ceil mode alike
(PyTorch clips a ceil-mode window to the input), so both divide by the elements
the window covers. Anything else (a conv with bias, stride, groups or a larger
kernel; a pool with padding, ``divisor_override`` or kernel != stride; a norm
other than exactly ``nn.BatchNorm2d``) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .backends import BACKENDS
from .module import HierarchicalProjection

__all__ = ["Conversion", "FusedPoolConvBN", "fuse"]


class FusedPoolConvBN(nn.Sequential):
    """``nn.Sequential(pool, conv, bn)`` that runs as one fused projection.

    It holds the original children (so the state_dict and the parameters are the
    same objects) and exposes what :meth:`HierarchicalProjection.forward` reads
    (``conv``, ``bn``, ``stride``, ``ceil_mode``, ``fused``, ``backend``,
    ``sync_group``), so it runs that very forward: the same BatchNorm bookkeeping
    (momentum, ``num_batches_tracked``, eval mode) as ``nn.BatchNorm2d``.
    """

    forward = HierarchicalProjection.forward
    extra_repr = HierarchicalProjection.extra_repr

    def __init__(self, pool: nn.Module, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, stride: int,
                 ceil_mode: bool, backend: str | None = None):
        super().__init__(pool, conv, bn)
        self.stride = stride
        self.ceil_mode = ceil_mode
        self.fused = True
        self.backend = backend
        self.sync_group = None

    @property
    def conv(self) -> nn.Conv2d:
        return self[1]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[2]


@dataclass(frozen=True)
class Conversion:
    """One module converted by :func:`fuse`: its name, what it was, what it is now."""

    name: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.name}: {self.before} -> {self.after}"


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pool_stride(pool: nn.Module) -> tuple[int, bool] | None:
    """``(stride, ceil_mode)`` of a pool the op can run, or None."""
    if isinstance(pool, nn.Identity):
        return 1, False
    if type(pool) is not nn.AvgPool2d or pool.divisor_override is not None:
        return None
    kernel, stride, padding = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding)
    if kernel[0] != kernel[1] or kernel != stride or padding != (0, 0):
        return None
    return int(kernel[0]), bool(pool.ceil_mode)


def _is_pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is None)


def _as_fused(seq: nn.Module, backend: str | None) -> FusedPoolConvBN | None:
    """The fused replacement of a pool -> 1x1 conv -> BN Sequential, or None."""
    if type(seq) is not nn.Sequential or len(seq) != 3:
        return None
    pool, conv, bn = seq
    pooling = _pool_stride(pool)
    if pooling is None or not _is_pointwise(conv) or type(bn) is not nn.BatchNorm2d:
        return None
    fused = FusedPoolConvBN(pool, conv, bn, stride=pooling[0], ceil_mode=pooling[1], backend=backend)
    fused.train(seq.training)
    return fused


def fuse(model: nn.Module, backend: str | None = None) -> list[Conversion]:
    """Convert ``model`` in place (see the module docstring); returns what changed.

    Args:
        model: any module; parameters, buffers and state_dict keys stay the same.
        backend: the fused backend of the converted modules (None: ``$HIRES_BACKEND``
            or the fastest for the input's device).
    """
    if backend is not None and backend not in BACKENDS + ("auto",):
        raise ValueError(f"fuse: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    report = []
    # Collected first: replacing children while iterating named_modules is unsafe.
    for name, module in list(model.named_modules()):
        if isinstance(module, HierarchicalProjection):
            if not module.fused:
                module.fused, module.backend = True, backend or module.backend
                report.append(Conversion(name, "HierarchicalProjection(fused=False)", "HierarchicalProjection(fused=True)"))
            continue
        fused = _as_fused(module, backend)
        if fused is not None:
            if not name:
                raise ValueError("fuse: the model itself is a pool -> conv -> bn Sequential; "
                                 "wrap it or use FusedPoolConvBN directly")
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, fused)
            report.append(Conversion(name, f"Sequential({type(module[0]).__name__}, Conv2d 1x1, BatchNorm2d)",
                                     f"FusedPoolConvBN(stride={fused.stride}, ceil_mode={fused.ceil_mode})"))
    return report
