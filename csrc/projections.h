// hires::projections: every projection of one source in one call (csrc/ops.cpp). A
// HiResNet level feeds up to three later stages; one call reads it once for all of them
// and its backward writes one grad_x, the targets' contributions summed in the kernel.
//
// The composition is the same on every device, so it lives here once: a device file
// supplies its pooling kernels (pool_many: x read once, every target's average pool;
// unpool_sum: one write of grad_x from every target's grad of its pooled input) and its
// single-projection kernels, which then run at stride 1 on each pooled input:
//   forward   pooled_t = avgpool_{s_t}(x);  out_t = BN_t(W_t pooled_t)
//   backward  grad_pooled_t = the stride-1 backward of target t;
//             grad_x = sum_t unpool_{s_t}(grad_pooled_t)
// pooled_t is what backward needs of target t: the op returns it as `saved` (empty where
// s_t = 1: backward then takes x itself).
#pragma once

#include <algorithm>
#include <tuple>
#include <vector>

#include "projection_args.h"

namespace hires {

// (out, saved, y, shift, mean, var): one list entry per target; mean and var are the
// statistics of the shifted conv output, as hires::projection returns them.
using ProjectionsResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                     std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;
// (grad_x, grad_weight, grad_bn_weight, grad_bn_bias).
using ProjectionsBackwardResult =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// One device's kernels.
struct DeviceKernels {
  // x dense in its memory format -> one pooled tensor per stride, in x's dtype and
  // format (x itself for stride 1); reads x once.
  std::vector<at::Tensor> (*pool_many)(const at::Tensor& x, at::IntArrayRef strides, bool ceil_mode);
  // grad_x [N, C, H, W] in `format` = sum over t of grads[t] spread over its windows.
  at::Tensor (*unpool_sum)(at::TensorList grads, at::IntArrayRef strides, bool ceil_mode, int64_t H, int64_t W,
                           at::MemoryFormat format);
  ProjectionResult (*forward)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, bool, bool,
                              double, double);
  ProjectionBackwardResult (*backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                       const at::Tensor&, int64_t, bool, int64_t, int64_t, bool, double);
};

// The pooling shares sums between strides: each stride must divide the next larger one
// (HiResNet's are powers of two).
inline void check_nested_strides(at::IntArrayRef strides) {
  std::vector<int64_t> s(strides.begin(), strides.end());
  std::sort(s.begin(), s.end());
  for (size_t i = 1; i < s.size(); ++i) {
    TORCH_CHECK_VALUE(s[i] % s[i - 1] == 0, "fused_projections: every stride must divide the larger ones (",
                      strides, "); call fused_projection per target instead");
  }
}

inline void check_projections(const at::Tensor& x, at::TensorList weight, at::TensorList bn_weight,
                              at::TensorList bn_bias, at::TensorList running_mean, at::TensorList running_var,
                              at::IntArrayRef stride, bool ceil_mode, bool training, at::ArrayRef<double> eps) {
  const size_t k = weight.size();
  TORCH_CHECK_VALUE(k >= 1, "fused_projections: no targets (weight is an empty list)");
  TORCH_CHECK_VALUE(bn_weight.size() == k && bn_bias.size() == k && running_mean.size() == k &&
                        running_var.size() == k && stride.size() == k && eps.size() == k,
                    "fused_projections: weight, bn_weight, bn_bias, running_mean, running_var, stride and eps need "
                    "one entry per target; got ", k, ", ", bn_weight.size(), ", ", bn_bias.size(), ", ",
                    running_mean.size(), ", ", running_var.size(), ", ", stride.size(), " and ", eps.size());
  for (size_t t = 0; t < k; ++t) {
    check_forward(x, weight[t], bn_weight[t], bn_bias[t], running_mean[t], running_var[t], at::Tensor(), stride[t],
                  ceil_mode, training, eps[t]);
  }
  check_nested_strides(stride);
}

// The forward without the running statistics' update (hires::projections_update_stats
// does it): an op that mutates its inputs cannot return lists under torch.compile.
inline ProjectionsResult projections_forward(const DeviceKernels& dev, const at::Tensor& x, at::TensorList weight,
                                             at::TensorList bn_weight, at::TensorList bn_bias,
                                             at::TensorList running_mean, at::TensorList running_var,
                                             at::IntArrayRef stride, bool ceil_mode, bool training,
                                             at::ArrayRef<double> eps) {
  check_projections(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, ceil_mode, training, eps);
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto pooled = dev.pool_many(x.contiguous(memory_format_of(x)), stride, ceil_mode);
  ProjectionsResult r;
  auto& [out, saved, y, shift, mean, var] = r;
  for (size_t t = 0; t < weight.size(); ++t) {
    // At stride 1 the kernels keep their input, pooled_t, for backward: their own
    // `saved` is empty. Training passes no running statistics: nothing to update here.
    auto p = dev.forward(pooled[t], weight[t], bn_weight[t], bn_bias[t],
                         training ? std::nullopt : std::optional<at::Tensor>(running_mean[t]),
                         training ? std::nullopt : std::optional<at::Tensor>(running_var[t]), std::nullopt, 1, false,
                         training, 0.0, eps[t]);
    out.push_back(std::move(std::get<0>(p)));
    // Where s_t = 1, backward gets x from the autograd kernel: an output may not alias it.
    saved.push_back(stride[t] == 1 ? x.new_empty({0}) : pooled[t]);
    y.push_back(std::move(std::get<2>(p)));
    shift.push_back(std::move(std::get<3>(p)));
    mean.push_back(std::move(std::get<4>(p)));
    var.push_back(std::move(std::get<5>(p)));
  }
  return r;
}

inline void check_projections_backward(at::TensorList grad_out, at::TensorList saved, at::TensorList y,
                                       at::TensorList shift, at::TensorList weight, at::TensorList bn_weight,
                                       at::TensorList mean, at::TensorList var, at::IntArrayRef stride,
                                       at::ArrayRef<double> eps, int64_t in_h, int64_t in_w, bool ceil_mode) {
  const size_t k = grad_out.size();
  TORCH_CHECK_VALUE(k >= 1 && saved.size() == k && y.size() == k && shift.size() == k && weight.size() == k &&
                        bn_weight.size() == k && mean.size() == k && var.size() == k && stride.size() == k &&
                        eps.size() == k,
                    "projections_backward: every list needs one entry per target (", k, ")");
  for (size_t t = 0; t < k; ++t) {
    TORCH_CHECK_VALUE(saved[t].dim() == 4 && saved[t].size(2) == pooled_size(in_h, stride[t], ceil_mode) &&
                          saved[t].size(3) == pooled_size(in_w, stride[t], ceil_mode) &&
                          saved[t].size(0) == saved[0].size(0) && saved[t].size(1) == saved[0].size(1),
                      "projections_backward: saved[", t, "] ", saved[t].sizes(), " is not the input ", in_h, "x",
                      in_w, " pooled with stride ", stride[t]);
  }
  check_nested_strides(stride);
}

inline ProjectionsBackwardResult projections_backward(const DeviceKernels& dev, at::TensorList grad_out,
                                                      at::TensorList saved, at::TensorList y, at::TensorList shift,
                                                      at::TensorList weight, at::TensorList bn_weight,
                                                      at::TensorList mean, at::TensorList var, at::IntArrayRef stride,
                                                      bool ceil_mode, int64_t in_h, int64_t in_w, bool training,
                                                      at::ArrayRef<double> eps) {
  check_projections_backward(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, eps, in_h, in_w,
                             ceil_mode);
  at::AutoDispatchBelowADInplaceOrView guard;
  ProjectionsBackwardResult r;
  auto& [grad_x, grad_w, grad_gamma, grad_beta] = r;
  std::vector<at::Tensor> grad_pooled;
  for (size_t t = 0; t < grad_out.size(); ++t) {
    const at::Tensor& s = saved[t];
    auto [gp, gw, gg, gb] = dev.backward(grad_out[t], s, y[t], shift[t], weight[t], bn_weight[t], mean[t], var[t], 1,
                                         false, s.size(2), s.size(3), training, eps[t]);
    grad_pooled.push_back(std::move(gp));
    grad_w.push_back(std::move(gw));
    grad_gamma.push_back(std::move(gg));
    grad_beta.push_back(std::move(gb));
  }
  grad_x = dev.unpool_sum(grad_pooled, stride, ceil_mode, in_h, in_w, saved_memory_format(saved[0]));
  return r;
}

// The op kernels of a device with kernels K: registered as &projections_forward_op<K>.
template <const DeviceKernels& K>
ProjectionsResult projections_forward_op(const at::Tensor& x, at::TensorList weight, at::TensorList bn_weight,
                                         at::TensorList bn_bias, at::TensorList running_mean,
                                         at::TensorList running_var, at::IntArrayRef stride, bool ceil_mode,
                                         bool training, at::ArrayRef<double> eps) {
  return projections_forward(K, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, ceil_mode, training,
                             eps);
}

template <const DeviceKernels& K>
ProjectionsBackwardResult projections_backward_op(at::TensorList grad_out, at::TensorList saved, at::TensorList y,
                                                  at::TensorList shift, at::TensorList weight,
                                                  at::TensorList bn_weight, at::TensorList mean, at::TensorList var,
                                                  at::IntArrayRef stride, bool ceil_mode, int64_t in_h, int64_t in_w,
                                                  bool training, at::ArrayRef<double> eps) {
  return projections_backward(K, grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h,
                              in_w, training, eps);
}

// running_mean/var <- the momentum update with each target's batch statistics, through
// ATen ops (a device whose kernels do not do it themselves).
inline void projections_update_stats_aten(at::TensorList running_mean, at::TensorList running_var,
                                          at::TensorList weight, at::TensorList shift, at::TensorList mean,
                                          at::TensorList var, at::IntArrayRef count, at::ArrayRef<double> momentum) {
  at::AutoDispatchBelowADInplaceOrView guard;
  for (size_t t = 0; t < weight.size(); ++t) {
    const at::Tensor w = weight[t].reshape({weight[t].size(0), weight[t].size(1)}).to(mean[t].scalar_type());
    update_running_stat(running_mean[t], mean[t] + at::mv(w, shift[t]), momentum[t]);
    update_running_stat(running_var[t], var[t] * (static_cast<double>(count[t]) / static_cast<double>(count[t] - 1)),
                        momentum[t]);
  }
}

}  // namespace hires
