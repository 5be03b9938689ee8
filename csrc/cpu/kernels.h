// CPU loops behind the ops in ops_impl.h. Tensors arrive already in the
// kernel memory format (see kernel_format), per-channel tensors contiguous and
// in the accumulation dtype; undefined optional tensors mean "absent".
#pragma once

#include <ATen/ATen.h>

#include "../ops_impl.h"

namespace resnet_fast {

namespace cpu {
// The instruction sets the kernels are compiled for: the build's flags (AVX2 on x86-64), and AVX-512
// (F/BW/VL/DQ, x86-64 only: cpu/avx512.cpp). isa.cpp picks one per process (cpuid, RESNET_FAST_CPU_ISA).
enum class Isa { kBaseline, kAvx512 };
}  // namespace cpu

#ifndef RESNET_FAST_CPU_ISA
#define RESNET_FAST_CPU_ISA ::resnet_fast::cpu::Isa::kBaseline
#endif

// The kernels of one ISA; the members of IsaKernels<I> are defined in the translation units built for I.
template <cpu::Isa I>
struct IsaKernels {
  static void add_relu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out);
  static void relu_grad(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& grad);
  static void scale_bias_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const at::Tensor& residual, bool relu, const at::Tensor& out,
                             const at::Tensor& relu_bits);
  static void bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& residual, double eps, bool relu, const at::Tensor& out,
                         const at::Tensor& mean, const at::Tensor& var, const at::Tensor& relu_bits);
  static void bn_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                          const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                          double eps, bool relu, const at::Tensor& grad_x,
                          const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                          const at::Tensor& grad_residual, const at::Tensor& relu_bits);
  static void bn2_forward(const BnArgs& main, const BnArgs& shortcut, const at::Tensor& out,
                          const at::Tensor& relu_bits);
  static void bn2_backward(const at::Tensor& grad_out, const at::Tensor& relu_bits, const BnArgs& main,
                           const BnArgs& shortcut, const BnGrads& main_grads, const BnGrads& shortcut_grads);
};

// Each ISA's members are explicit specializations, declared here for every file that calls them.
#define RESNET_FAST_DECLARE_ISA_KERNELS(I)                                                               \
  template <> void IsaKernels<I>::add_relu(const at::Tensor&, const at::Tensor&, const at::Tensor&);     \
  template <> void IsaKernels<I>::relu_grad(const at::Tensor&, const at::Tensor&, const at::Tensor&);    \
  template <> void IsaKernels<I>::scale_bias_act(const at::Tensor&, const at::Tensor&, const at::Tensor&, \
                                                 const at::Tensor&, bool, const at::Tensor&,             \
                                                 const at::Tensor&);                                     \
  template <> void IsaKernels<I>::bn_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,     \
                                             const at::Tensor&, double, bool, const at::Tensor&,         \
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&);   \
  template <> void IsaKernels<I>::bn_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,    \
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,   \
                                              double, bool, const at::Tensor&, const at::Tensor&,        \
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&);    \
  template <> void IsaKernels<I>::bn2_forward(const BnArgs&, const BnArgs&, const at::Tensor&,            \
                                              const at::Tensor&);                                        \
  template <> void IsaKernels<I>::bn2_backward(const at::Tensor&, const at::Tensor&, const BnArgs&,      \
                                               const BnArgs&, const BnGrads&, const BnGrads&);
RESNET_FAST_DECLARE_ISA_KERNELS(cpu::Isa::kBaseline)
RESNET_FAST_DECLARE_ISA_KERNELS(cpu::Isa::kAvx512)
#undef RESNET_FAST_DECLARE_ISA_KERNELS

// What the ops call (ops_impl.h): each member forwards to IsaKernels of the process's ISA (isa.cpp).
struct CpuKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static void add_relu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out);
  static void relu_grad(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& grad);
  static void scale_bias_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const at::Tensor& residual, bool relu, const at::Tensor& out);
  // relu_bits (bn_relu_bits_fwd/bwd): the ReLU mask as bits, written by the forward, read by the
  // backward instead of out; undefined for bn_act_fwd/bwd (the CUDA kernels' signature).
  static void bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& residual, double eps, bool relu, const at::Tensor& out,
                         const at::Tensor& mean, const at::Tensor& var,
                         const at::Tensor& relu_bits = at::Tensor());
  static void bn_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                          const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                          double eps, bool relu, const at::Tensor& grad_x,
                          const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                          const at::Tensor& grad_residual, const at::Tensor& relu_bits = at::Tensor());
  // relu(bn(main.x) + bn(shortcut.x)), a projection block's end: the two BNs and the ReLU in one
  // normalize pass, the mask saved as bits (CPU only: bn2_relu_bits_fwd/bwd).
  static void bn2_forward(const BnArgs& main, const BnArgs& shortcut, const at::Tensor& out,
                          const at::Tensor& relu_bits);
  static void bn2_backward(const at::Tensor& grad_out, const at::Tensor& relu_bits, const BnArgs& main,
                           const BnArgs& shortcut, const BnGrads& main_grads, const BnGrads& shortcut_grads);
  static void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const at::Tensor& mean, const at::Tensor& var, double momentum,
                                   int64_t count);
};

}  // namespace resnet_fast
