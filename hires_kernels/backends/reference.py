"""The ``reference`` backend: the fused projection's kernels written with torch ops.

It runs on every device and dtype and states, in plain tensor code, the contract and
the math that the ``cpu``, ``triton`` and ``cuda`` kernels implement.

Contract (every backend): inputs arrive validated; ``x`` and ``residual`` dense in one
memory format (NCHW or NHWC); parameters contiguous in the accumulation dtype (float32,
or float64 for float64 activations); results keep the activations' dtype and format.
``shift`` [C_in] is a per-channel constant subtracted from the activations as they are
loaded (``x`` in forward, ``saved`` in backward when ``shift`` is given): the caller picks
it near the data (the mean of x's first pooling window) so that sums stay accurate when activations have a large
mean, and corrects the per-channel statistics for it (W @ shift), see projection.py.

Notation (per output channel c, M = N * H' * W' positions, W the 1x1 weights):

Forward::

    p     = avgpool_s(x - shift)              (count_include_pad=False, floor or ceil)
    y     = W p
    mean  = mean_m(y),  var = mean_m((y - mean)^2)      training (biased, two-pass);
    mean, var = mean_in, var_in                          eval
    rstd  = 1 / sqrt(var + eps),  yhat = (y - mean) * rstd
    out   = gamma * yhat + beta (+ residual)       (subtract mean before scaling)
    returns out, pooled = p (saved for backward; empty at stride 1),
            y (training, in the accumulation dtype, for backends that keep it for
               backward, see ``backends.keeps_conv_output``; otherwise empty), mean, var

Backward, with g = dL/dout and p = saved - shift (stride 1: saved is x) or saved,
and y as forward returned it (None: recomputed as W p)::

    dbeta  = sum_m g,   dgamma = sum_m g * yhat
    dy     = gamma * rstd * (g - dbeta / M - yhat * dgamma / M)     training
    dy     = gamma * rstd * g                                       eval
    dW     = sum_m dy p^T,   dp = W^T dy
    dx     = dp[i // s, j // s] / |window(i // s, j // s)|  inside a window, 0 outside
             (floor mode leaves trailing rows/columns outside every window)
    returns dx, dW, dgamma, dbeta
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..shapes import memory_format_of, window_counts

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def unavailable_reason(name, device):
    return None


def _shifted(t, shift, acc):
    return t.to(acc) - shift[None, :, None, None]


def forward(x, shift, weight, bn_weight, bn_bias, residual, mean_in, var_in, stride, ceil_mode, training, eps):
    """Returns (out, pooled, y, mean, var); this backend keeps y in training."""
    acc = weight.dtype
    fmt = memory_format_of(x)
    p = _shifted(x, shift, acc)
    if stride > 1:
        p = F.avg_pool2d(p, stride, stride, ceil_mode=ceil_mode, count_include_pad=False)
    y = F.conv2d(p, weight[:, :, None, None])
    if training:
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    else:
        mean, var = mean_in.clone(), var_in.clone()
    out = normalize(y, mean, var, eps, bn_weight, bn_bias, residual)
    out = out.to(x.dtype).contiguous(memory_format=fmt)
    pooled = p.to(x.dtype).contiguous(memory_format=fmt) if stride > 1 else x.new_empty(0)
    kept = y.contiguous(memory_format=fmt) if training else weight.new_empty(0)
    return out, pooled, kept, mean, var


def normalize(y, mean, var, eps, bn_weight, bn_bias, residual):
    """gamma * (y - mean) / sqrt(var + eps) + beta (+ residual), in y's dtype."""
    scale = torch.rsqrt(var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    # (y - mean) * scale, not y * scale - mean * scale: the shifted mean may still
    # be larger than the spread, and the second form cancels.
    out = (y - mean[:, None, None]) * scale[:, None, None]
    if bn_bias is not None:
        out = out + bn_bias[:, None, None]
    return out if residual is None else out + residual


def saved_input(saved, shift, acc):
    """The shifted pooled input p that backward works on (see the contract)."""
    return saved.to(acc) if shift is None else _shifted(saved, shift, acc)


def normalized(p, weight, mean, var, eps, y=None):
    """(yhat, rstd): the normalised conv output (y, or recomputed from p when y is None),
    and 1/sqrt(var + eps)."""
    rstd = torch.rsqrt(var + eps)
    if y is None:
        y = F.conv2d(p, weight[:, :, None, None])
    return (y - mean[:, None, None]) * rstd[:, None, None], rstd


def grad_sums(g, yhat):
    """(dbeta, dgamma) = (sum_m g, sum_m g * yhat) per channel."""
    return g.sum(dim=(0, 2, 3)), (g * yhat).sum(dim=(0, 2, 3))


def conv_pool_backward(dy, p, weight, stride, ceil_mode, in_h, in_w):
    """(dx, dW) from dy = dL/dy: the backward of the 1x1 conv and of the pooling."""
    dweight = torch.einsum("nchw,nkhw->ck", dy, p)
    dp = F.conv2d(dy, weight.t()[:, :, None, None])
    if stride > 1:
        ch, cw = window_counts(in_h, in_w, stride, ceil_mode, device=dp.device, dtype=dp.dtype)
        dp = dp / (ch[:, None] * cw[None, :])
        dp = dp.repeat_interleave(stride, dim=2).repeat_interleave(stride, dim=3)[:, :, :in_h, :in_w]
        dp = F.pad(dp, (0, in_w - dp.shape[3], 0, in_h - dp.shape[2]))
    return dp, dweight


def backward(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps):
    acc = weight.dtype
    p = saved_input(saved, shift, acc)
    g = grad_out.to(acc)
    m = g.numel() // g.shape[1]
    yhat, rstd = normalized(p, weight, mean, var, eps, y)
    dbeta, dgamma = grad_sums(g, yhat)
    scale = rstd if bn_weight is None else rstd * bn_weight
    if training:
        dy = scale[:, None, None] * (g - (dbeta / m)[:, None, None] - yhat * (dgamma / m)[:, None, None])
    else:
        dy = scale[:, None, None] * g
    dx, dweight = conv_pool_backward(dy, p, weight, stride, ceil_mode, in_h, in_w)
    return dx.to(grad_out.dtype).contiguous(memory_format=memory_format_of(grad_out)), dweight, dgamma, dbeta
