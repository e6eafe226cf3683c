// Autograd kernels of the fused projection (the pattern of torchvision's
// csrc/ops/autograd/roi_align_kernel.cpp): the forward saves what backward needs and
// calls the forward op below autograd; the backward calls the backward op, whose own
// autograd kernel refuses to be differentiated again.
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

#include "projection_args.h"
#include "projections.h"

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

// --- every projection of one source (csrc/projections.h) ----------------------------

using hires::ProjectionsBackwardResult;
using hires::ProjectionsResult;

ProjectionsResult call_projections_forward(const at::Tensor& x, at::TensorList weight, at::TensorList bn_weight,
                                           at::TensorList bn_bias, at::TensorList running_mean,
                                           at::TensorList running_var, at::IntArrayRef stride, bool ceil_mode,
                                           bool training, at::ArrayRef<double> eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hires::projections_forward", "")
                       .typed<decltype(call_projections_forward)>();
  return op.call(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, ceil_mode, training, eps);
}

void call_update_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList weight,
                       at::TensorList shift, at::TensorList mean, at::TensorList var, at::IntArrayRef count,
                       at::ArrayRef<double> momentum) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hires::projections_update_stats", "")
                       .typed<decltype(call_update_stats)>();
  op.call(running_mean, running_var, weight, shift, mean, var, count, momentum);
}

ProjectionsBackwardResult call_projections_backward(at::TensorList grad_out, at::TensorList saved, at::TensorList y,
                                                    at::TensorList shift, at::TensorList weight,
                                                    at::TensorList bn_weight, at::TensorList mean, at::TensorList var,
                                                    at::IntArrayRef stride, bool ceil_mode, int64_t in_h, int64_t in_w,
                                                    bool training, at::ArrayRef<double> eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hires::projections_backward", "")
                       .typed<decltype(call_projections_backward)>();
  return op.call(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training,
                 eps);
}

// hires::projections: the forward op, then (training) the running statistics' update.
std::vector<at::Tensor> projections_composite(const at::Tensor& x, at::TensorList weight, at::TensorList bn_weight,
                                              at::TensorList bn_bias, at::TensorList running_mean,
                                              at::TensorList running_var, at::IntArrayRef stride, bool ceil_mode,
                                              bool training, at::ArrayRef<double> momentum,
                                              at::ArrayRef<double> eps) {
  TORCH_CHECK_VALUE(momentum.size() == weight.size(), "fused_projections: momentum needs one entry per target (",
                    weight.size(), "), got ", momentum.size());
  auto [out, saved, y, shift, mean, var] =
      call_projections_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, ceil_mode, training,
                               eps);
  if (training) {
    std::vector<int64_t> count;
    for (const auto& o : out) count.push_back(o.numel() / o.size(1));
    call_update_stats(running_mean, running_var, weight, shift, mean, var, count, momentum);
  }
  return out;
}

void projections_update_stats_autograd(at::TensorList running_mean, at::TensorList running_var,
                                       at::TensorList weight, at::TensorList shift, at::TensorList mean,
                                       at::TensorList var, at::IntArrayRef count, at::ArrayRef<double> momentum) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    call_update_stats(running_mean, running_var, weight, shift, mean, var, count, momentum);
  }
  // Written below the ADInplaceOrView layer: count the writes.
  for (size_t t = 0; t < running_mean.size(); ++t) {
    torch::autograd::impl::bump_version(running_mean[t]);
    torch::autograd::impl::bump_version(running_var[t]);
  }
}

// Gradients, in the order autograd::Function counts its arguments: x, then each list's
// entries, then one (undefined) per non-tensor argument.
variable_list projections_input_grads(const ProjectionsBackwardResult& r, size_t k) {
  const auto& [grad_x, grad_w, grad_gamma, grad_beta] = r;
  variable_list g(1 + 5 * k + 5);
  g[0] = grad_x;
  for (size_t t = 0; t < k; ++t) {
    g[1 + t] = grad_w[t];
    g[1 + k + t] = grad_gamma[t];
    g[1 + 2 * k + t] = grad_beta[t];
  }
  return g;
}

class ProjectionsFunction : public torch::autograd::Function<ProjectionsFunction> {
 public:
  // Saved: x, then k each of saved, y, shift, weight, bn_weight, mean, var.
  static constexpr size_t kSavedLists = 7;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weight,
                               at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList running_mean,
                               at::TensorList running_var, at::IntArrayRef stride, bool ceil_mode, bool training,
                               at::ArrayRef<double> eps, ProjectionsResult* rest) {
    at::AutoDispatchBelowADInplaceOrView guard;
    *rest = call_projections_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, ceil_mode,
                                     training, eps);
    const auto& [out, saved, y, shift, mean, var] = *rest;
    const size_t k = weight.size();
    variable_list keep;
    keep.reserve(1 + kSavedLists * k);
    keep.push_back(x);
    for (const auto* list : {&saved, &y, &shift}) keep.insert(keep.end(), list->begin(), list->end());
    keep.insert(keep.end(), weight.begin(), weight.end());
    keep.insert(keep.end(), bn_weight.begin(), bn_weight.end());
    keep.insert(keep.end(), mean.begin(), mean.end());
    keep.insert(keep.end(), var.begin(), var.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["eps"] = eps.vec();
    ctx->saved_data["meta"] = c10::List<int64_t>({ceil_mode, x.size(2), x.size(3), training});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto eps = ctx->saved_data["eps"].toDoubleVector();
    const auto meta = ctx->saved_data["meta"].toIntList();
    const size_t k = stride.size();
    auto list = [&](size_t i) {
      return std::vector<at::Tensor>(s.begin() + 1 + i * k, s.begin() + 1 + (i + 1) * k);
    };
    std::vector<at::Tensor> saved = list(0);
    for (size_t t = 0; t < k; ++t) {
      if (stride[t] == 1) saved[t] = s[0];
    }
    return projections_input_grads(call_projections_backward(grads, saved, list(1), list(2), list(3), list(4), list(5),
                                                             list(6), stride, meta[0], meta[1], meta[2], meta[3], eps),
                                   k);
  }
};

class ProjectionsBackwardFunction : public torch::autograd::Function<ProjectionsBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, at::TensorList grad_out, at::TensorList saved, at::TensorList y,
                               at::TensorList shift, at::TensorList weight, at::TensorList bn_weight,
                               at::TensorList mean, at::TensorList var, at::IntArrayRef stride, bool ceil_mode,
                               int64_t in_h, int64_t in_w, bool training, at::ArrayRef<double> eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_w, grad_gamma, grad_beta] = call_projections_backward(
        grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps);
    variable_list r{grad_x};
    for (const auto* l : {&grad_w, &grad_gamma, &grad_beta}) r.insert(r.end(), l->begin(), l->end());
    return r;
  }

  static variable_list backward(AutogradContext*, variable_list) { refuse_double_backward(); }
};

ProjectionsResult projections_forward_autograd(const at::Tensor& x, at::TensorList weight, at::TensorList bn_weight,
                                               at::TensorList bn_bias, at::TensorList running_mean,
                                               at::TensorList running_var, at::IntArrayRef stride, bool ceil_mode,
                                               bool training, at::ArrayRef<double> eps) {
  hires::check_projections(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, ceil_mode, training, eps);
  auto any_requires_grad = [](at::TensorList l) {
    return std::any_of(l.begin(), l.end(), [](const at::Tensor& t) { return t.requires_grad(); });
  };
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || any_requires_grad(weight) ||
                                       any_requires_grad(bn_weight) || any_requires_grad(bn_bias))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_projections_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, ceil_mode,
                                    training, eps);
  }
  ProjectionsResult r;
  std::get<0>(r) = ProjectionsFunction::apply(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                                              ceil_mode, training, eps, &r);
  return r;
}

ProjectionsBackwardResult projections_backward_autograd(at::TensorList grad_out, at::TensorList saved,
                                                        at::TensorList y, at::TensorList shift, at::TensorList weight,
                                                        at::TensorList bn_weight, at::TensorList mean,
                                                        at::TensorList var, at::IntArrayRef stride, bool ceil_mode,
                                                        int64_t in_h, int64_t in_w, bool training,
                                                        at::ArrayRef<double> eps) {
  if (!at::GradMode::is_enabled()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_projections_backward(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h,
                                     in_w, training, eps);
  }
  const size_t k = grad_out.size();
  auto r = ProjectionsBackwardFunction::apply(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride,
                                              ceil_mode, in_h, in_w, training, eps);
  auto slice = [&](size_t i) { return std::vector<at::Tensor>(r.begin() + 1 + i * k, r.begin() + 1 + (i + 1) * k); };
  return {r[0], slice(0), slice(1), slice(2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hires, Autograd, m) {
  m.impl("projection", &projection_autograd);
  m.impl("projection_backward", &projection_backward_autograd);
  m.impl("projections_forward", &projections_forward_autograd);
  m.impl("projections_update_stats", &projections_update_stats_autograd);
  m.impl("projections_backward", &projections_backward_autograd);
}

TORCH_LIBRARY_IMPL(hires, CompositeImplicitAutograd, m) {
  m.impl("projections", &projections_composite);
}
