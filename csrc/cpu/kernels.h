// CPU loops behind the ops in ops_impl.h. Tensors arrive already in the
// kernel memory format (see kernel_format), per-channel tensors contiguous and
// in the accumulation dtype; undefined optional tensors mean "absent".
#pragma once

#include <ATen/ATen.h>

namespace resnet_fast {

struct CpuKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static void add_relu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out);
  static void relu_grad(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& grad);
  static void scale_bias_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const at::Tensor& residual, bool relu, const at::Tensor& out);
  static void bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& residual, double eps, bool relu, const at::Tensor& out,
                         const at::Tensor& mean, const at::Tensor& var);
  static void bn_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                          const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                          double eps, bool relu, const at::Tensor& grad_x,
                          const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                          const at::Tensor& grad_residual);
  static void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const at::Tensor& mean, const at::Tensor& var, double momentum,
                                   int64_t count);
};

}  // namespace resnet_fast
