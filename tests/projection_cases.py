"""Shared fixtures for the fused projection tests: which backends run here, the
shape cases, and the comparison against a float64 run of the eager composition."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import hires_kernels
from hires_kernels.projection import projection_reference
from hires_kernels.shapes import pooled_size

HAS_CUDA = torch.cuda.is_available()


def backend_params(devices=("cpu", "cuda")):
    """pytest params (backend, device) for every backend on every device; those that
    cannot run here are skipped with the reason (e.g. no GPU, extension not built).

    Triton runs CPU tensors under TRITON_INTERPRET=1 (CI) and CUDA tensors on a GPU.
    """
    import pytest
    from hires_kernels.backends import BACKENDS, unavailable_reason

    params = []
    for device in devices:
        for name in BACKENDS:
            if name in ("cpu", "cuda") and name != device:
                continue  # the compiled backends are per device by construction
            if device == "cuda" and not HAS_CUDA:
                reason = "needs a CUDA device"
            else:
                reason = unavailable_reason(name, device)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    return params


@dataclass(frozen=True)
class Case:
    n: int = 3
    c_in: int = 5
    h: int = 7
    w: int = 9
    c_out: int = 6
    stride: int = 2
    ceil_mode: bool = False
    training: bool = True
    residual: bool = True
    affine: bool = True
    running: bool = True
    layout: str = "nchw"  # "nchw" | "channels_last" | "strided" | "misaligned"
    offset: float = 0.0  # added to x: large means test the variance's stability

    def __str__(self):
        return (f"{self.n}x{self.c_in}x{self.h}x{self.w}->{self.c_out}-s{self.stride}"
                f"{'-ceil' if self.ceil_mode else ''}-{'train' if self.training else 'eval'}"
                f"{'' if self.residual else '-nores'}{'' if self.affine else '-noaffine'}"
                f"{'' if self.running else '-norunning'}-{self.layout}{f'-mean{self.offset:g}' if self.offset else ''}")

    @property
    def out_hw(self):
        return pooled_size(self.h, self.stride, self.ceil_mode), pooled_size(self.w, self.stride, self.ceil_mode)


CASES = [
    Case(),
    Case(ceil_mode=True),
    Case(stride=1, h=5, w=4),
    Case(stride=3, ceil_mode=True, layout="channels_last"),
    Case(stride=8, h=16, w=17, c_in=4, c_out=7, n=2),
    Case(stride=4, h=9, w=10, ceil_mode=True, n=2),
    Case(n=1, h=6, w=6, stride=2),
    Case(training=False),
    Case(training=False, stride=3, ceil_mode=True, layout="channels_last"),
    Case(residual=False, affine=False),
    Case(running=False, layout="strided"),
    Case(layout="strided", training=False),
    Case(layout="channels_last", stride=1, h=4, w=3),
    Case(offset=1000.0, n=4),
    Case(n=2, c_in=33, c_out=17, h=12, w=10, stride=2),
    # Channels in 16-byte runs: the CUDA kernels' vector paths; one element off alignment,
    # their element-wise paths on the same shape.
    Case(n=2, c_in=16, c_out=24, h=9, w=7, stride=2, ceil_mode=True, layout="channels_last"),
    Case(n=2, c_in=16, c_out=24, h=5, w=6, stride=1, training=False, layout="channels_last"),
    Case(n=2, c_in=16, c_out=24, h=9, w=7, stride=2, ceil_mode=True, layout="misaligned"),
]


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=0, rounded_as=None):
    """Inputs for one case, drawn in float64 so every dtype sees the same values.

    ``rounded_as``: give float64 tensors holding exactly the values a run in that
    dtype sees (activations rounded to it, parameters to float32): the oracle's input.
    """
    g = torch.Generator().manual_seed(seed)
    ho, wo = case.out_hw

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = rnd(case.n, case.c_in, case.h, case.w) + case.offset
    t = dict(
        x=x,
        weight=rnd(case.c_out, case.c_in, scale=case.c_in ** -0.5),
        bn_weight=1 + 0.5 * rnd(case.c_out) if case.affine else None,
        bn_bias=0.5 * rnd(case.c_out) if case.affine else None,
        running_mean=rnd(case.c_out) if case.running else None,
        running_var=(0.5 + torch.rand(case.c_out, generator=g, dtype=torch.float64)) if case.running else None,
        residual=rnd(case.n, case.c_out, ho, wo) if case.residual else None,
        grad=rnd(case.n, case.c_out, ho, wo),
    )
    if case.offset and not case.training:
        t["running_mean"] = t["running_mean"] + case.offset * t["weight"].sum(1)
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
            continue
        activation = k in ("x", "residual", "grad")
        if rounded_as is not None:
            out[k] = v.to(rounded_as if activation else torch.float32).to(device=device, dtype=torch.float64)
        else:
            param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            out[k] = v.to(device=device, dtype=dtype if activation else param_dtype)
    return out


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "misaligned":  # channels_last in storage one element off 16-byte alignment
        storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        dense = t.contiguous(memory_format=torch.channels_last)
        return storage[1:].as_strided(t.shape, dense.stride()).copy_(t)
    if how == "strided":  # a non-contiguous view with the same values
        big = torch.zeros(t.shape[0], t.shape[1] * 2, t.shape[2], t.shape[3] + 3, dtype=t.dtype, device=t.device)
        big[:, ::2, :, 1:-2] = t
        return big[:, ::2, :, 1:-2]
    return t


def run(fn, case: Case, inp: dict, **kwargs):
    """Forward + backward of ``fn`` (fused_projection or projection_reference).

    Returns (out, grads dict, running_mean, running_var) with running stats updated.
    """
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
              for k, v in inp.items() if k in ("x", "weight", "bn_weight", "bn_bias", "residual")}
    x = layout(leaves["x"], case.layout)
    residual = layout(leaves["residual"], case.layout) if leaves["residual"] is not None else None
    rm = inp["running_mean"].clone() if inp["running_mean"] is not None else None
    rv = inp["running_var"].clone() if inp["running_var"] is not None else None
    out = fn(x, leaves["weight"], leaves["bn_weight"], leaves["bn_bias"], rm, rv, residual,
             stride=case.stride, training=case.training, ceil_mode=case.ceil_mode, **kwargs)
    out.backward(layout(inp["grad"], case.layout))
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return out, grads, rm, rv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def oracle(case: Case, dtype=torch.float32, seed=0):
    """Float64 eager run on CPU, on the inputs as a ``dtype`` run sees them: the ground truth."""
    return run(projection_reference, case, make_inputs(case, seed=seed, rounded_as=dtype))


def eager_lowp(case: Case, dtype, device, seed=0):
    """The eager composition in a low-precision dtype, as autocast would run it: the
    conv in ``dtype`` (its weight cast), BatchNorm with float32 parameters."""
    inp = make_inputs(case, dtype, device, seed)

    def eager(x, weight, bn_weight, bn_bias, rm, rv, residual, **kw):
        return projection_reference(x, weight.to(dtype), bn_weight, bn_bias, rm, rv, residual, **kw)

    return run(eager, case, inp)


def errors(result, reference) -> dict:
    """Relative errors of output, every gradient and the running statistics."""
    out, grads, rm, rv = result
    ref_out, ref_grads, ref_rm, ref_rv = reference
    errs = {"out": rel_err(out, ref_out)}
    errs.update({f"grad_{k}": rel_err(v, ref_grads[k]) for k, v in grads.items()})
    if rm is not None:
        errs["running_mean"] = rel_err(rm, ref_rm)
        errs["running_var"] = rel_err(rv, ref_rv)
    return errs


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
