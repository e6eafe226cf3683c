// hires::pool_source: one source level average-pooled once for every projection it feeds
// (csrc/ops.cpp). A HiResNet level feeds up to three later stages, each at its own stride;
// each target's projection then runs at stride 1 on its pooled input, with the block's
// residual fused, so x is read once in forward and, through the op's backward
// (hires::pool_source_backward), grad_x is written once, every target's gradient summed
// in the kernel rather than by autograd.
//   forward   pooled_t = avgpool_{s_t}(x)                   (x read once)
//   backward  grad_x = sum_t unpool_{s_t}(grad_pooled_t)    (grad_x written once)
// The checks are shared by the devices' kernels (csrc/cpu, csrc/cuda), which pool every
// stride from sums of the next finer stride's windows: each stride must divide the next.
#pragma once

#include <algorithm>
#include <vector>

#include "projection_args.h"

namespace hires {

inline void check_pool_strides(at::IntArrayRef stride, const char* op) {
  TORCH_CHECK_VALUE(!stride.empty(), op, ": no strides");
  std::vector<int64_t> s(stride.begin(), stride.end());
  std::sort(s.begin(), s.end());
  TORCH_CHECK_VALUE(s.front() > 1, op, ": every stride must be > 1 (a stride-1 target reads x itself), got ", stride);
  TORCH_CHECK_VALUE(s.back() <= INT32_MAX, op, ": stride ", s.back(), " is too large");
  for (size_t i = 1; i < s.size(); ++i) {
    TORCH_CHECK_VALUE(s[i] != s[i - 1], op, ": strides must be distinct, got ", stride);
    TORCH_CHECK_VALUE(s[i] % s[i - 1] == 0, op, ": every stride must divide the larger ones, got ", stride,
                      "; pool per target instead");
  }
}

inline void check_pool_source(const at::Tensor& x, at::IntArrayRef stride, bool ceil_mode) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 4, "pool_source: x must be a 4-D tensor [N, C, H, W], got ",
                    x.defined() ? x.sizes() : at::IntArrayRef{});
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                    "pool_source: x has dtype ", dt, "; expected one of float32, bfloat16, float16, float64");
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, "pool_source: x is empty, ",
                    x.size(0), "x", x.size(1), "x", x.size(2), "x", x.size(3));
  check_pool_strides(stride, "pool_source");
  for (int64_t s : stride) {
    TORCH_CHECK_VALUE(pooled_size(x.size(2), s, ceil_mode) >= 1 && pooled_size(x.size(3), s, ceil_mode) >= 1,
                      "pool_source: stride=", s, " is larger than the input ", x.size(2), "x", x.size(3),
                      "; use ceil_mode=True or a smaller stride");
  }
}

inline void check_pool_source_backward(at::TensorList grad, at::IntArrayRef stride, bool ceil_mode, int64_t in_h,
                                       int64_t in_w) {
  check_pool_strides(stride, "pool_source_backward");
  TORCH_CHECK_VALUE(grad.size() == stride.size(), "pool_source_backward: one gradient per stride: got ",
                    grad.size(), " for ", stride.size(), " strides");
  for (size_t t = 0; t < grad.size(); ++t) {
    const at::Tensor& g = grad[t];
    TORCH_CHECK_VALUE(g.defined() && g.dim() == 4, "pool_source_backward: grad[", t, "] must be a 4-D tensor, got ",
                      g.defined() ? g.sizes() : at::IntArrayRef{});
    TORCH_CHECK_VALUE(g.size(0) == grad[0].size(0) && g.size(1) == grad[0].size(1) &&
                          g.size(2) == pooled_size(in_h, stride[t], ceil_mode) &&
                          g.size(3) == pooled_size(in_w, stride[t], ceil_mode) &&
                          g.scalar_type() == grad[0].scalar_type(),
                      "pool_source_backward: grad[", t, "] (", g.size(0), "x", g.size(1), "x", g.size(2), "x",
                      g.size(3), ", ", g.scalar_type(), ")", " is not the input ",
                      in_h, "x", in_w, " pooled with stride ", stride[t], " in grad[0]'s batch, channels and dtype");
    TORCH_CHECK(g.device() == grad[0].device(), "pool_source_backward: grad[", t, "] is on ", g.device(),
                " but grad[0] is on ", grad[0].device());
  }
}

}  // namespace hires
