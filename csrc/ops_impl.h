// Device-independent bodies of the resnet_fast ops: argument checks, memory
// format, output allocation. Each body is a template over a Kernels struct
// (CpuKernels in cpu/kernels.h, CudaKernels in cuda/ops.cu) that owns the loops,
// so CPU and CUDA share exactly the same semantics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace resnet_fast {

// Kernels see x either as [outer, C, inner] with inner contiguous (NCHW and any
// contiguous N,C,... tensor) or, channels_last, as [outer = N*H*W rows, C].
struct ChannelView {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  bool channels_last;
};

// The kernels run channels_last only when x really is NHWC-dense; everything
// else runs on an NCHW-contiguous copy. Python's fake kernels use the same rule.
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() &&
      x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline ChannelView channel_view(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t C = x.size(1);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    return {C == 0 ? 0 : x.numel() / C, C, 1, true};
  }
  int64_t inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) inner *= x.size(d);
  return {x.size(0), C, inner, false};
}

// One training BN of the two that bn2_relu_bits_fwd/bwd sum: its input, affine parameters (undefined:
// absent) and eps, and its batch mean and biased variance (outputs of the forward, inputs of the backward).
struct BnArgs {
  at::Tensor x, weight, bias, mean, var;
  double eps;
};
// A BN's gradients, written by the backward: its input's, weight's and bias's.
struct BnGrads {
  at::Tensor x, weight, bias;
};

// fp64 inputs accumulate in fp64, everything else in fp32.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "resnet_fast: ", name, " must be a tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "resnet_fast: ", name, " must be float32, float16, bfloat16 or float64, got ", st);
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_float(t, name);
  TORCH_CHECK(t.sizes() == x.sizes(), "resnet_fast: ", name, " must have x's shape ", x.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "resnet_fast: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "resnet_fast: ", name, " must be on x's device ",
              x.device(), ", got ", t.device());
}

inline void check_channels_input(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 2, "resnet_fast: x must be (N, C, ...) with at least 2 dims, got shape ",
              x.sizes());
}

inline void check_per_channel(const at::Tensor& p, const at::Tensor& x, const char* name) {
  check_float(p, name);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), "resnet_fast: ", name,
              " must be 1-D with one value per channel (", x.size(1), "), got shape ", p.sizes());
  TORCH_CHECK(p.device() == x.device(), "resnet_fast: ", name, " must be on x's device ",
              x.device(), ", got ", p.device());
}

// Per-channel parameter in the accumulation dtype, contiguous; undefined stays undefined.
inline at::Tensor as_acc(const std::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->to(acc).contiguous();
}

namespace cpu {
// A CPU tensor whose storage, from 1 MiB up, comes from the pool of freed outputs (cpu/output_pool.cpp).
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat fmt);
}  // namespace cpu

inline at::Tensor empty_in(const at::Tensor& like, at::MemoryFormat fmt) {
  if (like.is_cpu()) return cpu::empty_output(like.sizes(), like.scalar_type(), fmt);
  return at::empty(like.sizes(), like.options().memory_format(fmt));
}

// Runs `compute(out_in_kernel_format)` and makes its result land in `dst`:
// directly when dst is dense in a format the kernels use, else via a copy.
template <class F>
void write_into(const at::Tensor& dst, F compute) {
  const auto fmt = kernel_format(dst);
  if (dst.is_contiguous(fmt)) {
    compute(dst, fmt);
  } else {
    auto tmp = empty_in(dst, at::MemoryFormat::Contiguous);
    compute(tmp, at::MemoryFormat::Contiguous);
    dst.copy_(tmp);
  }
}

namespace impl {

// ---- add_relu --------------------------------------------------------------

template <class K>
at::Tensor add_relu(const at::Tensor& x, const at::Tensor& residual) {
  check_float(x, "x");
  check_like(residual, x, "residual");
  typename K::Guard guard(x.device());
  const auto fmt = kernel_format(x);
  auto out = empty_in(x, fmt);
  if (out.numel() > 0) K::add_relu(x.contiguous(fmt), residual.contiguous(fmt), out);
  return out;
}

template <class K>
void add_relu_out(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out) {
  check_float(x, "x");
  check_like(residual, x, "residual");
  check_like(out, x, "out");
  at::assert_no_partial_overlap(out, x);
  at::assert_no_partial_overlap(out, residual);
  typename K::Guard guard(x.device());
  if (out.numel() == 0) return;
  write_into(out, [&](const at::Tensor& dst, at::MemoryFormat fmt) {
    K::add_relu(x.contiguous(fmt), residual.contiguous(fmt), dst);
  });
}

template <class K>
void add_relu_(const at::Tensor& x, const at::Tensor& residual) {
  add_relu_out<K>(x, residual, x);
}

// Gradient of relu(x + residual) w.r.t. both inputs: grad where out > 0.
template <class K>
at::Tensor add_relu_backward(const at::Tensor& grad_out, const at::Tensor& out) {
  check_float(out, "out");
  check_like(grad_out, out, "grad_out");
  typename K::Guard guard(out.device());
  const auto fmt = kernel_format(out);
  auto grad = empty_in(out, fmt);
  if (grad.numel() > 0) K::relu_grad(grad_out.contiguous(fmt), out.contiguous(fmt), grad);
  return grad;
}

// ---- scale_bias_act (inference) -------------------------------------------

inline void check_scale_bias(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& bias,
                             const std::optional<at::Tensor>& residual) {
  check_channels_input(x);
  check_per_channel(scale, x, "scale");
  check_per_channel(bias, x, "bias");
  if (residual.has_value()) check_like(*residual, x, "residual");
}

template <class K>
void scale_bias_act_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, bool relu,
                         const at::Tensor& out, at::MemoryFormat fmt) {
  if (out.numel() == 0) return;
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor r = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  K::scale_bias_act(x.contiguous(fmt), scale.to(acc).contiguous(), bias.to(acc).contiguous(), r,
                    relu, out);
}

template <class K>
at::Tensor scale_bias_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& bias,
                          const std::optional<at::Tensor>& residual, bool relu) {
  check_scale_bias(x, scale, bias, residual);
  typename K::Guard guard(x.device());
  const auto fmt = kernel_format(x);
  auto out = empty_in(x, fmt);
  scale_bias_act_into<K>(x, scale, bias, residual, relu, out, fmt);
  return out;
}

template <class K>
void scale_bias_act_out(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& bias,
                        const std::optional<at::Tensor>& residual, bool relu,
                        const at::Tensor& out) {
  check_scale_bias(x, scale, bias, residual);
  check_like(out, x, "out");
  at::assert_no_partial_overlap(out, x);
  if (residual.has_value()) at::assert_no_partial_overlap(out, *residual);
  typename K::Guard guard(x.device());
  write_into(out, [&](const at::Tensor& dst, at::MemoryFormat fmt) {
    scale_bias_act_into<K>(x, scale, bias, residual, relu, dst, fmt);
  });
}

template <class K>
void scale_bias_act_(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual, bool relu) {
  scale_bias_act_out<K>(x, scale, bias, residual, relu, x);
}

// ---- bn_act (training: batch statistics) -----------------------------------

inline int64_t values_per_channel(const at::Tensor& x) {
  return x.size(1) == 0 ? 0 : x.numel() / x.size(1);
}

// The ReLU-mask bits of bn_relu_bits_fwd/bwd (CPU, cpu/vec.h's layout): one bit per element of x in
// kernel memory order, whose runs (channels_last rows, NCHW planes) must start on a byte.
inline void check_relu_bits_input(const at::Tensor& x) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "resnet_fast: the ReLU-mask bits ops take float32, float16 or bfloat16, got ", st);
  const auto v = channel_view(x, kernel_format(x));
  const int64_t run = v.channels_last ? v.channels : v.inner;
  TORCH_CHECK(run % 8 == 0, "resnet_fast: the ReLU-mask bits ops need ",
              v.channels_last ? "a channel count" : "a spatial size", " that is a multiple of 8, got ", run);
}

inline int64_t relu_bits_bytes(const at::Tensor& x) { return (x.numel() + 7) / 8; }

inline void check_relu_bits(const at::Tensor& relu_bits, const at::Tensor& x, const char* forward) {
  TORCH_CHECK(relu_bits.scalar_type() == at::kByte && relu_bits.dim() == 1 &&
                  relu_bits.numel() == relu_bits_bytes(x) && relu_bits.device() == x.device(),
              "resnet_fast: relu_bits must be ", forward, "'s uint8 tensor of ", relu_bits_bytes(x),
              " bytes on ", x.device(), ", got ", relu_bits.scalar_type(), " of shape ", relu_bits.sizes(),
              " on ", relu_bits.device());
}

// The inputs of a BN in training (batch statistics): x, its optional affine parameters and eps.
inline void check_bn_train(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, const char* name = "x") {
  check_channels_input(x);
  TORCH_CHECK(values_per_channel(x) > 1, "resnet_fast: batch norm in training needs more than 1 value per "
              "channel, got ", name, " of shape ", x.sizes());
  const std::string prefix = std::string(name) == "x" ? "" : std::string(name) + "_";  // shortcut_weight, ...
  if (weight.has_value()) check_per_channel(*weight, x, (prefix + "weight").c_str());
  if (bias.has_value()) check_per_channel(*bias, x, (prefix + "bias").c_str());
  TORCH_CHECK(eps >= 0, "resnet_fast: ", prefix, "eps must be >= 0, got ", eps);
}

// kBits: also return the ReLU mask as bits (CPU kernels only; CUDA's K::bn_forward has no such argument).
template <class K, bool kBits>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_forward_op(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps,
    bool relu) {
  check_bn_train(x, weight, bias, eps);
  if (residual.has_value()) check_like(*residual, x, "residual");
  if constexpr (kBits) check_relu_bits_input(x);
  typename K::Guard guard(x.device());
  const auto fmt = kernel_format(x);
  const auto acc = acc_type(x.scalar_type());
  auto out = empty_in(x, fmt);
  auto mean = at::empty({x.size(1)}, x.options().dtype(acc));
  auto var = at::empty({x.size(1)}, x.options().dtype(acc));
  auto bits = kBits ? at::empty({relu_bits_bytes(x)}, x.options().dtype(at::kByte)) : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  if constexpr (kBits) {
    K::bn_forward(x.contiguous(fmt), as_acc(weight, acc), as_acc(bias, acc), r, eps, relu, out, mean,
                  var, bits);
  } else {
    K::bn_forward(x.contiguous(fmt), as_acc(weight, acc), as_acc(bias, acc), r, eps, relu, out, mean,
                  var);
  }
  return {out, mean, var, bits};
}

// act(batch_norm(x) + residual) with batch statistics. Returns the output, the
// batch mean and the biased batch variance (accumulation dtype, shape [C]).
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps,
    bool relu) {
  auto [out, mean, var, bits] = bn_forward_op<K, false>(x, weight, bias, residual, eps, relu);
  return {out, mean, var};
}

// relu(batch_norm(x) + residual), as bn_act_fwd, plus the ReLU mask as bits for bn_relu_bits_bwd.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_bits_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps) {
  return bn_forward_op<K, true>(x, weight, bias, residual, eps, true);
}

// kBits: the ReLU mask from relu_bits, not out (CPU kernels only).
template <class K, bool kBits>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const at::Tensor& relu_bits,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
    double eps, bool relu, bool residual_grad) {
  check_channels_input(x);
  check_like(grad_out, x, "grad_out");
  if constexpr (kBits) {
    check_relu_bits_input(x);
    check_relu_bits(relu_bits, x, "bn_relu_bits_fwd");
  } else {
    check_like(out, x, "out");
  }
  check_per_channel(mean, x, "mean");
  check_per_channel(var, x, "var");
  if (weight.has_value()) check_per_channel(*weight, x, "weight");
  typename K::Guard guard(x.device());
  const auto fmt = kernel_format(x);
  const auto acc = acc_type(x.scalar_type());
  auto grad_x = empty_in(x, fmt);
  auto grad_w = at::empty({x.size(1)}, x.options().dtype(acc));
  auto grad_b = at::empty({x.size(1)}, x.options().dtype(acc));
  auto grad_r = residual_grad ? empty_in(x, fmt) : at::empty({0}, x.options());
  const at::Tensor gr = residual_grad ? grad_r : at::Tensor();
  if constexpr (kBits) {
    K::bn_backward(grad_out.contiguous(fmt), x.contiguous(fmt), at::Tensor(), as_acc(weight, acc),
                   mean.to(acc).contiguous(), var.to(acc).contiguous(), eps, relu, grad_x, grad_w,
                   grad_b, gr, relu_bits.contiguous());
  } else {
    K::bn_backward(grad_out.contiguous(fmt), x.contiguous(fmt), out.contiguous(fmt),
                   as_acc(weight, acc), mean.to(acc).contiguous(), var.to(acc).contiguous(), eps,
                   relu, grad_x, grad_w, grad_b, gr);
  }
  return {grad_x, grad_w, grad_b, grad_r};
}

// Gradients of bn_act_fwd. grad_residual is the ReLU-masked grad_out (an empty
// tensor when residual_grad is false); the ReLU mask comes from out > 0.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
    double eps, bool relu, bool residual_grad) {
  return bn_backward_op<K, false>(grad_out, x, out, at::Tensor(), weight, mean, var, eps, relu, residual_grad);
}

// Gradients of bn_relu_bits_fwd, the ReLU mask read from its bits.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_bits_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& relu_bits,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
    double eps, bool residual_grad) {
  return bn_backward_op<K, true>(grad_out, x, at::Tensor(), relu_bits, weight, mean, var, eps, true,
                           residual_grad);
}

// relu(batch_norm(x) + batch_norm(shortcut)), each BN with its own batch statistics: the end of a
// block with a projection shortcut in one op. Returns the output, each BN's batch mean and biased
// variance, and the ReLU mask as bits for bn2_relu_bits_bwd.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn2_relu_bits_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, const at::Tensor& shortcut, const std::optional<at::Tensor>& shortcut_weight,
    const std::optional<at::Tensor>& shortcut_bias, double shortcut_eps) {
  check_bn_train(x, weight, bias, eps);
  check_like(shortcut, x, "shortcut");
  check_bn_train(shortcut, shortcut_weight, shortcut_bias, shortcut_eps, "shortcut");
  check_relu_bits_input(x);
  typename K::Guard guard(x.device());
  const auto fmt = kernel_format(x);
  const auto acc = acc_type(x.scalar_type());
  const auto stat = [&] { return at::empty({x.size(1)}, x.options().dtype(acc)); };
  auto out = empty_in(x, fmt);
  auto bits = at::empty({relu_bits_bytes(x)}, x.options().dtype(at::kByte));
  const BnArgs main{x.contiguous(fmt), as_acc(weight, acc), as_acc(bias, acc), stat(), stat(), eps};
  const BnArgs side{shortcut.contiguous(fmt), as_acc(shortcut_weight, acc), as_acc(shortcut_bias, acc), stat(),
                    stat(), shortcut_eps};
  K::bn2_forward(main, side, out, bits);
  return {out, main.mean, main.var, side.mean, side.var, bits};
}

// Gradients of bn2_relu_bits_fwd: x's, weight's and bias's, then the shortcut's three.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn2_relu_bits_bwd(
    const at::Tensor& grad_out, const at::Tensor& relu_bits, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, double eps,
    const at::Tensor& shortcut, const std::optional<at::Tensor>& shortcut_weight, const at::Tensor& shortcut_mean,
    const at::Tensor& shortcut_var, double shortcut_eps) {
  check_bn_train(x, weight, std::nullopt, eps);
  check_like(grad_out, x, "grad_out");
  check_like(shortcut, x, "shortcut");
  check_bn_train(shortcut, shortcut_weight, std::nullopt, shortcut_eps, "shortcut");
  check_relu_bits_input(x);
  check_relu_bits(relu_bits, x, "bn2_relu_bits_fwd");
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, {&var, "var"}, {&shortcut_mean, "shortcut_mean"},
                                {&shortcut_var, "shortcut_var"}}) {
    check_per_channel(*t, x, name);
  }
  typename K::Guard guard(x.device());
  const auto fmt = kernel_format(x);
  const auto acc = acc_type(x.scalar_type());
  const auto grads = [&] {
    return BnGrads{empty_in(x, fmt), at::empty({x.size(1)}, x.options().dtype(acc)),
                   at::empty({x.size(1)}, x.options().dtype(acc))};
  };
  const BnGrads main_grads = grads(), side_grads = grads();
  K::bn2_backward(grad_out.contiguous(fmt), relu_bits.contiguous(),
                  {x.contiguous(fmt), as_acc(weight, acc), at::Tensor(), mean.to(acc).contiguous(),
                   var.to(acc).contiguous(), eps},
                  {shortcut.contiguous(fmt), as_acc(shortcut_weight, acc), at::Tensor(),
                   shortcut_mean.to(acc).contiguous(), shortcut_var.to(acc).contiguous(), shortcut_eps},
                  main_grads, side_grads);
  return {main_grads.x, main_grads.weight, main_grads.bias, side_grads.x, side_grads.weight, side_grads.bias};
}

// running = (1 - momentum) * running + momentum * batch, with the unbiased
// variance (count / (count - 1)) for running_var, exactly as torch does.
template <class K>
void bn_update_stats_(const at::Tensor& running_mean, const at::Tensor& running_var,
                      const at::Tensor& mean, const at::Tensor& var, double momentum,
                      int64_t count) {
  check_float(running_mean, "running_mean");
  check_like(running_var, running_mean, "running_var");
  TORCH_CHECK(running_mean.dim() == 1, "resnet_fast: running_mean must be 1-D, got shape ",
              running_mean.sizes());
  check_float(mean, "mean");
  check_like(var, mean, "var");
  TORCH_CHECK(mean.sizes() == running_mean.sizes() && mean.device() == running_mean.device(),
              "resnet_fast: mean must match running_mean's shape and device");
  TORCH_CHECK(count > 1, "resnet_fast: count must be > 1 for the unbiased variance, got ", count);
  typename K::Guard guard(running_mean.device());
  if (running_mean.numel() == 0) return;
  const auto acc = acc_type(mean.scalar_type());
  const auto m = mean.to(acc).contiguous();
  const auto v = var.to(acc).contiguous();
  if (running_mean.is_contiguous() && running_var.is_contiguous()) {
    K::update_running_stats(running_mean, running_var, m, v, momentum, count);
  } else {
    auto rm = running_mean.contiguous();
    auto rv = running_var.contiguous();
    K::update_running_stats(rm, rv, m, v, momentum, count);
    running_mean.copy_(rm);
    running_var.copy_(rv);
  }
}

// One op table, registered by ops.cpp (CPU) and cuda/ops.cu (CUDA) over their kernel class.
template <class K>
void register_impls(torch::Library& m) {
  m.impl("add_relu", &add_relu<K>);
  m.impl("add_relu_out", &add_relu_out<K>);
  m.impl("add_relu_", &add_relu_<K>);
  m.impl("add_relu_backward", &add_relu_backward<K>);
  m.impl("scale_bias_act", &scale_bias_act<K>);
  m.impl("scale_bias_act_out", &scale_bias_act_out<K>);
  m.impl("scale_bias_act_", &scale_bias_act_<K>);
  m.impl("bn_act_fwd", &bn_act_fwd<K>);
  m.impl("bn_act_bwd", &bn_act_bwd<K>);
  m.impl("bn_update_stats_", &bn_update_stats_<K>);
}

// The ReLU-mask bits ops: CPU only (ops.cpp), for the eager CPU training path (ops/bn_act_train.py).
template <class K>
void register_relu_bits_impls(torch::Library& m) {
  m.impl("bn_relu_bits_fwd", &bn_relu_bits_fwd<K>);
  m.impl("bn_relu_bits_bwd", &bn_relu_bits_bwd<K>);
  m.impl("bn2_relu_bits_fwd", &bn2_relu_bits_fwd<K>);
  m.impl("bn2_relu_bits_bwd", &bn2_relu_bits_bwd<K>);
}

}  // namespace impl
}  // namespace resnet_fast
