// Which instruction set the CPU kernels run with: AVX-512 where the CPU has F/BW/VL/DQ (cpuid, once
// per process), else the build's baseline (AVX2 on x86-64). RESNET_FAST_CPU_ISA=avx2|avx512 forces
// one (tests, comparisons); forcing AVX-512 on a CPU without it is an error, not a crash.
// Every kernel call is counted per ISA, so tests can prove which variant ran; _cpu_parallel_threads
// proves the kernels' at::parallel_for really runs on torch's threads (it needs OpenMP at compile time).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <mutex>
#include <set>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels.h"

namespace resnet_fast {
namespace {

using cpu::Isa;

#if defined(__x86_64__) && defined(__GNUC__)
constexpr bool kHasAvx512Build = true;
constexpr const char* kBaselineName = "avx2";
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#else
constexpr bool kHasAvx512Build = false;
constexpr const char* kBaselineName = "baseline";
bool cpu_has_avx512() { return false; }
#endif

const char* isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : kBaselineName; }

Isa choose_isa() {
  const bool avx512 = kHasAvx512Build && cpu_has_avx512();
  const char* forced = std::getenv("RESNET_FAST_CPU_ISA");
  if (forced == nullptr || *forced == '\0' || std::string(forced) == "auto") {
    return avx512 ? Isa::kAvx512 : Isa::kBaseline;
  }
  const std::string want = forced;
  if (want == kBaselineName) return Isa::kBaseline;
  TORCH_CHECK(want == "avx512", "resnet_fast: RESNET_FAST_CPU_ISA must be auto, ", kBaselineName,
              " or avx512, got '", want, "'");
  TORCH_CHECK(avx512, "resnet_fast: RESNET_FAST_CPU_ISA=avx512 but ",
              kHasAvx512Build ? "this CPU lacks AVX-512 F/BW/VL/DQ" : "this build has no AVX-512 kernels");
  return Isa::kAvx512;
}

std::array<std::atomic<int64_t>, 2> g_calls{};

Isa active() {
  static const Isa isa = choose_isa();
  g_calls[static_cast<int>(isa)].fetch_add(1, std::memory_order_relaxed);
  return isa;
}

// The kernel of `member` for the process's ISA.
#define RESNET_FAST_ON_ISA(member, ...)                  \
  (active() == Isa::kAvx512 && kHasAvx512Build           \
       ? IsaKernels<Isa::kAvx512>::member(__VA_ARGS__)   \
       : IsaKernels<Isa::kBaseline>::member(__VA_ARGS__))

std::string cpu_isa() {
  static const Isa isa = choose_isa();
  return isa_name(isa);
}

// Kernel calls so far per ISA, as {baseline, avx512}.
std::vector<int64_t> cpu_isa_calls() { return {g_calls[0].load(), g_calls[1].load()}; }

// How many threads at::parallel_for, compiled as the kernels are, runs `tasks` one-element tasks on.
int64_t cpu_parallel_threads(int64_t tasks) {
  std::mutex mutex;
  std::set<int> seen;
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace

void CpuKernels::add_relu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out) {
  RESNET_FAST_ON_ISA(add_relu, x, residual, out);
}

void CpuKernels::relu_grad(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& grad) {
  RESNET_FAST_ON_ISA(relu_grad, grad_out, out, grad);
}

void CpuKernels::scale_bias_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                const at::Tensor& residual, bool relu, const at::Tensor& out) {
  RESNET_FAST_ON_ISA(scale_bias_act, x, scale, shift, residual, relu, out, at::Tensor());
}

void CpuKernels::bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& residual, double eps, bool relu, const at::Tensor& out,
                            const at::Tensor& mean, const at::Tensor& var, const at::Tensor& relu_bits) {
  RESNET_FAST_ON_ISA(bn_forward, x, weight, bias, residual, eps, relu, out, mean, var, relu_bits);
}

void CpuKernels::bn_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                             const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                             double eps, bool relu, const at::Tensor& grad_x,
                             const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                             const at::Tensor& grad_residual, const at::Tensor& relu_bits) {
  RESNET_FAST_ON_ISA(bn_backward, grad_out, x, out, weight, mean, var, eps, relu, grad_x, grad_weight,
                     grad_bias, grad_residual, relu_bits);
}

void CpuKernels::bn2_forward(const BnArgs& main, const BnArgs& shortcut, const at::Tensor& out,
                             const at::Tensor& relu_bits) {
  RESNET_FAST_ON_ISA(bn2_forward, main, shortcut, out, relu_bits);
}

void CpuKernels::bn2_backward(const at::Tensor& grad_out, const at::Tensor& relu_bits, const BnArgs& main,
                              const BnArgs& shortcut, const BnGrads& main_grads, const BnGrads& shortcut_grads) {
  RESNET_FAST_ON_ISA(bn2_backward, grad_out, relu_bits, main, shortcut, main_grads, shortcut_grads);
}

TORCH_LIBRARY_FRAGMENT(resnet_fast, m) {
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_cpu_isa_calls() -> int[]", &cpu_isa_calls);
  m.def("_cpu_parallel_threads(int tasks) -> int", &cpu_parallel_threads);
}

}  // namespace resnet_fast
