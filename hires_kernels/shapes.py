"""Shape and layout rules shared by every backend, so that all of them agree."""

from __future__ import annotations

import torch


def pooled_size(size: int, stride: int, ceil_mode: bool) -> int:
    """Output length of ``avg_pool2d(kernel=stride, stride=stride, padding=0)``.

    Same rule as ATen's ``pooling_output_shape``: in ceil mode a last, partial
    window is kept only if it starts inside the input.
    """
    if stride == 1:
        return size
    out = (size - stride + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size:
        out -= 1
    return out


def window_counts(in_h: int, in_w: int, stride: int, ceil_mode: bool, *, device=None, dtype=torch.float32):
    """Number of input rows (and columns) averaged by each output row (and column).

    With ``count_include_pad=False`` and no padding, a partial last window (ceil
    mode) divides by the elements it actually covers.
    """
    def counts(size):
        n = pooled_size(size, stride, ceil_mode)
        start = torch.arange(n, device=device) * stride
        return (torch.clamp(start + stride, max=size) - start).to(dtype)

    return counts(in_h), counts(in_w)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout a result should keep: channels_last when ``t`` is laid out NHWC.

    Dense tensors keep their own format; a non-contiguous view follows the order of
    its strides, as ``suggest_memory_format`` does.
    """
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    s = t.stride()
    return torch.channels_last if s[1] < s[3] <= s[2] <= s[0] else torch.contiguous_format


def saved_memory_format(saved: torch.Tensor) -> torch.memory_format:
    """x's layout, read off what the forward saved for backward (csrc/projection_args.h's
    rule): x itself, or the pooled input allocated in x's layout, whose strides still
    tell the layout when its 1x1 positions make it dense in both."""
    if saved.is_contiguous() and saved.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last if saved.stride(1) < saved.stride(3) else torch.contiguous_format
    return memory_format_of(saved)


def data_shift(x: torch.Tensor, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel constant near the data: the mean of the first pooling window.

    Subtracting it before summing keeps the kernels' sums accurate for activations
    with a large mean; the first pooled value is near the data at every stride.
    Non-finite values give 0, so a NaN or Inf stays where it is instead of spreading.
    """
    first = x.detach()[0, :, :stride, :stride].to(dtype).mean(dim=(1, 2))
    return torch.nan_to_num(first, nan=0.0, posinf=0.0, neginf=0.0)
