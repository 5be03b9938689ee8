// Operator schemas of torch.ops.resnet_fast and their CPU implementations.
// CUDA implementations are registered by cuda/ops.cu when it is compiled in.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
#include "ops_impl.h"
#include "tiling.h"

// Written by setup.py (build dir, on the include path); a JIT build has none.
#if __has_include("resnet_fast_build_info.h")
#include "resnet_fast_build_info.h"
#else
#define RESNET_FAST_BUILD_INFO "cuda=none\nwhy=built without setup.py, which records how"
#endif

extern "C" {
// Importing resnet_fast._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace resnet_fast {

std::string build_info() { return RESNET_FAST_BUILD_INFO; }

// The tiling the CUDA BN kernels would use for an x of this shape, dtype and
// layout on a GPU with `sms` SMs, checked on the host by walking every block and
// thread through the kernels' index functions (tiling.h). Tests call it on CPU.
std::string bn_tiling(c10::IntArrayRef shape, at::ScalarType dtype, bool channels_last, bool aligned,
                      int64_t sms) {
  TORCH_CHECK(!channels_last || shape.size() == 4, "resnet_fast: channels_last needs a 4-D shape");
  const auto x = at::empty(shape, at::TensorOptions().device(at::kMeta).dtype(dtype).memory_format(
                                      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const auto v = channel_view(x, kernel_format(x));
  const int elem = static_cast<int>(x.element_size());
  const auto t = tiling::plan(v.outer, v.channels, v.inner, aligned ? 16 / elem : 1, elem, sms);
  const auto problem = tiling::check(t);
  return tiling::describe(t) + (problem.empty() ? "" : " ERROR: " + problem);
}

TORCH_LIBRARY(resnet_fast, m) {
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");
  m.def("add_relu_out(Tensor x, Tensor residual, Tensor(a!) out) -> ()");
  m.def("add_relu_(Tensor(a!) x, Tensor residual) -> ()");
  m.def("add_relu_backward(Tensor grad_out, Tensor out) -> Tensor");
  m.def("scale_bias_act(Tensor x, Tensor scale, Tensor bias, Tensor? residual, bool relu) -> Tensor");
  m.def(
      "scale_bias_act_out(Tensor x, Tensor scale, Tensor bias, Tensor? residual, bool relu, "
      "Tensor(a!) out) -> ()");
  m.def(
      "scale_bias_act_(Tensor(a!) x, Tensor scale, Tensor bias, Tensor? residual, bool relu) -> ()");
  m.def(
      "bn_act_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool relu) "
      "-> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "bn_act_bwd(Tensor grad_out, Tensor x, Tensor out, Tensor? weight, Tensor mean, Tensor var, "
      "float eps, bool relu, bool residual_grad) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  m.def(
      "bn_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float momentum, int count) -> ()");
  m.def("max_pool_3x3s2(Tensor x) -> Tensor");  // CPU only (cpu/pool.cpp); CUDA uses Triton's
  m.def("_build_info() -> str", &build_info);
  m.def("_bn_tiling(int[] shape, ScalarType dtype, bool channels_last, bool aligned, int sms) -> str", &bn_tiling);
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) { impl::register_impls<CpuKernels>(m); }

}  // namespace resnet_fast
