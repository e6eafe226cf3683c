// Shape rules shared by the CPU and CUDA kernels; the same as hires_kernels/shapes.py.
#pragma once

#include <cstdint>

// Output length of avg_pool2d(kernel = stride = s, no padding), as ATen's
// pooling_output_shape: floor division, so 0 (not 1) when size < s in floor mode; in ceil
// mode a last, partial window is kept only if it starts inside the input.
inline int64_t pooled_size(int64_t size, int64_t s, bool ceil_mode) {
  if (s == 1) return size;
  const int64_t num = size - s + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((s - 1 - num) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= size) out -= 1;
  return out;
}
