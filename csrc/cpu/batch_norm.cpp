// CPU kernels for the training bn_act ops and the running-stats update.
//
// Forward: one reduction pass for per-channel shifted sums (shift K = the
// channel's first value keeps sum((x-K)^2) - sum(x-K)^2/M well conditioned),
// then one normalize pass (scale_bias_act's loop) that fuses residual and ReLU
// and may save the ReLU mask as bits (vec.h). Backward: one reduction pass for
// sum(dz) and sum(dz*(x-mean)), dz being grad_out under the ReLU mask (from the
// bits, else out > 0), then one elementwise pass for grad_x (and
// grad_residual = dz).
#include <ATen/Dispatch.h>

#include <cmath>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace resnet_fast {

using cpu::Step;

namespace {

template <typename scalar_t>
struct StatsTerms {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  const scalar_t* x;
  void vec(int64_t i, const S& k, S& q1, S& q2) const {
    const S xv = S::load(x + i);
    for (int p = 0; p < S::kParts; ++p) {
      q1.v[p] = xv.v[p] - k.v[p];
      q2.v[p] = q1.v[p] * q1.v[p];
    }
  }
  void scalar(int64_t i, acc_t k, acc_t& q1, acc_t& q2) const {
    q1 = static_cast<acc_t>(x[i]) - k;
    q2 = q1 * q1;
  }
};

// Where the backward's ReLU mask comes from.
enum class Mask { kNone, kOut, kBits };

// dz: grad_out masked by the ReLU (out > 0, or the forward's bits).
template <typename scalar_t, Mask M>
struct MaskedGrad {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  const scalar_t* grad_out;
  const scalar_t* out;
  const uint8_t* bits;
  S vec(int64_t i) const {
    S g = S::load(grad_out + i);
    if constexpr (M == Mask::kOut) {
      const S o = S::load(out + i);
      for (int p = 0; p < S::kParts; ++p) g.v[p] = cpu::mask_v(g.v[p], o.v[p]);
    } else if constexpr (M == Mask::kBits) {
      for (int p = 0; p < S::kParts; ++p) {
        g.v[p] = cpu::keep_bits(g.v[p], cpu::load_bits<acc_t>(bits, i + p * S::AVec::size()));
      }
    }
    return g;
  }
  acc_t scalar(int64_t i) const {
    const acc_t g = static_cast<acc_t>(grad_out[i]);
    if constexpr (M == Mask::kOut) return cpu::mask_s(g, static_cast<acc_t>(out[i]));
    if constexpr (M == Mask::kBits) return cpu::bit_at(bits, i) ? g : acc_t(0);
    return g;
  }
};

template <typename scalar_t, Mask M>
struct GradTerms {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  MaskedGrad<scalar_t, M> dz;
  const scalar_t* x;
  void vec(int64_t i, const S& mean, S& q1, S& q2) const {
    q1 = dz.vec(i);
    const S xv = S::load(x + i);
    for (int p = 0; p < S::kParts; ++p) q2.v[p] = q1.v[p] * (xv.v[p] - mean.v[p]);
  }
  void scalar(int64_t i, acc_t mean, acc_t& q1, acc_t& q2) const {
    q1 = dz.scalar(i);
    q2 = q1 * (static_cast<acc_t>(x[i]) - mean);
  }
};

template <class F>
void dispatch_mask(bool relu, bool bits, const F& f) {
  if (!relu) {
    f(std::integral_constant<Mask, Mask::kNone>{});
  } else if (bits) {
    f(std::integral_constant<Mask, Mask::kBits>{});
  } else {
    f(std::integral_constant<Mask, Mask::kOut>{});
  }
}

// Index of channel c's first element, used as the shift K.
int64_t first_of_channel(const ChannelView& v, int64_t c) {
  return v.channels_last ? c : c * v.inner;
}

}  // namespace

template <>
void IsaKernels<RESNET_FAST_CPU_ISA>::bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& residual, double eps, bool relu,
                            const at::Tensor& out, const at::Tensor& mean, const at::Tensor& var,
                            const at::Tensor& relu_bits) {
  const auto view = channel_view(x, kernel_format(out));
  const int64_t C = view.channels;
  const double count = static_cast<double>(view.outer * view.inner);
  at::Tensor scale = at::empty({C}, mean.options());
  at::Tensor shift = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<acc_t> k(C);
    for (int64_t c = 0; c < C; ++c) k[c] = static_cast<acc_t>(xp[first_of_channel(view, c)]);
    std::vector<double> s1(C), s2(C);
    cpu::channel_sums<scalar_t>(view, StatsTerms<scalar_t>{xp}, k.data(), s1.data(), s2.data());

    const acc_t* wp = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bp = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    acc_t* sp = scale.mutable_data_ptr<acc_t>();
    acc_t* hp = shift.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double d = s1[c] / count;
      const double m = static_cast<double>(k[c]) + d;
      const double v = std::max(s2[c] / count - d * d, 0.0);
      const double invstd = 1.0 / std::sqrt(v + eps);
      const double a = (wp ? static_cast<double>(wp[c]) : 1.0) * invstd;
      mp[c] = static_cast<acc_t>(m);
      vp[c] = static_cast<acc_t>(v);
      sp[c] = static_cast<acc_t>(a);
      hp[c] = static_cast<acc_t>((bp ? static_cast<double>(bp[c]) : 0.0) - m * a);
    }
  });
  scale_bias_act(x, scale, shift, residual, relu, out, relu_bits);
}

template <>
void IsaKernels<RESNET_FAST_CPU_ISA>::bn_backward(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& out, const at::Tensor& weight,
                             const at::Tensor& mean, const at::Tensor& var, double eps, bool relu,
                             const at::Tensor& grad_x, const at::Tensor& grad_weight,
                             const at::Tensor& grad_bias, const at::Tensor& grad_residual,
                             const at::Tensor& relu_bits) {
  const auto view = channel_view(x, kernel_format(grad_x));
  const int64_t C = view.channels;
  const double count = static_cast<double>(view.outer * view.inner);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_cpu", [&] {
    using S = Step<scalar_t>;
    using acc_t = typename S::acc_t;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* op = out.defined() ? out.const_data_ptr<scalar_t>() : nullptr;
    const uint8_t* bitp = relu_bits.defined() ? relu_bits.const_data_ptr<uint8_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* vp = var.const_data_ptr<acc_t>();
    const acc_t* wp = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;

    std::vector<double> sum_dz(C), sum_dz_xmu(C);
    dispatch_mask(relu, bitp != nullptr, [&](auto mask) {
      constexpr Mask M = decltype(mask)::value;
      cpu::channel_sums<scalar_t>(view, GradTerms<scalar_t, M>{{gp, op, bitp}, xp}, mp, sum_dz.data(),
                                  sum_dz_xmu.data());
    });

    // grad_x = a * dz + b * (x - mean) + d per channel.
    std::vector<acc_t> a(C), b(C), d(C);
    acc_t* gwp = grad_weight.mutable_data_ptr<acc_t>();
    acc_t* gbp = grad_bias.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(static_cast<double>(vp[c]) + eps);
      const double w = wp ? static_cast<double>(wp[c]) : 1.0;
      gwp[c] = static_cast<acc_t>(sum_dz_xmu[c] * invstd);
      gbp[c] = static_cast<acc_t>(sum_dz[c]);
      a[c] = static_cast<acc_t>(w * invstd);
      b[c] = static_cast<acc_t>(-w * invstd * invstd * invstd * sum_dz_xmu[c] / count);
      d[c] = static_cast<acc_t>(-w * invstd * sum_dz[c] / count);
    }

    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* grp = grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_mask(relu, bitp != nullptr, [&](auto mask) {
      cpu::dispatch_bool(grp != nullptr, [&](auto has_gr) {
        constexpr Mask M = decltype(mask)::value;
        constexpr bool kGr = decltype(has_gr)::value;
        const MaskedGrad<scalar_t, M> masked{gp, op, bitp};
        cpu::for_each_run(view, [&](int64_t off, int64_t n, int64_t c, auto per_lane) {
          constexpr bool kLane = decltype(per_lane)::value;
          const cpu::ChannelParam<scalar_t, kLane> pa(a.data(), c), pb(b.data(), c),
              pd(d.data(), c), pm(mp, c);
          int64_t j = 0;
          for (; j + S::kSize <= n; j += S::kSize) {
            const S dz = masked.vec(off + j);
            const S xv = S::load(xp + off + j);
            const auto& av = pa.vec(j);
            const auto& bv = pb.vec(j);
            const auto& dv = pd.vec(j);
            const auto& mv = pm.vec(j);
            S gx;
            for (int k = 0; k < S::kParts; ++k) {
              gx.v[k] = av.v[k] * dz.v[k] + bv.v[k] * (xv.v[k] - mv.v[k]) + dv.v[k];
            }
            gx.store(gxp + off + j);
            if constexpr (kGr) dz.store(grp + off + j);
          }
          for (; j < n; ++j) {
            const acc_t dz = masked.scalar(off + j);
            const acc_t xm = static_cast<acc_t>(xp[off + j]) - pm.at(j);
            gxp[off + j] = static_cast<scalar_t>(pa.at(j) * dz + pb.at(j) * xm + pd.at(j));
            if constexpr (kGr) grp[off + j] = static_cast<scalar_t>(dz);
          }
        });
      });
    });
  });
}

#ifndef RESNET_FAST_CPU_VARIANT_TU  // scalar: compiled once, not per ISA (avx512.cpp)
void CpuKernels::update_running_stats(const at::Tensor& running_mean,
                                      const at::Tensor& running_var, const at::Tensor& mean,
                                      const at::Tensor& var, double momentum, int64_t count) {
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "bn_update_stats_cpu", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_update_stats_cpu_acc", [&] {
      run_t* rm = running_mean.mutable_data_ptr<run_t>();
      run_t* rv = running_var.mutable_data_ptr<run_t>();
      const scalar_t* m = mean.const_data_ptr<scalar_t>();
      const scalar_t* v = var.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < running_mean.numel(); ++c) {
        rm[c] = static_cast<run_t>((1.0 - momentum) * static_cast<double>(rm[c]) +
                                   momentum * static_cast<double>(m[c]));
        rv[c] = static_cast<run_t>((1.0 - momentum) * static_cast<double>(rv[c]) +
                                   momentum * static_cast<double>(v[c]) * unbias);
      }
    });
  });
}

#endif  // RESNET_FAST_CPU_VARIANT_TU

}  // namespace resnet_fast
