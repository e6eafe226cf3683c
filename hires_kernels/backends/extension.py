"""The ``cpu`` and ``cuda`` backends: the compiled op of ``csrc/``.

``torch.ops.hires.projection`` and ``projection_backward`` are defined once in C++
(csrc/ops.cpp) with a CPU kernel (csrc/cpu), a CUDA kernel when built with CUDA
(csrc/cuda) and an Autograd kernel (csrc/autograd.cpp); the dispatcher picks by the
tensors' device. This module imports them and gives them the fake kernels that
torch.compile and fake tensors trace with.
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


def has_projections(device_type: str) -> bool:
    """Whether the per-source op (hires::projections) has kernels for ``device_type``."""
    return _IMPORT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "hires::projections_forward", device_type.upper())


if _IMPORT_ERROR is None:
    projection = torch.ops.hires.projection.default
    projections = torch.ops.hires.projections.default

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

    def _fake_stride1_projection(p, c_out, training):
        """(out, y, shift, mean, var) of the stride-1 projection of ``p`` that
        hires::projections runs per target."""
        n, c_in, h, w = p.shape
        fmt = memory_format_of(p)
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        out = p.new_empty((n, c_out, h, w)).contiguous(memory_format=fmt)
        y = (p.new_empty((n, c_out, h, w), dtype=acc).contiguous(memory_format=fmt)
             if training and p.device.type in _KEEPS_CONV_OUTPUT else p.new_empty(0, dtype=acc))
        stats = p.new_empty(c_out, dtype=acc)
        return out, y, p.new_empty(c_in, dtype=acc), stats, torch.empty_like(stats)

    @torch.library.register_fake("hires::projections_forward")
    def _(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, ceil_mode, training, eps):
        n, c_in, h, w = x.shape
        dense = x.contiguous(memory_format=memory_format_of(x))
        results = {name: [] for name in ("out", "saved", "y", "shift", "mean", "var")}
        for wt, s in zip(weight, stride):
            size = (pooled_size(h, s, ceil_mode), pooled_size(w, s, ceil_mode))
            pooled = dense.new_empty((n, c_in, *size)).contiguous(memory_format=memory_format_of(x)) if s > 1 else dense
            out, y, shift, mean, var = _fake_stride1_projection(pooled, wt.shape[0], training)
            for name, t in zip(results, (out, pooled if s > 1 else x.new_empty(0), y, shift, mean, var)):
                results[name].append(t)
        return tuple(results.values())

    @torch.library.register_fake("hires::projections_update_stats")
    def _(running_mean, running_var, weight, shift, mean, var, count, momentum):
        return None

    @torch.library.register_fake("hires::projections_backward")
    def _(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps):
        n, c_in = saved[0].shape[:2]
        grad_x = grad_out[0].new_empty((n, c_in, in_h, in_w)).contiguous(memory_format=saved_memory_format(saved[0]))
        return (grad_x, [m.new_empty(wt.shape) for m, wt in zip(mean, weight)],
                [torch.empty_like(m) for m in mean], [torch.empty_like(m) for m in mean])
