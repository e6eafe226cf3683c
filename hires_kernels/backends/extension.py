"""The ``cpu`` and ``cuda`` backends: the compiled op of ``csrc/``.

``torch.ops.hires.projection`` and ``projection_backward`` are defined once in C++
(csrc/ops.cpp) with a CPU kernel (csrc/cpu), a CUDA kernel when built with CUDA
(csrc/cuda) and an Autograd kernel (csrc/autograd.cpp); the dispatcher picks by the
tensors' device. So are ``pool_source`` and ``pool_source_backward`` (hires_kernels.pooling).
This module imports them and gives them the fake kernels that torch.compile and fake
tensors trace with.
"""

from __future__ import annotations

import torch

from ..shapes import memory_format_of, pooled_size, saved_memory_format

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    from .. import _C  # noqa: F401  (registers torch.ops.hires)

    _IMPORT_ERROR = None
except ImportError as e:
    _IMPORT_ERROR = e

# Devices whose training forward keeps the float32 conv output y for backward (one GEMM
# fewer there, at the memory eager's conv output takes); the others recompute it.
_KEEPS_CONV_OUTPUT = frozenset({"cpu"})


def _built_for(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("hires::projection", dispatch_key)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return f"the C++ extension hires_kernels._C is not built ({_IMPORT_ERROR}); run `pip install -e . --no-build-isolation`"
    if device.type != name:
        return f"the {name!r} backend runs {name} tensors only"
    if not _built_for(name.upper()):
        return (f"the extension was built without {name} kernels"
                + (" (no nvcc or a CPU-only torch at build time)" if name == "cuda" else ""))
    return None


def has_pool_source(device_type: str) -> bool:
    """Whether hires::pool_source has a kernel for ``device_type``."""
    return _IMPORT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "hires::pool_source", device_type.upper())


if _IMPORT_ERROR is None:
    projection = torch.ops.hires.projection.default
    pool_source = torch.ops.hires.pool_source.default

    @torch.library.register_fake("hires::projection")
    def _(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, ceil_mode, training,
          momentum, eps):
        n, c_in, h, w = x.shape
        c_out = weight.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        fmt = memory_format_of(x)
        size = (pooled_size(h, stride, ceil_mode), pooled_size(w, stride, ceil_mode))
        out = x.new_empty((n, c_out, *size)).contiguous(memory_format=fmt)
        saved = x.new_empty((n, c_in, *size)).contiguous(memory_format=fmt) if stride > 1 else x.new_empty(0)
        y = (x.new_empty((n, c_out, *size), dtype=acc).contiguous(memory_format=fmt)
             if training and x.device.type in _KEEPS_CONV_OUTPUT else x.new_empty(0, dtype=acc))
        shift = x.new_empty(c_in, dtype=acc)
        stats = x.new_empty(c_out, dtype=acc)
        return out, saved, y, shift, stats, torch.empty_like(stats)

    @torch.library.register_fake("hires::projection_backward")
    def _(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps):
        grad_x = grad_out.new_empty((grad_out.shape[0], weight.shape[1], in_h, in_w))
        return (grad_x.contiguous(memory_format=saved_memory_format(saved)), mean.new_empty(weight.shape),
                torch.empty_like(mean), torch.empty_like(mean))

    @torch.library.register_fake("hires::pool_source")
    def _(x, stride, ceil_mode):
        n, c, h, w = x.shape
        fmt = memory_format_of(x)
        return [x.new_empty((n, c, pooled_size(h, s, ceil_mode), pooled_size(w, s, ceil_mode)))
                .contiguous(memory_format=fmt) for s in stride]

    @torch.library.register_fake("hires::pool_source_backward")
    def _(grad, stride, ceil_mode, in_h, in_w, channels_last):
        n, c = grad[0].shape[:2]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return grad[0].new_empty((n, c, in_h, in_w)).contiguous(memory_format=fmt)
