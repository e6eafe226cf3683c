// Autograd kernels of the fused projection (the pattern of torchvision's
// csrc/ops/autograd/roi_align_kernel.cpp): the forward saves what backward needs and
// calls the forward op below autograd; the backward calls the backward op, whose own
// autograd kernel refuses to be differentiated again.
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

#include "projection_args.h"
#include "pool_source.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardResult = hires::ProjectionResult;
using BackwardResult = hires::ProjectionBackwardResult;

ForwardResult call_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
                           const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
                           int64_t stride, bool ceil_mode, bool training, double momentum, double eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("hires::projection", "").typed<decltype(call_forward)>();
  return op.call(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, ceil_mode, training,
                 momentum, eps);
}

BackwardResult call_backward(const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& y,
                             const at::Tensor& shift, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
                             const at::Tensor& mean, const at::Tensor& var, int64_t stride, bool ceil_mode, int64_t in_h,
                             int64_t in_w, bool training, double eps) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("hires::projection_backward", "").typed<decltype(call_backward)>();
  return op.call(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training,
                 eps);
}

// The statistics were written below the ADInplaceOrView layer: count the write.
void bump_running_stats(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                        bool training) {
  if (training && running_mean.has_value()) {
    torch::autograd::impl::bump_version(*running_mean);
    torch::autograd::impl::bump_version(*running_var);
  }
}

[[noreturn]] void refuse_double_backward() {
  TORCH_CHECK(false, "fused_projection: its backward cannot be differentiated (double backward, e.g. "
                     "create_graph=True or nested torch.func.grad, is not supported)");
}

// Autograd sees one output, `out`: the tensors backward needs reach the caller through
// `rest` rather than as non-differentiable outputs, each of which would cost the graph
// its own bookkeeping on every call.
class ProjectionFunction : public torch::autograd::Function<ProjectionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
                               int64_t stride, bool ceil_mode, bool training, double momentum, double eps,
                               ForwardResult* rest) {
    at::AutoDispatchBelowADInplaceOrView guard;
    *rest = call_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, ceil_mode,
                         training, momentum, eps);
    const auto& [out, saved, y, shift, mean, var] = *rest;
    bump_running_stats(running_mean, running_var, training);
    // Stride 1 keeps x itself (no copy) and backward subtracts the shift again.
    ctx->save_for_backward({stride == 1 ? x : saved, y, shift, weight, hires::value_or_undefined(bn_weight), mean, var});
    ctx->saved_data["meta"] = c10::List<int64_t>({stride, ceil_mode, x.size(2), x.size(3), training});
    ctx->saved_data["eps"] = eps;
    // A gradient may be returned only where a tensor was given.
    ctx->saved_data["given"] = c10::List<bool>({bn_weight.has_value(), bn_bias.has_value(), residual.has_value()});
    ctx->set_materialize_grads(false);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(13);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return none;
    const auto s = ctx->get_saved_variables();
    const auto meta = ctx->saved_data["meta"].toIntList();
    const bool training = meta[4];
    auto [grad_x, grad_w, grad_gamma, grad_beta] =
        call_backward(grad_out, s[0], s[1], s[2], s[3], s[4].defined() ? std::optional<at::Tensor>(s[4]) : std::nullopt,
                      s[5], s[6], meta[0], meta[1], meta[2], meta[3], training, ctx->saved_data["eps"].toDouble());
    // One gradient per tensor argument; autograd drops those of inputs that need none
    // (the kernels compute every gradient in the same passes anyway).
    const auto given = ctx->saved_data["given"].toBoolList();
    variable_list g = none;
    g[0] = grad_x;
    g[1] = grad_w;
    if (given[0]) g[2] = grad_gamma;
    if (given[1]) g[3] = grad_beta;
    if (given[2]) g[6] = grad_out;
    return g;
  }
};

class ProjectionBackwardFunction : public torch::autograd::Function<ProjectionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& y,
                               const at::Tensor& shift, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bn_weight, const at::Tensor& mean,
                               const at::Tensor& var, int64_t stride, bool ceil_mode, int64_t in_h, int64_t in_w,
                               bool training, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_w, grad_gamma, grad_beta] = call_backward(grad_out, saved, y, shift, weight, bn_weight, mean,
                                                                 var, stride, ceil_mode, in_h, in_w, training, eps);
    return {grad_x, grad_w, grad_gamma, grad_beta};
  }

  static variable_list backward(AutogradContext*, variable_list) { refuse_double_backward(); }
};

ForwardResult projection_autograd(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var,
                                  const std::optional<at::Tensor>& residual, int64_t stride, bool ceil_mode,
                                  bool training, double momentum, double eps) {
  // Checked here too, before the backend is picked: tensors on mixed devices would
  // otherwise reach whichever device's kernel the dispatcher prefers.
  hires::check_forward(x, weight, hires::value_or_undefined(bn_weight), hires::value_or_undefined(bn_bias),
                       hires::value_or_undefined(running_mean), hires::value_or_undefined(running_var),
                       hires::value_or_undefined(residual), stride, ceil_mode, training, eps);
  auto requires_grad = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || weight.requires_grad() || requires_grad(bn_weight) ||
                                       requires_grad(bn_bias) || requires_grad(residual))) {
    // Nothing to record: skip the Function, and with it its refusal of torch.func
    // transforms (projection.py's _CompiledUnderTransforms calls this op without grad).
    at::AutoDispatchBelowADInplaceOrView guard;
    auto r = call_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, ceil_mode,
                          training, momentum, eps);
    bump_running_stats(running_mean, running_var, training);
    return r;
  }
  ForwardResult r;
  std::get<0>(r) = ProjectionFunction::apply(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                             stride, ceil_mode, training, momentum, eps, &r)[0];
  return r;
}

BackwardResult projection_backward_autograd(const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& y,
                                            const at::Tensor& shift, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bn_weight, const at::Tensor& mean,
                                            const at::Tensor& var, int64_t stride, bool ceil_mode, int64_t in_h,
                                            int64_t in_w, bool training, double eps) {
  if (!at::GradMode::is_enabled()) {  // the usual backward: no graph of the backward to record
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_backward(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w,
                         training, eps);
  }
  auto r = ProjectionBackwardFunction::apply(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride,
                                             ceil_mode, in_h, in_w, training, eps);
  return {r[0], r[1], r[2], r[3]};
}

// --- one source pooled for every stride (csrc/pool_source.h) ------------------------

std::vector<at::Tensor> call_pool_source(const at::Tensor& x, at::IntArrayRef stride, bool ceil_mode) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("hires::pool_source", "").typed<decltype(call_pool_source)>();
  return op.call(x, stride, ceil_mode);
}

at::Tensor call_pool_source_backward(at::TensorList grad, at::IntArrayRef stride, bool ceil_mode, int64_t in_h,
                                     int64_t in_w, bool channels_last) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hires::pool_source_backward", "")
                       .typed<decltype(call_pool_source_backward)>();
  return op.call(grad, stride, ceil_mode, in_h, in_w, channels_last);
}

// The two ops are linear and each other's adjoint, so each one's backward calls the other
// (through the dispatcher, so that create_graph=True records it): double backward works.
// Outputs that took no part in the loss get zero gradients (materialised by autograd).
class PoolSourceFunction : public torch::autograd::Function<PoolSourceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef stride, bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["meta"] = c10::List<int64_t>(
        {ceil_mode, x.size(2), x.size(3), hires::memory_format_of(x) == at::MemoryFormat::ChannelsLast});
    return call_pool_source(x, stride, ceil_mode);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto meta = ctx->saved_data["meta"].toIntList();
    return {call_pool_source_backward(grads, ctx->saved_data["stride"].toIntVector(), meta[0], meta[1], meta[2],
                                      meta[3]),
            at::Tensor(), at::Tensor()};
  }
};

class PoolSourceBackwardFunction : public torch::autograd::Function<PoolSourceBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList grad, at::IntArrayRef stride, bool ceil_mode,
                               int64_t in_h, int64_t in_w, bool channels_last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    return {call_pool_source_backward(grad, stride, ceil_mode, in_h, in_w, channels_last)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list g = call_pool_source(grads[0], ctx->saved_data["stride"].toIntVector(),
                                       ctx->saved_data["ceil_mode"].toBool());
    g.resize(g.size() + 5);  // the non-tensor arguments
    return g;
  }
};

std::vector<at::Tensor> pool_source_autograd(const at::Tensor& x, at::IntArrayRef stride, bool ceil_mode) {
  hires::check_pool_source(x, stride, ceil_mode);
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_pool_source(x, stride, ceil_mode);
  }
  return PoolSourceFunction::apply(x, stride, ceil_mode);
}

at::Tensor pool_source_backward_autograd(at::TensorList grad, at::IntArrayRef stride, bool ceil_mode, int64_t in_h,
                                         int64_t in_w, bool channels_last) {
  hires::check_pool_source_backward(grad, stride, ceil_mode, in_h, in_w);
  const bool requires_grad = std::any_of(grad.begin(), grad.end(), [](const at::Tensor& t) { return t.requires_grad(); });
  if (!at::GradMode::is_enabled() || !requires_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_pool_source_backward(grad, stride, ceil_mode, in_h, in_w, channels_last);
  }
  return PoolSourceBackwardFunction::apply(grad, stride, ceil_mode, in_h, in_w, channels_last)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(hires, Autograd, m) {
  m.impl("projection", &projection_autograd);
  m.impl("projection_backward", &projection_backward_autograd);
  m.impl("pool_source", &pool_source_autograd);
  m.impl("pool_source_backward", &pool_source_backward_autograd);
}
