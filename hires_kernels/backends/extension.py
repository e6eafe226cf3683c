"""The ``cpu`` and ``cuda`` backends: the compiled kernels of ``csrc/``.

``torch.ops.hires_C`` holds one schema with a CPU kernel (csrc/cpu) and, when built
with CUDA, a CUDA kernel (csrc/cuda); the dispatcher picks by the tensors' device.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    from .. import _C  # noqa: F401  (registers torch.ops.hires_C)

    _IMPORT_ERROR = None
except ImportError as e:
    _IMPORT_ERROR = e


def _built_for(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("hires_C::projection_forward", dispatch_key)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return f"the C++ extension hires_kernels._C is not built ({_IMPORT_ERROR}); run `pip install -e . --no-build-isolation`"
    if device.type != name:
        return f"the {name!r} backend runs {name} tensors only"
    if not _built_for(name.upper()):
        return (f"the extension was built without {name} kernels"
                + (" (no nvcc or a CPU-only torch at build time)" if name == "cuda" else ""))
    return None


def forward(x, shift, weight, bn_weight, bn_bias, residual, mean_in, var_in, stride, ceil_mode, training, eps):
    return torch.ops.hires_C.projection_forward(
        x, shift, weight, bn_weight, bn_bias, residual, mean_in, var_in, stride, ceil_mode, training, eps
    )


def backward(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps):
    return torch.ops.hires_C.projection_backward(
        grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps
    )
