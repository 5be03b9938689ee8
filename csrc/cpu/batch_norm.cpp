// CPU kernels for the training bn_act ops and the running-stats update.
//
// Forward: one reduction pass for per-channel shifted sums (shift K = the
// channel's first value keeps sum((x-K)^2) - sum(x-K)^2/M well conditioned),
// then one normalize pass (scale_bias_act's loop) that fuses residual and ReLU
// and may save the ReLU mask as bits (vec.h). Backward: one reduction pass for
// sum(dz) and sum(dz*(x-mean)), dz being grad_out under the ReLU mask (from the
// bits, else out > 0), then one elementwise pass for grad_x (and
// grad_residual = dz). bn2_forward/bn2_backward do the same for relu(bn(x) + bn(shortcut)), a projection
// block's end: a statistics pass per input, one normalize pass for both; a sums pass per input, one
// pass writing both input gradients.
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

// x's batch mean and biased variance per channel, and the affine terms of its BN:
// weight * (x - mean) / sqrt(var + eps) + bias == x * scale + shift.
template <typename scalar_t>
void batch_stats(const ChannelView& view, const scalar_t* xp, const at::Tensor& weight, const at::Tensor& bias,
                 double eps, const at::Tensor& mean, const at::Tensor& var, at::opmath_type<scalar_t>* sp,
                 at::opmath_type<scalar_t>* hp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = view.channels;
  const double count = static_cast<double>(view.outer * view.inner);
  std::vector<acc_t> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = static_cast<acc_t>(xp[first_of_channel(view, c)]);
  std::vector<double> s1(C), s2(C);
  cpu::channel_sums<scalar_t>(view, StatsTerms<scalar_t>{xp}, k.data(), s1.data(), s2.data());

  const acc_t* wp = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bp = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
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
}

// From a BN's gradient sums (sum dz, sum dz * (x - mean)): its weight and bias gradients, and the
// coefficients of grad_x = a * dz + b * (x - mean) + d per channel.
template <typename acc_t>
void grad_coefficients(int64_t C, double count, const std::vector<double>& sum_dz,
                       const std::vector<double>& sum_dz_xmu, const acc_t* vp, const acc_t* wp, double eps,
                       acc_t* gwp, acc_t* gbp, acc_t* a, acc_t* b, acc_t* d) {
  for (int64_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(vp[c]) + eps);
    const double w = wp ? static_cast<double>(wp[c]) : 1.0;
    gwp[c] = static_cast<acc_t>(sum_dz_xmu[c] * invstd);
    gbp[c] = static_cast<acc_t>(sum_dz[c]);
    a[c] = static_cast<acc_t>(w * invstd);
    b[c] = static_cast<acc_t>(-w * invstd * invstd * invstd * sum_dz_xmu[c] / count);
    d[c] = static_cast<acc_t>(-w * invstd * sum_dz[c] / count);
  }
}

}  // namespace

template <>
void IsaKernels<RESNET_FAST_CPU_ISA>::bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& residual, double eps, bool relu,
                            const at::Tensor& out, const at::Tensor& mean, const at::Tensor& var,
                            const at::Tensor& relu_bits) {
  const auto view = channel_view(x, kernel_format(out));
  at::Tensor scale = at::empty({view.channels}, mean.options());
  at::Tensor shift = at::empty({view.channels}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_stats<scalar_t>(view, x.const_data_ptr<scalar_t>(), weight, bias, eps, mean, var,
                          scale.mutable_data_ptr<acc_t>(), shift.mutable_data_ptr<acc_t>());
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
    grad_coefficients(C, count, sum_dz, sum_dz_xmu, vp, wp, eps, grad_weight.mutable_data_ptr<acc_t>(),
                      grad_bias.mutable_data_ptr<acc_t>(), a.data(), b.data(), d.data());

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
            if constexpr (kGr) dz.store_stream(grp + off + j);  // read after the block's backward
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

// relu(x * scale + r * r_scale + (shift + r_shift)): both BNs, the add and the ReLU in one pass; the
// ReLU mask saved as bits as in scale_bias_act.
template <>
void IsaKernels<RESNET_FAST_CPU_ISA>::bn2_forward(const BnArgs& main, const BnArgs& shortcut, const at::Tensor& out,
                                                  const at::Tensor& relu_bits) {
  const auto view = channel_view(main.x, kernel_format(out));
  const int64_t C = view.channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, main.x.scalar_type(), "bn2_forward_cpu", [&] {
    using S = Step<scalar_t>;
    using acc_t = typename S::acc_t;
    const scalar_t* xp = main.x.const_data_ptr<scalar_t>();
    const scalar_t* rp = shortcut.x.const_data_ptr<scalar_t>();
    std::vector<acc_t> sx(C), hx(C), sr(C), hr(C);
    batch_stats<scalar_t>(view, xp, main.weight, main.bias, main.eps, main.mean, main.var, sx.data(), hx.data());
    batch_stats<scalar_t>(view, rp, shortcut.weight, shortcut.bias, shortcut.eps, shortcut.mean, shortcut.var,
                          sr.data(), hr.data());
    for (int64_t c = 0; c < C; ++c) hx[c] += hr[c];
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* mp = relu_bits.mutable_data_ptr<uint8_t>();
    cpu::for_each_run(view, [&](int64_t off, int64_t n, int64_t c, auto per_lane) {
      constexpr bool kLane = decltype(per_lane)::value;
      const cpu::ChannelParam<scalar_t, kLane> ps(sx.data(), c), pr(sr.data(), c), ph(hx.data(), c);
      int64_t j = 0;
      for (; j + S::kSize <= n; j += S::kSize) {
        S y = S::load(xp + off + j);
        const S r = S::load(rp + off + j);
        const auto& sv = ps.vec(j);
        const auto& rv = pr.vec(j);
        const auto& hv = ph.vec(j);
        for (int k = 0; k < S::kParts; ++k) y.v[k] = cpu::relu_v(y.v[k] * sv.v[k] + r.v[k] * rv.v[k] + hv.v[k]);
        y.store(op + off + j);
        if constexpr (S::kReduced) y = S::load(op + off + j);  // the mask of the stored (rounded) output
        for (int k = 0; k < S::kParts; ++k) {
          cpu::store_bits<acc_t>(mp, off + j + k * S::AVec::size(), cpu::positive_bits(y.v[k]));
        }
      }
      uint32_t byte = 0;  // the tail's bits, written a byte at a time
      for (; j < n; ++j) {
        const int64_t e = off + j;
        const acc_t y = static_cast<acc_t>(xp[e]) * ps.at(j) + static_cast<acc_t>(rp[e]) * pr.at(j) + ph.at(j);
        op[e] = static_cast<scalar_t>(cpu::relu_s(y));
        byte |= static_cast<uint32_t>(static_cast<acc_t>(op[e]) > acc_t(0)) << (e % 8);
        if (e % 8 == 7) {
          mp[e / 8] = static_cast<uint8_t>(byte);
          byte = 0;
        }
      }
    });
  });
}

// Both BNs' gradients from the one masked grad_out: a sums pass per BN input, then one pass writing
// both input gradients.
template <>
void IsaKernels<RESNET_FAST_CPU_ISA>::bn2_backward(const at::Tensor& grad_out, const at::Tensor& relu_bits,
                                                   const BnArgs& main, const BnArgs& shortcut,
                                                   const BnGrads& main_grads, const BnGrads& shortcut_grads) {
  const auto view = channel_view(main.x, kernel_format(main_grads.x));
  const int64_t C = view.channels;
  const double count = static_cast<double>(view.outer * view.inner);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, main.x.scalar_type(), "bn2_backward_cpu", [&] {
    using S = Step<scalar_t>;
    using acc_t = typename S::acc_t;
    const MaskedGrad<scalar_t, Mask::kBits> masked{grad_out.const_data_ptr<scalar_t>(), nullptr,
                                                   relu_bits.const_data_ptr<uint8_t>()};
    const scalar_t* xp = main.x.const_data_ptr<scalar_t>();
    const scalar_t* rp = shortcut.x.const_data_ptr<scalar_t>();
    const acc_t* mxp = main.mean.const_data_ptr<acc_t>();
    const acc_t* mrp = shortcut.mean.const_data_ptr<acc_t>();
    std::vector<double> sum_dz(C), sum_dz_xmu(C), sum_dz_again(C), sum_dz_rmu(C);
    cpu::channel_sums<scalar_t>(view, GradTerms<scalar_t, Mask::kBits>{masked, xp}, mxp, sum_dz.data(),
                                sum_dz_xmu.data());
    cpu::channel_sums<scalar_t>(view, GradTerms<scalar_t, Mask::kBits>{masked, rp}, mrp, sum_dz_again.data(),
                                sum_dz_rmu.data());
    const auto weight_of = [](const BnArgs& bn) {
      return bn.weight.defined() ? bn.weight.const_data_ptr<acc_t>() : nullptr;
    };
    std::vector<acc_t> ax(C), bx(C), dx(C), ar(C), br(C), dr(C);
    grad_coefficients(C, count, sum_dz, sum_dz_xmu, main.var.const_data_ptr<acc_t>(), weight_of(main), main.eps,
                      main_grads.weight.mutable_data_ptr<acc_t>(), main_grads.bias.mutable_data_ptr<acc_t>(),
                      ax.data(), bx.data(), dx.data());
    grad_coefficients(C, count, sum_dz, sum_dz_rmu, shortcut.var.const_data_ptr<acc_t>(), weight_of(shortcut),
                      shortcut.eps, shortcut_grads.weight.mutable_data_ptr<acc_t>(),
                      shortcut_grads.bias.mutable_data_ptr<acc_t>(), ar.data(), br.data(), dr.data());

    scalar_t* gxp = main_grads.x.mutable_data_ptr<scalar_t>();
    scalar_t* grp = shortcut_grads.x.mutable_data_ptr<scalar_t>();
    cpu::for_each_run(view, [&](int64_t off, int64_t n, int64_t c, auto per_lane) {
      constexpr bool kLane = decltype(per_lane)::value;
      const cpu::ChannelParam<scalar_t, kLane> pax(ax.data(), c), pbx(bx.data(), c), pdx(dx.data(), c),
          pmx(mxp, c), par(ar.data(), c), pbr(br.data(), c), pdr(dr.data(), c), pmr(mrp, c);
      int64_t j = 0;
      for (; j + S::kSize <= n; j += S::kSize) {
        const S dz = masked.vec(off + j);
        const S xv = S::load(xp + off + j);
        const S rv = S::load(rp + off + j);
        const auto &axv = pax.vec(j), &bxv = pbx.vec(j), &dxv = pdx.vec(j), &mxv = pmx.vec(j);
        const auto &arv = par.vec(j), &brv = pbr.vec(j), &drv = pdr.vec(j), &mrv = pmr.vec(j);
        S gx, gr;
        for (int k = 0; k < S::kParts; ++k) {
          gx.v[k] = axv.v[k] * dz.v[k] + bxv.v[k] * (xv.v[k] - mxv.v[k]) + dxv.v[k];
          gr.v[k] = arv.v[k] * dz.v[k] + brv.v[k] * (rv.v[k] - mrv.v[k]) + drv.v[k];
        }
        gx.store(gxp + off + j);
        gr.store(grp + off + j);
      }
      for (; j < n; ++j) {
        const int64_t e = off + j;
        const acc_t dz = masked.scalar(e);
        gxp[e] = static_cast<scalar_t>(pax.at(j) * dz + pbx.at(j) * (static_cast<acc_t>(xp[e]) - pmx.at(j)) + pdx.at(j));
        grp[e] = static_cast<scalar_t>(par.at(j) * dz + pbr.at(j) * (static_cast<acc_t>(rp[e]) - pmr.at(j)) + pdr.at(j));
      }
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
