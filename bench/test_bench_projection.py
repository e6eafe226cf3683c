"""Op level: the fused hierarchical projection against its eager composition.

Cases: the seven GPU shapes of SPEC §4 (N=256, N=64 for the last) in bf16 channels_last
under autocast and in float32, and three CPU shapes (float32, N=32, --bench-threads).
Providers: ``eager`` (hires_kernels.projection_reference), ``compile`` (torch.compile
of it), and the fused op with ``backend=`` ``triton`` / ``cuda`` / ``cpu``.
Modes: train / eval BatchNorm, forward / forward+backward (on GPU eval fwd+bwd with --bench-full).
Every case has a residual, as in a HiResNet block.
"""

from __future__ import annotations

import functools

import pytest
import torch

import _util

try:
    import hires_kernels
    from hires_kernels import backends as _backends

    _IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001
    hires_kernels = None
    _IMPORT_ERROR = f"hires_kernels cannot be imported: {e}"

# (C_in, H, C_out, H', N) -- stride = H // H'
GPU_SHAPES = [
    (64, 32, 128, 16, 256),
    (64, 32, 256, 8, 256),
    (64, 32, 512, 4, 256),
    (128, 16, 256, 8, 256),
    (128, 16, 512, 4, 256),
    (256, 8, 512, 4, 256),
    (256, 56, 512, 28, 64),
]
CPU_SHAPES = [
    (64, 32, 128, 16, 32),
    (64, 32, 512, 4, 32),
    (256, 8, 512, 4, 32),
]
PROVIDERS = {"cpu": ("eager", "compile", "cpu"), "cuda": ("eager", "compile", "triton", "cuda")}
MODES = ("train-fwd", "train-fwdbwd", "eval-fwd", "eval-fwdbwd")
DEFAULT_MODES = ("train-fwd", "train-fwdbwd", "eval-fwd")


def shape_label(shape) -> str:
    c_in, h, c_out, h_out, n = shape
    return f"{c_in}@{h} -> {c_out}@{h_out} (N={n})"


def shape_id(shape) -> str:
    c_in, h, c_out, h_out, n = shape
    return f"{c_in}x{h}-{c_out}x{h_out}-n{n}"


def _cases():
    for device, shapes, dtypes in (("cpu", CPU_SHAPES, ("fp32",)), ("cuda", GPU_SHAPES, ("bf16cl", "fp32"))):
        for dtype in dtypes:
            for shape in shapes:
                for mode in MODES:
                    for provider in PROVIDERS[device]:
                        marks = [pytest.mark.op, getattr(pytest.mark, "cpu" if device == "cpu" else "gpu")]
                        if provider == "compile":
                            marks.append(pytest.mark.compile)
                        yield pytest.param(device, dtype, shape, mode, provider, marks=marks,
                                           id=f"{device}-{dtype}-{shape_id(shape)}-{mode}-{provider}")


def make_inputs(device, dtype_name, shape, requires_grad):
    c_in, h, c_out, h_out, n = shape
    dtype = torch.bfloat16 if dtype_name == "bf16cl" else torch.float32
    fmt = torch.channels_last if dtype_name == "bf16cl" else torch.contiguous_format
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, dt=torch.float32, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=g) * scale + offset).to(device=device, dtype=dt)

    x = rand(n, c_in, h, h, dt=dtype).contiguous(memory_format=fmt)
    residual = rand(n, c_out, h_out, h_out, dt=dtype).contiguous(memory_format=fmt)
    weight = rand(c_out, c_in, scale=c_in ** -0.5)
    bn_weight = rand(c_out, scale=0.1, offset=1.0)
    bn_bias = rand(c_out, scale=0.1)
    running_mean = rand(c_out, scale=0.1)
    running_var = rand(c_out, scale=0.1, offset=1.0).abs()
    grad_out = rand(n, c_out, h_out, h_out, dt=dtype).contiguous(memory_format=fmt)
    leaves = (x, weight, bn_weight, bn_bias, residual)
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return dict(x=x, weight=weight, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
                running_var=running_var, residual=residual, grad_out=grad_out, leaves=leaves,
                stride=h // h_out, dtype=dtype)


def floor_bytes(shape, dtype, backward: bool) -> int:
    """SPEC §4: forward reads x and residual and writes out; backward reads grad_out
    and x and writes grad_x. Each tensor counted once."""
    c_in, h, c_out, h_out, n = shape
    x = n * c_in * h * h
    out = n * c_out * h_out * h_out
    elems = x + 2 * out
    if backward:
        elems += out + 2 * x
    return elems * torch.finfo(dtype).bits // 8


def gemm_floor_ms(shape, backward: bool, reps: int = 30) -> float:
    """Median time of the op's GEMMs on float32 CPU tensors: y = W p forward, and
    dW = dy p^T and dp = W^T dy backward (M = N H' W' columns)."""
    c_in, _, c_out, h_out, n = shape
    m = n * h_out * h_out
    w, p, dy = torch.randn(c_out, c_in), torch.randn(c_in, m), torch.randn(c_out, m)
    gemms = [(w, p)] + ([(dy, p.t()), (w.t(), dy)] if backward else [])

    def once():
        for a, b in gemms:
            torch.mm(a, b)
    return _util.host_quantile_s(once, reps, 0.5) * 1e3


def _skip_reason(device, dtype_name, mode, provider, config) -> str | None:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if device == "cuda" and mode == "eval-fwdbwd" and not config.getoption("--bench-full"):
        return "eval fwd+bwd on GPU runs with --bench-full only"
    if device == "cuda" and dtype_name == "fp32" and mode not in ("train-fwdbwd", "eval-fwd") \
            and not config.getoption("--bench-full"):
        return "float32 on GPU: train fwd+bwd and eval fwd only (all modes with --bench-full)"
    if provider == "compile" and device == "cpu" and not config.getoption("--bench-cpu-compile"):
        return "torch.compile on CPU runs with --bench-cpu-compile only (compilation is slow on 2 cores)"
    if provider in ("triton", "cuda", "cpu"):
        reason = _backends.unavailable_reason(provider, device)
        if reason is not None:
            return f"backend {provider!r} unavailable: {reason}"
    return None


@pytest.mark.parametrize("device, dtype_name, shape, mode, provider", list(_cases()))
def test_projection(benchmark, request, copy_bw, device, dtype_name, shape, mode, provider):
    reason = _skip_reason(device, dtype_name, mode, provider, request.config)
    if reason:
        pytest.skip(reason)
    training = mode.startswith("train")
    backward = mode.endswith("fwdbwd")
    inp = make_inputs(device, dtype_name, shape, requires_grad=backward or training)
    kwargs = dict(stride=inp["stride"], training=training)
    args = (inp["x"], inp["weight"], inp["bn_weight"], inp["bn_bias"], inp["running_mean"],
            inp["running_var"], inp["residual"])

    if provider == "eager":
        op = hires_kernels.projection_reference
    elif provider == "compile":
        torch._dynamo.reset()  # a fresh, static-shape compilation for this case
        op = torch.compile(hires_kernels.projection_reference, dynamic=False)
    else:
        op = functools.partial(hires_kernels.fused_projection, backend=provider)

    autocast = functools.partial(_util.autocast_ctx, device, inp["dtype"])
    grad_out, leaves = inp["grad_out"], inp["leaves"]

    if backward:
        def fn():
            with autocast():
                out = op(*args, **kwargs)
            return torch.autograd.grad(out, leaves, grad_out)
    elif training:
        def fn():  # the training forward: autograd records (and saves) as it would
            with autocast():
                return op(*args, **kwargs)
    else:
        def fn():  # inference
            with torch.no_grad(), autocast():
                return op(*args, **kwargs)

    # Warm-up includes compilation (compile provider) and autotuning.
    _util.warmup(fn, device, calls=5 if provider == "compile" else _util.WARMUP_CALLS)
    info = benchmark.extra_info
    info.update(
        level="op", device=device, dtype=dtype_name, shape=shape_label(shape), mode=mode, provider=provider,
        stride=inp["stride"], n=shape[4], threads=torch.get_num_threads(),
    )
    # CUDA-graph variant for eager and the fused backends; torch.compile's own graph
    # mode is mode="reduce-overhead", and a failed capture could poison the session.
    graph = device == "cuda" and provider != "compile"
    info.update(_util.run_benchmark(benchmark, fn, device, request.config, graph=graph))
    info.update(_util.floor_fields(floor_bytes(shape, inp["dtype"], backward), info["ms"], copy_bw(device)))
    if "ms_graph" in info:
        info["x_floor_graph"] = info["ms_graph"] / info["floor_ms"]
    if device == "cpu" and provider == "cpu":
        # On the CPU the GEMMs, not the bytes, bound the op: its floor is the GEMMs it
        # cannot avoid, timed with torch.mm at the same sizes, plus the SPEC bytes.
        info["gemm_ms"] = gemm_floor_ms(shape, backward)
        info["cpu_floor_ms"] = info["gemm_ms"] + info["floor_ms"]
        info["x_cpu_floor"] = info["ms"] / info["cpu_floor_ms"]

    if training:
        # Memory autograd keeps for backward (a training forward); "extra" leaves out
        # the inputs and parameters, which are alive anyway.
        def forward():
            with autocast():
                return op(*args, **kwargs)
        saved, extra = _util.saved_for_backward_bytes(forward, exclude=leaves + (inp["running_mean"], inp["running_var"]))
        info["saved_bytes"], info["saved_extra_bytes"] = saved, extra
    if device == "cuda":
        info["peak_mem_bytes"] = _util.cuda_peak_bytes(fn, device)
    _util.record(("op", device, dtype_name, shape, mode), provider, info["ms"], info)
