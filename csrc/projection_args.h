// The fused projection's arguments: every check of the contract (SPEC §2), and the
// preparation that each device's kernels share, in one place so that the CPU and CUDA
// kernels, the autograd kernel and a raw call of the op all reject the same inputs with
// the same messages, before any kernel runs or any state changes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <tuple>

#include "shapes.h"

namespace hires {

inline const at::Tensor& value_or_undefined(const std::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}

// NCHW or channels_last: the layout a result keeps (hires_kernels/shapes.py's rule: a
// non-contiguous view follows the order of its strides).
inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  const auto s = t.strides();
  return s[1] < s[3] && s[3] <= s[2] && s[2] <= s[0] ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The layout of x, read off what the forward saved for backward (x itself, or the pooled
// input it allocated in x's layout). A pooled input of 1x1 positions is dense in both
// layouts; its strides still tell which one it was allocated in.
inline at::MemoryFormat saved_memory_format(const at::Tensor& saved) {
  if (saved.is_contiguous() && saved.is_contiguous(at::MemoryFormat::ChannelsLast))
    return saved.stride(1) < saved.stride(3) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return memory_format_of(saved);
}

// What hires::projection returns (out, saved, y, shift, mean, var) and
// hires::projection_backward returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias).
using ProjectionResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ProjectionBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline at::ScalarType accumulation_dtype(at::ScalarType activations) {
  return activations == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks every forward argument; throws ValueError (RuntimeError for devices) naming it.
inline void check_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                          const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& residual, int64_t stride, bool ceil_mode, bool training, double eps) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 4, "fused_projection: x must be a 4-D tensor [N, C_in, H, W], got ",
                    x.defined() ? x.sizes() : at::IntArrayRef{});
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                    "fused_projection: x has dtype ", dt, "; expected one of float32, bfloat16, float16, float64");
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(N > 0, "fused_projection: x is an empty batch (N == 0)");
  TORCH_CHECK_VALUE(H > 0 && W > 0, "fused_projection: x has an empty spatial size ", H, "x", W);
  TORCH_CHECK_VALUE(weight.defined() && (weight.dim() == 2 || (weight.dim() == 4 && weight.size(2) == 1 &&
                                                                 weight.size(3) == 1)),
                    "fused_projection: weight must be [C_out, C_in] or [C_out, C_in, 1, 1], got ", weight.sizes());
  const int64_t C_out = weight.size(0);
  TORCH_CHECK_VALUE(C_in > 0 && C_out > 0, "fused_projection: no channels: C_in=", C_in, ", C_out=", C_out);
  TORCH_CHECK_VALUE(weight.size(1) == C_in, "fused_projection: weight has ", weight.size(1),
                    " input channels but x has C_in=", C_in);
  TORCH_CHECK_VALUE(weight.is_floating_point(), "fused_projection: weight must be floating point, got ",
                    weight.scalar_type());
  TORCH_CHECK_VALUE(stride >= 1, "fused_projection: stride must be an integer >= 1, got ", stride);
  TORCH_CHECK_VALUE(eps > 0, "fused_projection: eps must be > 0, got ", eps);
  const int64_t Ho = pooled_size(H, stride, ceil_mode), Wo = pooled_size(W, stride, ceil_mode);
  TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, "fused_projection: stride=", stride, " is larger than the input ", H, "x", W,
                    " (pooled size ", Ho, "x", Wo, "); use ceil_mode=True or a smaller stride");
  const std::pair<const char*, const at::Tensor*> vectors[] = {
      {"bn_weight", &bn_weight}, {"bn_bias", &bn_bias}, {"running_mean", &running_mean}, {"running_var", &running_var}};
  for (const auto& [name, t] : vectors) {
    if (!t->defined()) continue;
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C_out, "fused_projection: ", name,
                      " must have shape [C_out]=[", C_out, "], got ", t->sizes());
    TORCH_CHECK_VALUE(t->is_floating_point(), "fused_projection: ", name, " must be floating point, got ",
                      t->scalar_type());
  }
  TORCH_CHECK_VALUE(running_mean.defined() == running_var.defined(),
                    "fused_projection: running_mean and running_var must be given together or both be None");
  TORCH_CHECK_VALUE(training || running_mean.defined(),
                    "fused_projection: running_mean and running_var are required in eval mode (training=False)");
  if (training && running_mean.defined()) {
    // A view whose elements share memory (an expanded stride-0 vector) cannot take the
    // update element by element; refused here, before either statistic is written.
    for (const auto& [name, t] : {std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
      TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, "fused_projection: ", name,
                        " has elements that share memory (e.g. an expanded view); it cannot be updated in place");
    }
  }
  if (residual.defined()) {
    TORCH_CHECK_VALUE(residual.dim() == 4 && residual.size(0) == N && residual.size(1) == C_out &&
                          residual.size(2) == Ho && residual.size(3) == Wo,
                      "fused_projection: residual must have shape [N, C_out, H', W']=[", N, ", ", C_out, ", ", Ho,
                      ", ", Wo, "], got ", residual.sizes());
    TORCH_CHECK_VALUE(residual.scalar_type() == dt, "fused_projection: residual has dtype ", residual.scalar_type(),
                      " but x has ", dt, "; they must match");
  }
  const std::pair<const char*, const at::Tensor*> tensors[] = {
      {"weight", &weight},           {"bn_weight", &bn_weight},     {"bn_bias", &bn_bias},
      {"running_mean", &running_mean}, {"running_var", &running_var}, {"residual", &residual}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(!t->defined() || t->device() == x.device(), "fused_projection: ", name, " is on ", t->device(),
                " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(!training || N * Ho * Wo > 1,
                    "fused_projection: expected more than 1 value per channel when training, got input of size ",
                    x.sizes(), " (pooled to ", Ho, "x", Wo, ")");
}

// Checks what the backward needs of what the forward returned (a raw call of the
// backward op with mismatched tensors must not read out of bounds).
inline void check_backward(const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& y,
                           const at::Tensor& shift, const at::Tensor& weight, const at::Tensor& bn_weight,
                           const at::Tensor& mean, const at::Tensor& var, int64_t stride, bool ceil_mode,
                           int64_t in_h, int64_t in_w, bool training) {
  TORCH_CHECK_VALUE(stride >= 1, "projection_backward: stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(grad_out.dim() == 4, "projection_backward: grad_out must be 4-D [N, C_out, H', W'], got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 || weight.dim() == 4, "projection_backward: weight must be [C_out, C_in(, 1, 1)]");
  const int64_t N = grad_out.size(0), C_out = grad_out.size(1), Ho = grad_out.size(2), Wo = grad_out.size(3);
  const int64_t C_in = weight.size(1);
  TORCH_CHECK_VALUE(weight.size(0) == C_out && weight.numel() == C_out * C_in,
                    "projection_backward: weight ", weight.sizes(), " does not match grad_out's C_out=", C_out);
  TORCH_CHECK_VALUE(Ho == pooled_size(in_h, stride, ceil_mode) && Wo == pooled_size(in_w, stride, ceil_mode),
                    "projection_backward: grad_out's spatial size ", Ho, "x", Wo, " does not match the input ", in_h,
                    "x", in_w, " pooled with stride ", stride);
  const int64_t sh = stride == 1 ? in_h : Ho, sw = stride == 1 ? in_w : Wo;
  TORCH_CHECK_VALUE(saved.dim() == 4 && saved.size(0) == N && saved.size(1) == C_in && saved.size(2) == sh &&
                        saved.size(3) == sw && saved.scalar_type() == grad_out.scalar_type(),
                    "projection_backward: saved must be [N, C_in, H', W'] in grad_out's dtype, got ", saved.sizes(),
                    " ", saved.scalar_type());
  const auto acc = accumulation_dtype(grad_out.scalar_type());
  auto vector = [&](const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK_VALUE(t.defined() && t.dim() == 1 && t.size(0) == n && t.scalar_type() == acc,
                      "projection_backward: ", name, " must be a [", n, "] ", acc, " vector, got ",
                      t.defined() ? t.sizes() : at::IntArrayRef{});
  };
  vector(shift, C_in, "shift");
  vector(mean, C_out, "mean");
  vector(var, C_out, "var");
  if (bn_weight.defined()) vector(bn_weight, C_out, "bn_weight");
  if (training && y.defined() && y.numel()) {
    TORCH_CHECK_VALUE(y.sizes() == grad_out.sizes() && y.scalar_type() == acc,
                      "projection_backward: y must be the [N, C_out, H', W'] conv output the forward returned");
  }
  const std::pair<const char*, const at::Tensor*> tensors[] = {
      {"saved", &saved}, {"weight", &weight}, {"shift", &shift}, {"mean", &mean}, {"var", &var}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->device() == grad_out.device(), "projection_backward: ", name, " is on ", t->device(),
                " but grad_out is on ", grad_out.device());
  }
}

// Statistics are float32 (float64) whatever the caller's autocast: kernels that call
// ATen ops run them outside autocast.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;
inline NoAutocast no_autocast() { return NoAutocast(c10::autocast_dispatch_keyset); }

// The inputs as every kernel takes them: activations dense in one memory format
// (x's), parameters contiguous in the accumulation dtype, weight as a [C_out, C_in] matrix.
struct Prepared {
  at::Tensor x, weight, bn_weight, bn_bias, residual;
  at::MemoryFormat format;
  at::ScalarType acc;
};

inline Prepared prepare_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                                const at::Tensor& bn_bias, const at::Tensor& residual) {
  Prepared p;
  p.format = memory_format_of(x);
  p.acc = accumulation_dtype(x.scalar_type());
  p.x = x.contiguous(p.format);
  p.residual = residual.defined() ? residual.contiguous(p.format) : residual;
  auto param = [&](const at::Tensor& t) { return t.defined() ? t.to(p.acc).contiguous() : t; };
  p.weight = param(weight.reshape({weight.size(0), weight.size(1)}));
  p.bn_weight = param(bn_weight);
  p.bn_bias = param(bn_bias);
  return p;
}

// running <- (1 - momentum) running + momentum batch, for running statistics of any
// dtype and strides (the kernels update the common contiguous float32 case themselves).
inline void update_running_stat(const at::Tensor& running, const at::Tensor& batch, double momentum) {
  running.mul_(1 - momentum).add_(batch.to(running.scalar_type()), momentum);
}

}  // namespace hires
