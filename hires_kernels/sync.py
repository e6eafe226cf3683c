"""Cross-process batch statistics for the hierarchical projection (SyncBatchNorm-style).

:func:`sync_projection` computes exactly what :func:`hires_kernels.fused_projection`
computes, except that the per-channel batch statistics are those of the *whole*
batch spread over the ranks of a ``torch.distributed`` process group, as
``nn.SyncBatchNorm`` does for a plain BatchNorm:

Forward (training): every rank computes, per output channel, its count ``n_r``, mean
``mu_r`` and centred sum of squares ``M2_r = sum (y - mu_r)^2`` (two-pass, in float32
or float64); one ``all_gather`` exchanges them and they are combined with Chan et al.'s
parallel formula ``mu = sum n_r mu_r / n``, ``M2 = sum M2_r + n_r (mu_r - mu)^2``, which
stays accurate for activations with a large mean (no naive ``E[y^2] - E[y]^2``).

Backward: the per-channel sums ``sum g`` and ``sum g * yhat`` are all-reduced and
divided by the global count, so the input gradient equals that of a single process
on the concatenated batch (with the per-rank parameter gradients summing to the
single-process ones, which DDP then averages).

The pooling, 1x1 conv and their backward run with the ``reference`` backend's torch
code, so this path works on every device and dtype that torch.distributed supports
(gloo on CPU, NCCL on CUDA).

:func:`convert_sync_projection` switches every
:class:`~hires_kernels.HierarchicalProjection` of a model to this op (its ``forward``
calls :func:`sync_projection` in training mode when ``sync_group`` is set).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .backends import reference
from .projection import _autocast, _check_python_types, _validate, fused_projection, prepare, update_running_stats
from .shapes import data_shift, memory_format_of

__all__ = ["sync_projection", "convert_sync_projection"]


def _world(process_group):
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _global_stats(y: torch.Tensor, offset: torch.Tensor, p: torch.Tensor, p_offset: torch.Tensor, process_group):
    """Statistics over all ranks of activations known on each rank up to a per-channel
    offset (which may differ between ranks): ``y + offset`` ([N, C_out, H', W']) and the
    pooled input ``p + p_offset`` ([N, C_in, H', W']).

    Returns (count, mean of y, biased var of y, mean of p), means in this rank's frame.
    Counts, means and centred sums of squares are combined in float64 (Chan et al.).
    """
    c = y.shape[1]
    var_l, mean_l = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    pmean_l = p.mean(dim=(0, 2, 3))
    n_l = y.numel() // c
    world = _world(process_group)
    if world == 1:
        return n_l, mean_l, var_l, pmean_l
    f64 = torch.float64  # add the offsets in float64: they may be much larger than the spread
    packed = torch.cat([var_l.new_full((1,), float(n_l)).to(f64), mean_l.to(f64) + offset.to(f64),
                        var_l.to(f64) * n_l, pmean_l.to(f64) + p_offset.to(f64)])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=process_group)
    allv = torch.stack(gathered)                       # [world, 1 + 2 C_out + C_in]
    counts, means, m2s = allv[:, :1], allv[:, 1:1 + c], allv[:, 1 + c:1 + 2 * c]
    pmeans = allv[:, 1 + 2 * c:]
    n = counts.sum()
    mean = (counts * means).sum(0) / n
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    pmean = (counts * pmeans).sum(0) / n
    return (int(round(n.item())), (mean - offset.to(f64)).to(y.dtype), (m2 / n).to(y.dtype),
            (pmean - p_offset.to(f64)).to(y.dtype))


class _SyncProjection(torch.autograd.Function):
    """Pool -> 1x1 conv -> BatchNorm with global statistics (-> + residual)."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, residual, stride, ceil_mode, eps, process_group):
        acc = weight.dtype
        fmt = memory_format_of(x)
        # As fused_projection does: subtract a per-channel shift near the data (the
        # mean of the first pooling window) so that sums stay accurate for large means.
        shift = data_shift(x, stride, acc)
        p = x.to(acc) - shift[None, :, None, None]
        if stride > 1:
            p = F.avg_pool2d(p, stride, stride, ceil_mode=ceil_mode, count_include_pad=False)
        y = F.conv2d(p, weight[:, :, None, None])
        # In float64: the frames of different ranks must line up to better than the spread.
        w_shift = weight.detach().double() @ shift.double()
        count, mean, var, pmean = _global_stats(y, w_shift, p, shift, process_group)
        out = reference.normalize(y, mean, var, eps, bn_weight, bn_bias, residual)
        out = out.to(x.dtype).contiguous(memory_format=fmt)
        # Stride 1 keeps x itself (the shift is subtracted again in backward).
        saved = x if stride == 1 else p.to(x.dtype).contiguous(memory_format=fmt)
        ctx.save_for_backward(saved, shift, weight, bn_weight, mean, var, pmean)
        ctx.meta = (stride, ceil_mode, x.shape[2], x.shape[3], eps, process_group, count,
                    x.dtype, fmt, bn_weight is not None, bn_bias is not None)
        stats = ((mean.double() + w_shift).to(acc), var, mean.new_full((), float(count)))
        stats = tuple(t.detach().clone() for t in stats)
        ctx.mark_non_differentiable(*stats)
        return (out,) + stats

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gc):
        saved, shift, weight, bn_weight, mean, var, pmean = ctx.saved_tensors
        stride, ceil_mode, in_h, in_w, eps, group, count, x_dtype, fmt, has_w, has_b = ctx.meta
        acc = weight.dtype
        g = grad_out.to(acc).contiguous(memory_format=fmt)
        p = reference.saved_input(saved, shift if stride == 1 else None, acc)
        yhat, rstd = reference.normalized(p, weight, mean, var, eps)
        local = torch.cat(reference.grad_sums(g, yhat))
        sums = local.clone()
        if _world(group) > 1:
            dist.all_reduce(sums, group=group)
        c = weight.shape[0]
        dbeta, dgamma = sums[:c], sums[c:]
        scale = rstd if bn_weight is None else rstd * bn_weight
        dy = scale[:, None, None] * (g - (dbeta / count)[:, None, None] - yhat * (dgamma / count)[:, None, None])
        grad_x, dweight = reference.conv_pool_backward(dy, p, weight, stride, ceil_mode, in_h, in_w)
        # It computed sum dy (p - shift)^T. The exact dW is sum dy p^T = sum dy (p - c)^T for
        # any c common to all ranks, because dy sums to zero over the whole batch (not over
        # this rank's part). c = the global mean of p keeps every rank's term small, so
        # DDP's sum over ranks does not cancel large numbers: subtract (sum dy)(c - shift)^T.
        dweight = dweight - torch.outer(dy.sum(dim=(0, 2, 3)), pmean)
        needs = ctx.needs_input_grad
        return (grad_x.to(x_dtype).contiguous(memory_format=fmt) if needs[0] else None,
                dweight if needs[1] else None,
                local[c:] if needs[2] and has_w else None,
                local[:c] if needs[3] and has_b else None,
                grad_out if needs[4] else None,
                None, None, None, None)


def sync_projection(
    x, weight, bn_weight, bn_bias, running_mean, running_var, residual=None, *,
    stride=1, training=True, momentum=0.1, eps=1e-5, ceil_mode=False, process_group=None,
):
    """:func:`hires_kernels.fused_projection` with batch statistics shared across ranks.

    Same arguments, result and running-statistics update as ``fused_projection``
    (SPEC §2), except that in training mode the mean and variance are those of the
    batch gathered over ``process_group`` (None = the default group; without an
    initialised process group it is a single-process op). Gradients to ``bn_weight``
    and ``bn_bias`` are this rank's contributions (DDP reduces them, like any
    parameter gradient); the input gradient uses the all-reduced ``sum g`` and
    ``sum g * yhat``, as ``nn.SyncBatchNorm`` does. In eval mode no communication
    happens and the op equals ``fused_projection``.

    Every rank must call it the same number of times with the same channel count
    (it is a collective in training mode).
    """
    _check_python_types(x, stride)
    x, residual = _autocast(x, residual)
    _validate(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, training, eps, ceil_mode)
    if not training:
        return fused_projection(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                stride=stride, training=False, momentum=momentum, eps=eps, ceil_mode=ceil_mode)
    x, w, gamma, beta, residual = prepare(x, weight, bn_weight, bn_bias, residual)
    with torch.autocast(x.device.type, enabled=False):
        out, mean, var, count = _SyncProjection.apply(
            x, w, gamma, beta, residual, stride, ceil_mode, float(eps), process_group)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, float(count), momentum)
    return out


def convert_sync_projection(model: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Make every :class:`~hires_kernels.HierarchicalProjection` in ``model`` share batch
    statistics over ``process_group`` (None = the default group) in training mode.

    Sets ``module.sync_group`` in place and returns ``model``. Use it together with
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` for the model's other BatchNorms.
    """
    from .module import HierarchicalProjection

    group = process_group if process_group is not None else (
        dist.group.WORLD if dist.is_available() else None)
    for m in model.modules():
        if isinstance(m, HierarchicalProjection):
            m.sync_group = group
    return model
