// Vector helpers for the CPU kernels: a Step is one Vectorized<scalar_t> worth
// of elements held as fp32 (fp64 for double) vectors, so half/bfloat16 math
// runs in the accumulation type. Runs and reductions walk the two layouts of
// ChannelView with at::parallel_for.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../ops_impl.h"

namespace resnet_fast::cpu {
// One copy per instruction set (CPU_CAPABILITY: AVX2, AVX512, ...), as at::vec does: the same
// template compiled for two ISAs must not be one linker symbol.
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename scalar_t>
struct Step {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kParts = kReduced ? 2 : 1;
  static constexpr int64_t kSize = Vectorized<scalar_t>::size();
  static_assert(kSize == kParts * AVec::size(), "a Step must split evenly into acc vectors");

  AVec v[kParts];

  static Step load(const scalar_t* p) {
    Step s;
    if constexpr (kReduced) {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
      s.v[0] = a;
      s.v[1] = b;
    } else {
      s.v[0] = AVec::loadu(p);
    }
    return s;
  }
  void store(scalar_t* p) const {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
  // Per-channel parameters are stored in acc_t.
  static Step load_acc(const acc_t* p) {
    Step s;
    for (int k = 0; k < kParts; ++k) s.v[k] = AVec::loadu(p + k * AVec::size());
    return s;
  }
  void store_acc(acc_t* p) const {
    for (int k = 0; k < kParts; ++k) v[k].store(p + k * AVec::size());
  }
  static Step broadcast(acc_t a) {
    Step s;
    for (int k = 0; k < kParts; ++k) s.v[k] = AVec(a);
    return s;
  }
  acc_t sum() const {
    __at_align__ acc_t buf[AVec::size()];
    AVec t = v[0];
    for (int k = 1; k < kParts; ++k) t = t + v[k];
    t.store(buf);
    acc_t s = 0;
    for (int64_t i = 0; i < AVec::size(); ++i) s += buf[i];
    return s;
  }
};

// ReLU that keeps NaN, like torch.relu.
template <typename T>
inline Vectorized<T> relu_v(const Vectorized<T>& v) {
  return at::vec::maximum(v, Vectorized<T>(T(0)));
}
template <typename T>
inline T relu_s(T v) {
  return v < T(0) ? T(0) : v;
}

// Grad masked by out > 0 (false for NaN, like threshold_backward).
template <typename T>
inline Vectorized<T> mask_v(const Vectorized<T>& g, const Vectorized<T>& out) {
  const Vectorized<T> zero(T(0));
  return Vectorized<T>::blendv(zero, g, out > zero);
}
template <typename T>
inline T mask_s(T g, T out) {
  return out > T(0) ? g : T(0);
}

// A per-channel parameter seen from a run: broadcast (NCHW plane, one channel)
// or one value per lane (channels_last row, element j is channel j).
template <typename scalar_t, bool PerLane>
struct ChannelParam {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  const acc_t* p;
  acc_t one{};
  S bcast{};
  ChannelParam(const acc_t* p_, int64_t c) : p(p_) {
    if constexpr (!PerLane) {
      one = p_[c];
      bcast = S::broadcast(one);
    }
  }
  // A reference to the broadcast, not a copy: copying Steps made GCC spill
  // them through the stack (store-forwarding stalls, 10x slower loops).
  decltype(auto) vec(int64_t j) const {
    if constexpr (PerLane) {
      return S::load_acc(p + j);
    } else {
      return (bcast);
    }
  }
  acc_t at(int64_t j) const {
    if constexpr (PerLane) {
      return p[j];
    } else {
      return one;
    }
  }
};

// Calls body(offset, n, c, per_lane) for each run of n elements starting at
// `offset`: NCHW planes (all in channel c; per_lane is std::false_type) or
// channels_last rows (element j in channel j; per_lane is std::true_type).
template <class F>
void for_each_run(const ChannelView& v, const F& body) {
  constexpr int64_t kGrain = at::internal::GRAIN_SIZE;
  if (v.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(v.channels, 1));
    at::parallel_for(0, v.outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) body(r * v.channels, v.channels, 0, std::true_type{});
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(v.inner, 1));
    at::parallel_for(0, v.outer * v.channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        body(p * v.inner, v.inner, p % v.channels, std::false_type{});
      }
    });
  }
}

// Steps of channels one channels_last reduction tile sums at once: its two sums and center per Step
// stay in registers (32 vector registers with AVX-512, 16 with AVX2).
template <typename scalar_t>
inline constexpr int kSumGroup = [] {
  using S = Step<scalar_t>;
  constexpr int regs = sizeof(typename S::AVec) == 64 ? 32 : 16;
  int g = 1;
  while (2 * g * 3 * S::kParts <= regs / 2) g *= 2;
  return g;
}();

// Sums terms over rows [r0, r1) of G Steps of channels from channel j0 into o1[j0..], o2[j0..].
template <typename scalar_t, int G, class Terms>
inline void sum_tile(const Terms& terms, int64_t C, int64_t r0, int64_t r1, int64_t j0,
                     const at::opmath_type<scalar_t>* center, at::opmath_type<scalar_t>* o1,
                     at::opmath_type<scalar_t>* o2) {
  using S = Step<scalar_t>;
  S ctr[G], a1[G], a2[G];
  for (int g = 0; g < G; ++g) {
    ctr[g] = S::load_acc(center + j0 + g * S::kSize);
    a1[g] = S::broadcast(0);
    a2[g] = S::broadcast(0);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C + j0;
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      S q1, q2;
      terms.vec(off + g * S::kSize, ctr[g], q1, q2);
      for (int k = 0; k < S::kParts; ++k) {
        a1[g].v[k] = a1[g].v[k] + q1.v[k];
        a2[g].v[k] = a2[g].v[k] + q2.v[k];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    a1[g].store_acc(o1 + j0 + g * S::kSize);
    a2[g].store_acc(o2 + j0 + g * S::kSize);
  }
}

// Per-channel sums s1[c] = sum q1, s2[c] = sum q2 over all N*H*W positions, where
// terms.vec / terms.scalar produce (q1, q2) from an element and its channel's
// `center`. Two levels: fp32 (acc_t) partials over at most 4096 values per channel
// (NCHW: chunks of a plane; channels_last: tiles of 256 rows), merged in fp64.
template <typename scalar_t, class Terms>
void channel_sums(const ChannelView& v, const Terms& terms,
                  const at::opmath_type<scalar_t>* center, double* s1, double* s2) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  const int64_t C = v.channels;
  std::fill(s1, s1 + C, 0.0);
  std::fill(s2, s2 + C, 0.0);

  if (!v.channels_last) {
    constexpr int64_t kChunk = 4096;
    const int64_t planes = v.outer * C;
    std::vector<double> p1(planes), p2(planes);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(v.inner, 1));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const acc_t ctr = center[p % C];
        const S vctr = S::broadcast(ctr);
        double d1 = 0, d2 = 0;
        for (int64_t base = 0; base < v.inner; base += kChunk) {
          const int64_t len = std::min(kChunk, v.inner - base);
          const int64_t off = p * v.inner + base;
          S a1 = S::broadcast(0), a2 = S::broadcast(0), q1, q2;
          int64_t j = 0;
          for (; j + S::kSize <= len; j += S::kSize) {
            terms.vec(off + j, vctr, q1, q2);
            for (int k = 0; k < S::kParts; ++k) {
              a1.v[k] = a1.v[k] + q1.v[k];
              a2.v[k] = a2.v[k] + q2.v[k];
            }
          }
          acc_t t1 = a1.sum(), t2 = a2.sum();
          for (; j < len; ++j) {
            acc_t e1, e2;
            terms.scalar(off + j, ctr, e1, e2);
            t1 += e1;
            t2 += e2;
          }
          d1 += t1;
          d2 += t2;
        }
        p1[p] = d1;
        p2[p] = d2;
      }
    });
    for (int64_t n = 0; n < v.outer; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += p1[n * C + c];
        s2[c] += p2[n * C + c];
      }
    }
    return;
  }

  // channels_last: tiles of kRows rows x one group of channels, the group's sums held in registers
  // across the tile's rows (a running sum kept in memory costs a load and a store per element). The
  // tiles' fp32 partials are merged in fp64; their number is numel / kRows, whatever C is.
  constexpr int64_t kRows = 256;
  constexpr int G = kSumGroup<scalar_t>;
  const int64_t steps = C / S::kSize;
  const int64_t full = steps / G, singles = steps % G, tail_from = steps * S::kSize;
  const int64_t cols = full + singles + (tail_from < C ? 1 : 0);
  const int64_t blocks = (v.outer + kRows - 1) / kRows;
  std::vector<acc_t> p1(blocks * C), p2(blocks * C);
  at::parallel_for(0, blocks * cols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / cols, col = t % cols;
      const int64_t r0 = b * kRows, r1 = std::min(v.outer, r0 + kRows);
      acc_t* o1 = p1.data() + b * C;
      acc_t* o2 = p2.data() + b * C;
      if (col < full) {
        sum_tile<scalar_t, G>(terms, C, r0, r1, col * G * S::kSize, center, o1, o2);
      } else if (col < full + singles) {
        sum_tile<scalar_t, 1>(terms, C, r0, r1, (full * G + col - full) * S::kSize, center, o1, o2);
      } else {
        for (int64_t c = tail_from; c < C; ++c) {
          acc_t t1 = 0, t2 = 0, e1, e2;
          for (int64_t r = r0; r < r1; ++r) {
            terms.scalar(r * C + c, center[c], e1, e2);
            t1 += e1;
            t2 += e2;
          }
          o1[c] = t1;
          o2[c] = t2;
        }
      }
    }
  });
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += p1[b * C + c];
      s2[c] += p2[b * C + c];
    }
  }
}

template <class F>
void dispatch_bool(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace resnet_fast::cpu
