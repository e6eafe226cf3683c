"""Backend registry: which kernels can run the fused projection here, and the default.

Every backend module exposes ``forward`` and ``backward`` with the signatures of
:mod:`hires_kernels.backends.reference` (its docstring holds the math and which
tensors pass from forward to backward), an
``unavailable_reason(device)`` returning ``None`` when it can run tensors of that
device, and ``DTYPES``, the activation dtypes it supports. Inputs arrive validated,
dense in one memory format (NCHW or NHWC) shared by ``x`` and ``residual``, with the
parameters in the accumulation dtype (float32, or float64 for float64 activations).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
# Backends served by the compiled op (csrc/): one C++ call per direction.
COMPILED = ("cpu", "cuda")
ENV_VAR = "HIRES_BACKEND"

# Backends whose training forward returns the conv output y = W p for backward to reuse
# (one GEMM fewer there, at the memory eager's conv output takes); the others return an
# empty y and recompute it.
_KEEPS_CONV_OUTPUT = frozenset({"reference", "cpu"})

# The default for a device, fastest first.
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def _import(name: str) -> ModuleType | Exception:
    try:
        return importlib.import_module(f"{__name__}.{'extension' if name in ('cpu', 'cuda') else name}")
    except Exception as e:  # noqa: BLE001  (a missing or broken triton must not break the package)
        return e


# Imported once, here: resolving a backend inside a torch.compile'd model must not import.
_MODULES = {name: _import(name) for name in BACKENDS}


# torch.ops.hires.projection: the cpu and cuda backends' one call (csrc/ops.cpp); None
# when the extension is not built (then neither backend resolves).
compiled_projection = getattr(_MODULES["cpu"], "projection", None)
# torch.ops.hires.pool_source: one source pooled once for every stride (hires_kernels.pooling).
compiled_pool_source = getattr(_MODULES["cpu"], "pool_source", None)

# Devices with a kernel of it, read once: the kernels register when _C is imported.
_POOL_SOURCE_DEVICES = frozenset(
    d for d in ("cpu", "cuda") if not isinstance(_MODULES["cpu"], Exception) and _MODULES["cpu"].has_pool_source(d))


def pools_source(device_type: str) -> bool:
    """Whether ``torch.ops.hires.pool_source`` has a kernel for ``device_type``."""
    return device_type in _POOL_SOURCE_DEVICES


def _module(name: str) -> ModuleType:
    module = _MODULES[name]
    if isinstance(module, Exception):
        raise module
    return module


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run tensors on ``device`` here, or None if it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
    module = _MODULES[name]
    if isinstance(module, Exception):
        return f"backend {name!r} cannot be imported: {module}"
    return module.unavailable_reason(name, torch.device(device))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run the fused projection on ``device``.

    With no device, the backends usable for any device present (CPU, and CUDA when
    a GPU is visible).
    """
    devices = [torch.device(device)] if device is not None else (
        [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    )
    return [n for n in BACKENDS if any(unavailable_reason(n, d) is None for d in devices)]


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run: ``requested``, else ``$HIRES_BACKEND``, else the
    fastest available for ``device`` (and ``dtype``, when given). An explicit choice
    that cannot run is an error."""
    return _resolve(requested, os.environ.get(ENV_VAR), device.type, dtype)


@torch.compiler.assume_constant_result
def _resolve(requested: str | None, env: str | None, device_type: str, dtype: torch.dtype | None) -> str:
    return _resolve_cached(requested, env, device_type, dtype)


@functools.lru_cache(maxsize=None)
def _resolve_cached(requested: str | None, env: str | None, device_type: str, dtype: torch.dtype | None) -> str:
    device = torch.device(device_type)
    name = requested or env or "auto"
    if name == "auto":
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None and (dtype is None or dtype in _module(candidate).DTYPES):
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        source = "backend=" if requested else f"${ENV_VAR}="
        raise RuntimeError(f"fused_projection: {source}{name!r} cannot run on {device}: {reason}")
    return name


def get(name: str) -> ModuleType:
    return _module(name)


def keeps_conv_output(name: str) -> bool:
    """Whether backend ``name``'s training forward returns y (else an empty tensor)."""
    return name in _KEEPS_CONV_OUTPUT

