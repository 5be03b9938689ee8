// CPU kernels for add_relu (+ its backward) and scale_bias_act.
#include <ATen/Dispatch.h>

#include "kernels.h"
#include "vec.h"

namespace resnet_fast {

using cpu::Step;

namespace {

// Flat loop over n elements of identically laid out tensors.
template <class F>
void for_each_chunk(int64_t n, const F& f) {
  at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) { f(begin, end); });
}

}  // namespace

template <>
void IsaKernels<RESNET_FAST_CPU_ISA>::add_relu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cpu", [&] {
    using S = Step<scalar_t>;
    using acc_t = typename S::acc_t;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_chunk(x.numel(), [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + S::kSize <= end; i += S::kSize) {
        S a = S::load(xp + i), b = S::load(rp + i);
        for (int k = 0; k < S::kParts; ++k) a.v[k] = cpu::relu_v(a.v[k] + b.v[k]);
        a.store(op + i);
      }
      for (; i < end; ++i) {
        op[i] = static_cast<scalar_t>(
            cpu::relu_s(static_cast<acc_t>(xp[i]) + static_cast<acc_t>(rp[i])));
      }
    });
  });
}

template <>
void IsaKernels<RESNET_FAST_CPU_ISA>::relu_grad(const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "relu_grad_cpu", [&] {
    using S = Step<scalar_t>;
    using acc_t = typename S::acc_t;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    scalar_t* dp = grad.mutable_data_ptr<scalar_t>();
    for_each_chunk(out.numel(), [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + S::kSize <= end; i += S::kSize) {
        S g = S::load(gp + i), o = S::load(op + i);
        for (int k = 0; k < S::kParts; ++k) g.v[k] = cpu::mask_v(g.v[k], o.v[k]);
        g.store(dp + i);
      }
      for (; i < end; ++i) {
        dp[i] = static_cast<scalar_t>(
            cpu::mask_s(static_cast<acc_t>(gp[i]), static_cast<acc_t>(op[i])));
      }
    });
  });
}

// out = act(x * scale[c] + shift[c] (+ residual)); also the normalize pass of bn_forward, which may
// ask for the ReLU mask as bits (relu_bits defined: vec.h's layout, runs of a multiple of 8 elements).
template <>
void IsaKernels<RESNET_FAST_CPU_ISA>::scale_bias_act(const at::Tensor& x, const at::Tensor& scale,
                                const at::Tensor& shift, const at::Tensor& residual, bool relu,
                                const at::Tensor& out, const at::Tensor& relu_bits) {
  const auto view = channel_view(x, kernel_format(out));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_bias_act_cpu", [&] {
    using S = Step<scalar_t>;
    using acc_t = typename S::acc_t;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* mp = relu_bits.defined() ? relu_bits.mutable_data_ptr<uint8_t>() : nullptr;
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* bp = shift.const_data_ptr<acc_t>();
    cpu::dispatch_bool(rp != nullptr, [&](auto has_res) {
      cpu::dispatch_bool(relu, [&](auto do_relu) {
        cpu::dispatch_bool(mp != nullptr, [&](auto has_bits) {
          constexpr bool kBits = decltype(do_relu)::value && decltype(has_bits)::value;
          cpu::for_each_run(view, [&](int64_t off, int64_t n, int64_t c, auto per_lane) {
            constexpr bool kLane = decltype(per_lane)::value;
            const cpu::ChannelParam<scalar_t, kLane> s(sp, c), b(bp, c);
            int64_t j = 0;
            for (; j + S::kSize <= n; j += S::kSize) {
              S y = S::load(xp + off + j);
              const auto& sv = s.vec(j);
              const auto& bv = b.vec(j);
              S r;
              if constexpr (decltype(has_res)::value) r = S::load(rp + off + j);
              for (int k = 0; k < S::kParts; ++k) {
                y.v[k] = y.v[k] * sv.v[k] + bv.v[k];
                if constexpr (decltype(has_res)::value) y.v[k] = y.v[k] + r.v[k];
                if constexpr (decltype(do_relu)::value) y.v[k] = cpu::relu_v(y.v[k]);
              }
              y.store(op + off + j);
              if constexpr (kBits) {
                // The mask of the stored output: a bf16/fp16 rounding to 0 is not positive.
                if constexpr (S::kReduced) y = S::load(op + off + j);
                for (int k = 0; k < S::kParts; ++k) {
                  cpu::store_bits<acc_t>(mp, off + j + k * S::AVec::size(), cpu::positive_bits(y.v[k]));
                }
              }
            }
            [[maybe_unused]] uint32_t byte = 0;  // the tail's bits, written a byte at a time
            for (; j < n; ++j) {
              acc_t y = static_cast<acc_t>(xp[off + j]) * s.at(j) + b.at(j);
              if constexpr (decltype(has_res)::value) y += static_cast<acc_t>(rp[off + j]);
              if constexpr (decltype(do_relu)::value) y = cpu::relu_s(y);
              op[off + j] = static_cast<scalar_t>(y);
              if constexpr (kBits) {
                const int64_t e = off + j;
                byte |= static_cast<uint32_t>(static_cast<acc_t>(op[e]) > acc_t(0)) << (e % 8);
                if (e % 8 == 7) {
                  mp[e / 8] = static_cast<uint8_t>(byte);
                  byte = 0;
                }
              }
            }
          });
        });
      });
    });
  });
}

}  // namespace resnet_fast
