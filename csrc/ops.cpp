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
// hires::pool_source average-pools one source x once for every stride (> 1, distinct, each
// dividing the next) that its projections need, one result per stride in x's dtype and
// memory format (csrc/pool_source.h); each projection then runs at stride 1 on its pooled
// input. hires::pool_source_backward sums every stride's gradient into one grad_x.
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
  m.def("pool_source(Tensor x, int[] stride, bool ceil_mode) -> Tensor[]");
  m.def(
      "pool_source_backward(Tensor[] grad, int[] stride, bool ceil_mode, int in_h, int in_w, bool channels_last) "
      "-> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hires_kernels compiled kernels; importing it registers torch.ops.hires.*";
#ifdef HIRES_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
