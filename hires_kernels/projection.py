"""The fused hierarchical projection: avgpool -> 1x1 conv -> BatchNorm (-> + residual).

This module holds the public op and its eager reference (the oracle every backend is
tested against). The ``cpu`` and ``cuda`` backends are one C++ op per direction,
``torch.ops.hires.projection`` and ``projection_backward`` (csrc/ops.cpp), with their
autograd in C++ and every per-call step (checks, data shift, statistics, running
statistics) inside the kernel call: :func:`fused_projection` makes one call. The
``reference`` and ``triton`` backends, written in Python, run through the Python custom
ops below, which do the same per-call steps with torch ops. The call path is mapped in
docs/kernels.md; the math of forward and backward is in the docstring of
:mod:`hires_kernels.backends.reference`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import backends
from .pooling import pool_source
from .shapes import data_shift, memory_format_of, pooled_size

__all__ = ["fused_projection", "fused_projections", "projection_reference"]

_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def projection_reference(
    x, weight, bn_weight, bn_bias, running_mean, running_var, residual=None, *,
    stride=1, training=True, momentum=0.1, eps=1e-5, ceil_mode=False,
):
    """The eager composition that :func:`fused_projection` must reproduce exactly
    (SPEC §2), including its in-place update of the running statistics."""
    c_out = weight.shape[0]
    p = F.avg_pool2d(x, stride, stride, ceil_mode=ceil_mode, count_include_pad=False) if stride > 1 else x
    y = F.conv2d(p, weight.reshape(c_out, -1, 1, 1))
    z = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return z if residual is None else residual + z


def _fail(msg: str, exc=ValueError):
    raise exc(f"fused_projection: {msg}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_python_types(x, stride):
    """What the C++ schema cannot say clearly: x must be a tensor (its device picks the
    backend) and stride a Python int (a float would otherwise be a schema TypeError)."""
    if not isinstance(x, torch.Tensor):
        _fail(f"x must be a 4-D tensor [N, C_in, H, W], got {_shape(x)}")
    if not (type(stride) is int and stride >= 1):
        _fail(f"stride must be an integer >= 1, got {stride!r}")


def _validate(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, training, eps, ceil_mode,
              cast=None):
    """The Python backends' copy of csrc/projection_args.h's check_forward: every
    documented error, raised before any kernel runs or any state changes. ``cast``: the
    dtype autocast will give x and residual before the call (they are checked as if cast).

    Messages are formatted only on failure: this runs on every call."""
    x_dtype = x.dtype if cast is None else cast
    if x.dim() != 4:
        _fail(f"x must be a 4-D tensor [N, C_in, H, W], got {_shape(x)}")
    if x_dtype not in _ACTIVATION_DTYPES:
        _fail(f"x has dtype {x_dtype}; expected one of float32, bfloat16, float16, float64")
    n, c_in, h, w = x.shape
    if n == 0:
        _fail("x is an empty batch (N == 0)")
    if h == 0 or w == 0:
        _fail(f"x has an empty spatial size {h}x{w}")
    if not isinstance(weight, torch.Tensor):
        _fail("weight must be a tensor")
    if not (weight.dim() == 2 or (weight.dim() == 4 and weight.shape[2:] == (1, 1))):
        _fail(f"weight must be [C_out, C_in] or [C_out, C_in, 1, 1], got {_shape(weight)}")
    c_out = weight.shape[0]
    if c_in == 0 or c_out == 0:
        _fail(f"no channels: C_in={c_in}, C_out={c_out}")
    if weight.shape[1] != c_in:
        _fail(f"weight has {weight.shape[1]} input channels but x has C_in={c_in}")
    if not weight.is_floating_point():
        _fail(f"weight must be floating point, got {weight.dtype}")
    if not eps > 0:
        _fail(f"eps must be > 0, got {eps}")
    h_out, w_out = pooled_size(h, stride, ceil_mode), pooled_size(w, stride, ceil_mode)
    if h_out < 1 or w_out < 1:
        _fail(f"stride={stride} is larger than the input {h}x{w} (pooled size {h_out}x{w_out}); "
              "use ceil_mode=True or a smaller stride")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if not (isinstance(t, torch.Tensor) and t.shape == (c_out,)):
            _fail(f"{name} must have shape [C_out]=[{c_out}], got {_shape(t) if isinstance(t, torch.Tensor) else repr(t)}")
        if not t.is_floating_point():
            _fail(f"{name} must be floating point, got {t.dtype}")
    if (running_mean is None) != (running_var is None):
        _fail("running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        _fail("running_mean and running_var are required in eval mode (training=False)")
    if training and running_mean is not None:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t.stride(0) == 0 and t.shape[0] > 1:  # a 1-D view shares memory only so
                _fail(f"{name} has elements that share memory (e.g. an expanded view); it cannot be updated in place")
    if residual is not None:
        if not (isinstance(residual, torch.Tensor) and residual.shape == (n, c_out, h_out, w_out)):
            _fail(f"residual must have shape [N, C_out, H', W']={[n, c_out, h_out, w_out]}, got {_shape(residual)}")
        if cast is None and residual.dtype != x.dtype:
            _fail(f"residual has dtype {residual.dtype} but x has {x.dtype}; they must match")
    for name, t in (("weight", weight), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var), ("residual", residual)):
        if t is not None and t.device != x.device:
            _fail(f"{name} is on {t.device} but x is on {x.device}", RuntimeError)
    if training and n * h_out * w_out <= 1:
        _fail(f"expected more than 1 value per channel when training, got input of size {tuple(x.shape)} "
              f"(pooled to {h_out}x{w_out})")


def _autocast(x, residual):
    """x and residual in the autocast dtype when autocast is on for x's device, as the
    conv this op replaces would run; parameters and statistics stay float32."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        residual = residual.to(dtype) if isinstance(residual, torch.Tensor) else residual
    return x, residual


def prepare(x, weight, bn_weight, bn_bias, residual):
    """The Python backends' inputs: activations dense in x's memory format, parameters
    contiguous in the accumulation dtype, weight as a [C_out, C_in] matrix (as
    csrc/projection_args.h's prepare_forward does for the compiled ones)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    residual = None if residual is None else residual.contiguous(memory_format=fmt)
    gamma, beta = (None if t is None else t.to(acc).contiguous() for t in (bn_weight, bn_bias))
    w = weight.reshape(weight.shape[0], weight.shape[1]).to(acc).contiguous()
    return x, w, gamma, beta, residual


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """F.batch_norm's momentum update, with the unbiased variance of ``count`` values."""
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_((var * (count / (count - 1))).to(running_var.dtype), alpha=momentum)


# --- the Python backends' ops ------------------------------------------------------
#
# reference and triton are Python code, so they cannot be kernels of the C++ op; they run
# as torch.library custom ops of their own, which torch.compile, fake tensors and
# dispatch modes see. The op does not mutate the running statistics (torch.library gives
# no autograd to mutating custom ops): _python_projection updates them after the call.


def _forward_kernels(
    x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
    residual: torch.Tensor | None, mean_in: torch.Tensor | None, var_in: torch.Tensor | None,
    stride: int, ceil_mode: bool, training: bool, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, pooled input saved for backward or empty at stride 1, conv output y
    kept for backward or empty, mean, var)."""
    return backends.get(backend).forward(
        x, shift, weight, bn_weight, bn_bias, residual, mean_in, var_in, stride, ceil_mode, training, eps)


def _backward_kernels(
    grad_out: torch.Tensor, saved: torch.Tensor, y: torch.Tensor | None, shift: torch.Tensor | None,
    weight: torch.Tensor, bn_weight: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor, stride: int,
    ceil_mode: bool, in_h: int, in_w: int, training: bool, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias)."""
    return backends.get(backend).backward(
        grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps)


_forward_op = torch.library.custom_op("hires_py::projection_forward", _forward_kernels, mutates_args=())
_backward_op = torch.library.custom_op("hires_py::projection_backward", _backward_kernels, mutates_args=())


@_forward_op.register_fake
def _(x, shift, weight, bn_weight, bn_bias, residual, mean_in, var_in, stride, ceil_mode, training, eps, backend):
    n, c_in, h, w = x.shape
    fmt = memory_format_of(x)
    shape = (pooled_size(h, stride, ceil_mode), pooled_size(w, stride, ceil_mode))
    out = x.new_empty((n, weight.shape[0], *shape)).contiguous(memory_format=fmt)
    pooled = x.new_empty((n, c_in, *shape)).contiguous(memory_format=fmt) if stride > 1 else x.new_empty(0)
    y = (weight.new_empty((n, weight.shape[0], *shape)).contiguous(memory_format=fmt)
         if training and backends.keeps_conv_output(backend) else weight.new_empty(0))
    stats = weight.new_empty(weight.shape[0])
    return out, pooled, y, stats, torch.empty_like(stats)


@_backward_op.register_fake
def _(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps, backend):
    grad_x = grad_out.new_empty((grad_out.shape[0], weight.shape[1], in_h, in_w))
    return (grad_x.contiguous(memory_format=memory_format_of(grad_out)), torch.empty_like(weight),
            torch.empty_like(mean), torch.empty_like(mean))


def _setup_context(ctx, inputs, output):
    x, shift, weight, bn_weight, bn_bias, residual, _, _, stride, ceil_mode, training, eps, backend = inputs
    _, pooled, y, mean, var = output
    # Only `out` has a gradient: the others would otherwise get zero-filled gradients.
    ctx.mark_non_differentiable(pooled, y, mean, var)
    ctx.set_materialize_grads(False)
    # Stride 1 saves x itself (no copy) and subtracts the shift again in backward;
    # otherwise the pooled input, already shifted. y is empty unless the backend keeps it.
    ctx.save_for_backward(x if stride == 1 else pooled, y, shift, weight, bn_weight, mean, var)
    ctx.meta = (stride, ceil_mode, x.shape[2], x.shape[3], training, eps, backend, memory_format_of(x))


def _backward(ctx, grad_out, *_):
    saved, y, shift, weight, bn_weight, mean, var = ctx.saved_tensors
    stride, ceil_mode, in_h, in_w, training, eps, backend, fmt = ctx.meta
    if grad_out is None:  # an undefined gradient (gradcheck tests that it is accepted)
        return (None,) * len(ctx.needs_input_grad)
    grad_out = grad_out.contiguous(memory_format=fmt)
    # Inside torch.func the backward must refuse to be differentiated with a clear error;
    # eager torch.func needs a Function of ours for that (the custom op's has no formula).
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        run_backward = functools.partial(_FunctorchBackward.apply, torch.ops.hires_py.projection_backward.default)
    else:
        run_backward = torch.ops.hires_py.projection_backward.default  # an OpOverload, which dynamo traces
    grad_x, grad_w, grad_gamma, grad_beta = run_backward(
        grad_out, saved, y if y.numel() else None, shift if stride == 1 else None, weight, bn_weight, mean, var,
        stride, ceil_mode, in_h, in_w, training, eps, backend)
    if not training:
        # dW = sum_m dy (p + shift)^T: the kernels summed dy p^T with the shifted p.
        # (In training sum_m dy = 0, so the shift drops out exactly.)
        scale = torch.rsqrt(var + eps) * (1 if bn_weight is None else bn_weight)
        grad_w = grad_w + torch.outer(scale * grad_beta, shift)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, None, grad_w if needs[2] else None,
            grad_gamma if needs[3] else None, grad_beta if needs[4] else None,
            grad_out if needs[5] else None, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(_NO_DOUBLE_BACKWARD)


_backward_op.register_autograd(_refuse_double_backward)


class _FunctorchProjection(torch.autograd.Function):
    """The custom op under torch.func transforms (grad, vjp), which need an
    autograd.Function with a separate setup_context: the one torch.library generates for
    a custom op has none (pytorch/pytorch#168393)."""

    @staticmethod
    def forward(*inputs):
        return torch.ops.hires_py.projection_forward.default(*inputs)  # an OpOverload, which dynamo traces

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


class _FunctorchBackward(torch.autograd.Function):
    """A backward op under torch.func transforms, refusing double backward. Called
    through this Function, whose forward runs below the transform's level, the op's own
    autograd is not asked to handle the transform."""

    @staticmethod
    def forward(op, *inputs):
        return op(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_DOUBLE_BACKWARD)


_NO_DOUBLE_BACKWARD = ("fused_projection: its backward cannot be differentiated (double backward, e.g. "
                       "create_graph=True or nested torch.func.grad, is not supported)")


class _CompiledUnderTransforms(torch.autograd.Function):
    """The compiled op under torch.func transforms: its C++ autograd cannot serve them
    (torch::autograd::Function refuses functorch), so this Function saves the same
    tensors and calls the same backward op, through _FunctorchBackward."""

    @staticmethod
    def forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, ceil_mode, training,
                momentum, eps):
        # Autograd runs this without grad: the op records nothing, and its C++ autograd
        # does not meet the transform.
        return backends.compiled_projection(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                            stride, ceil_mode, training, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bn_weight, _, _, _, _, stride, ceil_mode, training, _, eps = inputs
        _, saved, y, shift, mean, var = output
        ctx.mark_non_differentiable(saved, y, shift, mean, var)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x if stride == 1 else saved, y, shift, weight, bn_weight, mean, var)
        ctx.meta = (stride, ceil_mode, x.shape[2], x.shape[3], training, eps)

    @staticmethod
    def backward(ctx, grad_out, *_):
        if grad_out is None:
            return (None,) * 12
        run_backward = functools.partial(_FunctorchBackward.apply, torch.ops.hires.projection_backward.default)
        grads = (*run_backward(grad_out, *ctx.saved_tensors, *ctx.meta), None, None, grad_out)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None,) * 5


def _python_projection(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                       stride, training, momentum, eps, ceil_mode, backend):
    _validate(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, training, eps, ceil_mode)
    if x.dtype not in backends.get(backend).DTYPES:
        raise RuntimeError(f"fused_projection: backend {backend!r} does not support dtype {x.dtype}")
    x, w, gamma, beta, residual = prepare(x, weight, bn_weight, bn_bias, residual)
    # A per-channel shift taken from the data keeps the kernels' sums accurate for
    # activations with a large mean; the statistics are corrected by W @ shift, in the
    # accumulation dtype whatever the caller's autocast.
    with torch.autocast(x.device.type, enabled=False):
        shift = data_shift(x, stride, w.dtype)
        w_shift = w.detach() @ shift
        mean_in = var_in = None
        if not training:
            mean_in = running_mean.detach().to(w.dtype) - w_shift
            var_in = running_var.detach().to(w.dtype).contiguous()
        op = _FunctorchProjection.apply if torch._C._are_functorch_transforms_active() else _forward_op
        out, _, _, mean, var = op(x, shift, w, gamma, beta, residual, mean_in, var_in,
                                  stride, ceil_mode, training, float(eps), backend)
        if training and running_mean is not None:
            update_running_stats(running_mean, running_var, mean + w_shift, var, out.numel() // out.shape[1], momentum)
    return out


# --- public op ---------------------------------------------------------------------

def fused_projection(
    x, weight, bn_weight, bn_bias, running_mean, running_var, residual=None, *,
    stride=1, training=True, momentum=0.1, eps=1e-5, ceil_mode=False, backend=None,
):
    """``avg_pool2d(stride) -> conv2d(1x1) -> batch_norm (-> + residual)`` in one fused op.

    Returns exactly what :func:`projection_reference` returns and updates
    ``running_mean`` / ``running_var`` in place as ``F.batch_norm`` does (training
    mode, unbiased variance, ``momentum``). See SPEC §2 for the full contract.

    Args:
        x: ``[N, C_in, H, W]`` activations (float32, bfloat16, float16; float64 for checks),
            NCHW or channels_last; the output keeps its memory format.
        weight: 1x1 conv weights, ``[C_out, C_in]`` or ``[C_out, C_in, 1, 1]``.
        bn_weight, bn_bias: BatchNorm affine parameters ``[C_out]`` or None.
        running_mean, running_var: BatchNorm running statistics ``[C_out]`` or None
            (required in eval mode).
        residual: optional ``[N, C_out, H', W']`` tensor added to the result.
        stride: pooling window and stride (1 = no pooling).
        training: normalise with batch statistics and update the running ones.
        momentum, eps: as in ``F.batch_norm``.
        ceil_mode: pooling keeps a last, partial window (averaged over its valid elements).
        backend: ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"auto"``;
            default ``$HIRES_BACKEND`` or the fastest available for ``x.device``.

    Under ``torch.autocast`` the activations run in the autocast dtype, like the conv
    this op replaces; parameters and statistics stay in float32. float32 GEMMs on a GPU run
    in TF32 only where torch allows TF32 for float32 matmuls (``torch.backends.cuda.matmul``'s
    ``allow_tf32`` or ``fp32_precision``; SPEC §3: within 2e-3), in IEEE float32 otherwise.
    """
    _check_python_types(x, stride)
    x, residual = _autocast(x, residual)
    name = backends.resolve_backend(backend, x.device, x.dtype)
    transformed = torch._C._are_functorch_transforms_active()
    if transformed and torch.compiler.is_compiling():
        # dynamo inlines an autograd.Function's forward under torch.func transforms, which
        # would lose the compiled op's gradient: the reference kernels (a custom op with
        # Python autograd) serve torch.compile(torch.func.grad(...)).
        name = "reference"
    if name in backends.COMPILED:
        op = _CompiledUnderTransforms.apply if transformed else backends.compiled_projection
        return op(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                  stride, ceil_mode, training, float(momentum), float(eps))[0]
    return _python_projection(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                              stride, training, momentum, eps, ceil_mode, name)


def _fail_projections(msg: str):
    raise ValueError(f"fused_projections: {msg}")


def _per_target(value, k: int, name: str) -> list[float]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * k
    if len(values) != k:
        _fail_projections(f"{name} needs one value per target ({k}), got {len(values)}")
    return values


def check_call(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, training, eps, ceil_mode):
    """Every check :func:`fused_projection` makes of these arguments, raised the same way,
    without running it: callers of several projections check them all before the first
    call moves its statistics."""
    _check_python_types(x, stride)
    cast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    _validate(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, training, eps, ceil_mode,
              cast)


def fused_projections(
    x, weights, bn_weights, bn_biases, running_means, running_vars, residuals=None, *,
    strides, training=True, momentum=0.1, eps=1e-5, ceil_mode=False, backend=None,
):
    """Every projection of one source ``x``: ``[fused_projection(x, weights[t], bn_weights[t],
    bn_biases[t], running_means[t], running_vars[t], residuals[t], stride=strides[t], ...) for t]``
    up to rounding: the pooled input is rounded to x's dtype, as ``avg_pool2d`` rounds it.

    ``x`` is pooled once for every target (:func:`hires_kernels.pooling.pool_source`: one
    read of x, and in backward one write of its gradient), then each target's projection
    runs at stride 1 on its pooled input, with its residual fused. Every target's arguments
    are checked before the first call.

    Args:
        x: ``[N, C_in, H, W]``, as for :func:`fused_projection`.
        weights, bn_weights, bn_biases, running_means, running_vars: one entry per target.
        residuals: None, or one entry (a tensor or None) per target.
        strides: each target's pooling factor.
        momentum, eps: one value for all targets or a sequence of one per target.
        training, ceil_mode, backend: as for :func:`fused_projection`, shared by the targets.
    """
    k = len(weights)
    if k == 0:
        _fail_projections("no targets (weights is empty)")
    residuals = [None] * k if residuals is None else residuals
    lists = {"bn_weights": bn_weights, "bn_biases": bn_biases, "running_means": running_means,
             "running_vars": running_vars, "residuals": residuals, "strides": strides}
    for name, values in lists.items():
        if len(values) != k:
            _fail_projections(f"{name} needs one entry per target ({k} weights), got {len(values)}")
    momenta, epss = _per_target(momentum, k, "momentum"), _per_target(eps, k, "eps")
    # Every target is checked before the first one's call moves its statistics.
    for w, g, b, rm, rv, r, s, e in zip(weights, bn_weights, bn_biases, running_means, running_vars, residuals,
                                        strides, epss):
        check_call(x, w, g, b, rm, rv, r, s, training, e, ceil_mode)
    return [fused_projection(p, w, g, b, rm, rv, r, stride=1, training=training, momentum=m, eps=e, backend=backend)
            for p, w, g, b, rm, rv, r, m, e in zip(pool_source(x, strides, ceil_mode=ceil_mode), weights, bn_weights,
                                                   bn_biases, running_means, running_vars, residuals, momenta, epss)]
