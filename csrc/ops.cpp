// Operator schemas of torch.ops.resnet_fast and their CPU implementations.
// CUDA implementations are registered by cuda/ops.cu when it is compiled in.
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
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
      "bn_relu_bits_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) "
      "-> (Tensor out, Tensor mean, Tensor var, Tensor relu_bits)");  // CPU only
  m.def(
      "bn_relu_bits_bwd(Tensor grad_out, Tensor x, Tensor relu_bits, Tensor? weight, Tensor mean, "
      "Tensor var, float eps, bool residual_grad) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");  // CPU only
  m.def(
      "bn2_relu_bits_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor shortcut, "
      "Tensor? shortcut_weight, Tensor? shortcut_bias, float shortcut_eps) -> (Tensor out, Tensor mean, "
      "Tensor var, Tensor shortcut_mean, Tensor shortcut_var, Tensor relu_bits)");  // CPU only
  m.def(
      "bn2_relu_bits_bwd(Tensor grad_out, Tensor relu_bits, Tensor x, Tensor? weight, Tensor mean, Tensor var, "
      "float eps, Tensor shortcut, Tensor? shortcut_weight, Tensor shortcut_mean, Tensor shortcut_var, "
      "float shortcut_eps) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_shortcut, "
      "Tensor grad_shortcut_weight, Tensor grad_shortcut_bias)");  // CPU only
  m.def(
      "bn_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float momentum, int count) -> ()");
  m.def("max_pool_3x3s2(Tensor x) -> Tensor");  // CPU only (cpu/pool.cpp); CUDA uses Triton's
  m.def("_build_info() -> str", &build_info);
  m.def("_bn_tiling(int[] shape, ScalarType dtype, bool channels_last, bool aligned, int sms) -> str", &bn_tiling);
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  impl::register_impls<CpuKernels>(m);
  impl::register_relu_bits_impls<CpuKernels>(m);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Under create_graph=True: the grads come back differentiable-looking, and a backward through them
// raises, as Python's @once_differentiable does (the kernels have no double backward).
variable_list once_differentiable(variable_list grads, const char* op) {
  variable_list inputs;
  for (const auto& g : grads) {
    if (g.defined()) inputs.push_back(g.detach().requires_grad_(true));
  }
  auto err = std::make_shared<torch::autograd::DelayedError>(
      std::string("resnet_fast: ") + op + " has no double backward (its backward is once_differentiable)",
      static_cast<int64_t>(inputs.size()));
  auto wrapped = err->apply(std::move(inputs));
  size_t i = 0;
  for (auto& g : grads) {
    if (g.defined()) g = wrapped[i++];
  }
  return grads;
}

// bn_relu_bits_fwd's autograd, in C++: eager CPU training's BN+ReLU node then runs no Python (the
// Python autograd.Function around bn_act_fwd showed 80 us forward and 230 us backward of node self time
// per call in a resnet50 profile; this node 24 us: README's CPU training section).
struct BnReluBitsFunction : public torch::autograd::Function<BnReluBitsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, double eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resnet_fast::bn_relu_bits_fwd", "")
                               .typed<decltype(impl::bn_relu_bits_fwd<CpuKernels>)>();
    auto [out, mean, var, bits] = op.call(x, weight, bias, residual, eps);
    ctx->save_for_backward({x, bits, present(weight) ? *weight : at::Tensor(), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["weight"] = present(weight);
    ctx->saved_data["bias"] = present(bias);
    ctx->saved_data["residual"] = present(residual);
    ctx->saved_data["bias_dtype"] = present(bias) ? bias->scalar_type() : at::kFloat;
    ctx->mark_non_differentiable({mean, var, bits});
    ctx->set_materialize_grads(false);  // else autograd fills a zero grad for mean, var and bits on every call
    return {out, mean, var, bits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(5);  // out took no part in what is differentiated
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &bits = saved[1], &weight = saved[2], &mean = saved[3], &var = saved[4];
    const bool has_w = ctx->saved_data["weight"].toBool(), has_b = ctx->saved_data["bias"].toBool();
    const bool has_r = ctx->saved_data["residual"].toBool();
    // Edges exist for the tensors forward got: x, then weight, bias, residual when present.
    size_t edge = 0;
    const bool need_x = ctx->needs_input_grad(edge++);
    const bool need_w = has_w && ctx->needs_input_grad(edge++);
    const bool need_b = has_b && ctx->needs_input_grad(edge++);
    const bool need_r = has_r && ctx->needs_input_grad(edge++);
    at::Tensor gx, gw, gb, gr;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("resnet_fast::bn_relu_bits_bwd", "")
                                 .typed<decltype(impl::bn_relu_bits_bwd<CpuKernels>)>();
      std::tie(gx, gw, gb, gr) = op.call(grads[0], x, bits,
                                         has_w ? std::optional<at::Tensor>(weight) : std::nullopt, mean,
                                         var, ctx->saved_data["eps"].toDouble(), need_r);
    }
    variable_list out = {need_x ? gx : at::Tensor(),
                         need_w ? gw.to(weight.scalar_type()) : at::Tensor(),
                         need_b ? gb.to(ctx->saved_data["bias_dtype"].toScalarType()) : at::Tensor(),
                         need_r ? gr : at::Tensor(), at::Tensor()};
    if (at::GradMode::is_enabled()) return once_differentiable(std::move(out), "bn_relu_bits_fwd");
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_bits_fwd_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps) {
  auto outs = BnReluBitsFunction::apply(x, weight, bias, residual, eps);
  return {outs[0], outs[1], outs[2], outs[3]};
}

// bn2_relu_bits_fwd's autograd, in C++ as BnReluBitsFunction's: both BNs' gradients from one node.
struct Bn2ReluBitsFunction : public torch::autograd::Function<Bn2ReluBitsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, const at::Tensor& shortcut,
                               const std::optional<at::Tensor>& shortcut_weight,
                               const std::optional<at::Tensor>& shortcut_bias, double shortcut_eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resnet_fast::bn2_relu_bits_fwd", "")
                               .typed<decltype(impl::bn2_relu_bits_fwd<CpuKernels>)>();
    auto [out, mean, var, s_mean, s_var, bits] =
        op.call(x, weight, bias, eps, shortcut, shortcut_weight, shortcut_bias, shortcut_eps);
    ctx->save_for_backward({x, present(weight) ? *weight : at::Tensor(), mean, var, shortcut,
                            present(shortcut_weight) ? *shortcut_weight : at::Tensor(), s_mean, s_var, bits});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["shortcut_eps"] = shortcut_eps;
    // Which optional inputs forward got, and the dtypes their gradients return in.
    for (const auto& [name, t] : {std::pair{"weight", &weight}, {"bias", &bias}, {"shortcut_weight", &shortcut_weight},
                                  {"shortcut_bias", &shortcut_bias}}) {
      ctx->saved_data[name] = present(*t);
      ctx->saved_data[std::string(name) + "_dtype"] = present(*t) ? (*t)->scalar_type() : at::kFloat;
    }
    ctx->mark_non_differentiable({mean, var, s_mean, s_var, bits});
    ctx->set_materialize_grads(false);
    return {out, mean, var, s_mean, s_var, bits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3];
    const at::Tensor &shortcut = saved[4], &s_weight = saved[5], &s_mean = saved[6], &s_var = saved[7];
    const at::Tensor& bits = saved[8];
    const auto has = [&](const char* name) { return ctx->saved_data[name].toBool(); };
    at::Tensor gx, gw, gb, gs, gsw, gsb;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("resnet_fast::bn2_relu_bits_bwd", "")
                                 .typed<decltype(impl::bn2_relu_bits_bwd<CpuKernels>)>();
      const auto opt = [](bool on, const at::Tensor& t) { return on ? std::optional<at::Tensor>(t) : std::nullopt; };
      std::tie(gx, gw, gb, gs, gsw, gsb) =
          op.call(grads[0], bits, x, opt(has("weight"), weight), mean, var, ctx->saved_data["eps"].toDouble(),
                  shortcut, opt(has("shortcut_weight"), s_weight), s_mean, s_var,
                  ctx->saved_data["shortcut_eps"].toDouble());
    }
    // Edges exist for the tensors forward got: x, weight, bias (when present), shortcut, then its two.
    size_t edge = 0;
    const auto grad = [&](bool given, const at::Tensor& g, const char* dtype_of) {
      if (!given || !ctx->needs_input_grad(edge++)) return at::Tensor();
      return dtype_of == nullptr ? g : g.to(ctx->saved_data[dtype_of].toScalarType());
    };
    // Evaluated in edge order (braced lists evaluate left to right).
    variable_list out{grad(true, gx, nullptr), grad(has("weight"), gw, "weight_dtype"),
                      grad(has("bias"), gb, "bias_dtype"), at::Tensor(), grad(true, gs, nullptr),
                      grad(has("shortcut_weight"), gsw, "shortcut_weight_dtype"),
                      grad(has("shortcut_bias"), gsb, "shortcut_bias_dtype"), at::Tensor()};
    if (at::GradMode::is_enabled()) return once_differentiable(std::move(out), "bn2_relu_bits_fwd");
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn2_relu_bits_fwd_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    const at::Tensor& shortcut, const std::optional<at::Tensor>& shortcut_weight,
    const std::optional<at::Tensor>& shortcut_bias, double shortcut_eps) {
  auto outs = Bn2ReluBitsFunction::apply(x, weight, bias, eps, shortcut, shortcut_weight, shortcut_bias, shortcut_eps);
  return {outs[0], outs[1], outs[2], outs[3], outs[4], outs[5]};
}

// The ADInplaceOrView kernel of the ops that write their (a!) arguments: run the op, then bump the
// version counter of every tensor it wrote, as aten's in-place ops do. Whatever is keyed on versions
// (the BN fold cache, autograd's saved-tensor check) then sees the write. In C++, one boxed kernel for
// all of them: a Python kernel here cost ~15 us a call on eager hot paths (the running-stats update).
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    const auto& value = (*stack)[first + i];
    if (alias != nullptr && alias->isWrite() && value.isTensor()) written.push_back(value.toTensor());
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const auto& t : written) torch::autograd::impl::bump_version(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, Autograd, m) {
  m.impl("bn_relu_bits_fwd", &bn_relu_bits_fwd_autograd);
  m.impl("bn2_relu_bits_fwd", &bn2_relu_bits_fwd_autograd);
}

TORCH_LIBRARY_IMPL(resnet_fast, ADInplaceOrView, m) {
  for (const char* name : {"add_relu_out", "add_relu_", "scale_bias_act_out", "scale_bias_act_", "bn_update_stats_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}

}  // namespace resnet_fast
