// The schema of the compiled kernels, registered once; csrc/cpu and csrc/cuda each
// register one kernel for it (the dispatcher picks by the tensors' device).
// Contract of both ops: hires_kernels/backends/__init__.py and reference.py.
#include <torch/extension.h>

TORCH_LIBRARY(hires_C, m) {
  m.def(
      "projection_forward(Tensor x, Tensor shift, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor? residual, Tensor? mean_in, Tensor? var_in, int stride, bool ceil_mode, "
      "bool training, float eps) -> (Tensor out, Tensor pooled, Tensor y, Tensor mean, Tensor var)");
  m.def(
      "projection_backward(Tensor grad_out, Tensor saved, Tensor? y, Tensor? shift, Tensor weight, Tensor? bn_weight, "
      "Tensor mean, Tensor var, int stride, bool ceil_mode, int in_h, int in_w, bool training, "
      "float eps) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hires_kernels compiled kernels; the ops are torch.ops.hires_C.*";
#ifdef HIRES_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
