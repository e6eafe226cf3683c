// The fused projection as two ops, defined once here, after the pattern of torchvision's
// roi_align: csrc/cpu and csrc/cuda each register a kernel per op for their dispatch
// key, and csrc/autograd.cpp registers the Autograd kernel that saves what backward
// needs and calls the backward op.
//
// hires::projection does every per-call step of a forward: checks, the data shift, the
// statistics and their combine, the BN constants and, in training, the in-place update of
// running_mean / running_var (declared mutated). It returns the output and what backward
// needs (marked non-differentiable):
//   out    [N, C_out, H', W'] in x's dtype and memory format;
//   saved  the shifted pooled input [N, C_in, H', W'] (empty at stride 1: backward uses x);
//   y      the float32 conv output of the shifted input, where the device keeps it for
//          backward (CPU, training), else empty;
//   shift  [C_in], the per-channel constant subtracted from x before pooling;
//   mean, var  [C_out]: the statistics of the shifted conv output that normalised it
//          (training: the biased batch statistics; eval: running_mean - W shift, running_var).
// hires::projection_backward turns grad_out into (grad_x, grad_weight in weight's shape,
// grad_bn_weight, grad_bn_bias), with the eval-mode shift correction of grad_weight.
// The math: hires_kernels/backends/reference.py.
//
// hires::projections runs every projection of one source x (csrc/projections.h): list
// arguments hold one entry per target, x is read once, and each out_t = BN_t(W_t
// avgpool_{s_t}(x)) has no residual (the targets' blocks add it when they run). It is a
// composite of two ops (csrc/autograd.cpp), because an op that mutates its inputs cannot
// return lists under torch.compile: hires::projections_forward (pure; it returns, per
// target, out and what backward needs, as hires::projection does, with saved the pooled
// input, empty where s_t = 1) and, in training, hires::projections_update_stats, the
// running statistics' momentum update (count: the values per channel).
// hires::projections_backward takes every target's grad_out and returns one grad_x.
#include <torch/extension.h>

TORCH_LIBRARY(hires, m) {
  m.def(
      "projection(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor? residual, int stride, bool ceil_mode, bool training, float momentum, "
      "float eps) -> (Tensor out, Tensor saved, Tensor y, Tensor shift, Tensor mean, Tensor var)");
  m.def(
      "projection_backward(Tensor grad_out, Tensor saved, Tensor y, Tensor shift, Tensor weight, Tensor? bn_weight, "
      "Tensor mean, Tensor var, int stride, bool ceil_mode, int in_h, int in_w, bool training, float eps) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  m.def(
      "projections(Tensor x, Tensor[] weight, Tensor[] bn_weight, Tensor[] bn_bias, Tensor(a!)[] running_mean, "
      "Tensor(b!)[] running_var, int[] stride, bool ceil_mode, bool training, float[] momentum, float[] eps) "
      "-> Tensor[]");
  m.def(
      "projections_forward(Tensor x, Tensor[] weight, Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] running_mean, "
      "Tensor[] running_var, int[] stride, bool ceil_mode, bool training, float[] eps) "
      "-> (Tensor[] out, Tensor[] saved, Tensor[] y, Tensor[] shift, Tensor[] mean, Tensor[] var)");
  m.def(
      "projections_update_stats(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, Tensor[] weight, "
      "Tensor[] shift, Tensor[] mean, Tensor[] var, int[] count, float[] momentum) -> ()");
  m.def(
      "projections_backward(Tensor[] grad_out, Tensor[] saved, Tensor[] y, Tensor[] shift, Tensor[] weight, "
      "Tensor[] bn_weight, Tensor[] mean, Tensor[] var, int[] stride, bool ceil_mode, int in_h, int in_w, "
      "bool training, float[] eps) -> (Tensor grad_x, Tensor[] grad_weight, Tensor[] grad_bn_weight, "
      "Tensor[] grad_bn_bias)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hires_kernels compiled kernels; importing it registers torch.ops.hires.*";
#ifdef HIRES_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
