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
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../ops_impl.h"

namespace resnet_fast::cpu {
// One copy per instruction set (CPU_CAPABILITY: AVX2, AVX512, ...), as at::vec does: the same
// template compiled for two ISAs must not be one linker symbol.
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512)
template <typename T>
inline void stream_bytes(void* p, const Vectorized<T>& v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(static_cast<float*>(p), v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(static_cast<double*>(p), v);
  } else {
    _mm512_stream_si512(static_cast<__m512i*>(p), v);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
template <typename T>
inline void stream_bytes(void* p, const Vectorized<T>& v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(static_cast<float*>(p), v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(static_cast<double*>(p), v);
  } else {
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
  }
}
#endif

// Orders this thread's streamed stores before whatever the thread does next (the parallel region's end).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

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
  // A non-temporal store, where p is aligned to the vector, for an output no op reads soon (a block's
  // residual gradient waits for the block's whole backward): the write neither reads the line in first
  // nor evicts what the next op (the block's last conv's backward) reads. for_each_run fences each
  // chunk's streamed stores.
  void store_stream(scalar_t* p) const {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    constexpr size_t kBytes = kSize * sizeof(scalar_t);
    if (reinterpret_cast<uintptr_t>(p) % kBytes == 0) {
      if constexpr (kReduced) {
        stream_bytes(p, at::vec::convert_from_float<scalar_t>(v[0], v[1]));
      } else {
        stream_bytes(p, v[0]);
      }
      return;
    }
#endif
    store(p);
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

// v, kept in a register: GCC would otherwise fold the load of a vector that is then masked into one
// AVX-512 masked load (vmovups mem, zmm{k}{z}), which on AMD Zen 5 streams at less than half the speed of
// a plain load (bn_relu_bits_bwd, 8x256x40x40 fp32 channels_last: 2.50 ms with it, 1.06 ms without;
// benchmarks/results/cpu_micro_bn_train_2026-12-03_at_9280aaf.json and _at_790952c.json).
template <typename T>
inline Vectorized<T> in_register(const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    __m512 r = v;
    asm("" : "+v"(r));
    return r;
  } else if constexpr (std::is_same_v<T, double>) {
    __m512d r = v;
    asm("" : "+v"(r));
    return r;
  }
#endif
  return v;
}

// Grad masked by out > 0 (false for NaN, like threshold_backward).
template <typename T>
inline Vectorized<T> mask_v(const Vectorized<T>& g, const Vectorized<T>& out) {
  return in_register(g) & (out > Vectorized<T>(T(0)));  // the compare's all-ones lanes keep g
}
template <typename T>
inline T mask_s(T g, T out) {
  return out > T(0) ? g : T(0);
}

// ReLU masks kept as bits, one per element in memory order: bit e % 8 of byte e / 8 is out[e] > 0.
// A training BN saves them instead of its output: its backward then reads 1/32 (fp32) or 1/16 (bf16)
// of a tensor for the mask instead of the whole output, twice. Lanes of one acc vector map to
// consecutive bits from a byte boundary (callers keep runs starting at multiples of 8 elements).
template <typename T>
inline uint32_t positive_bits(const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ)));
  }
#endif
  __at_align__ T buf[Vectorized<T>::size()];
  v.store(buf);
  uint32_t bits = 0;
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) bits |= static_cast<uint32_t>(buf[l] > T(0)) << l;
  return bits;
}

// g where the lane's bit is set, else 0.
template <typename T>
inline Vectorized<T> keep_bits(const Vectorized<T>& g, uint32_t bits) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_maskz_mov_ps(static_cast<__mmask16>(bits), in_register(g));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane), lane);
    return _mm256_and_ps(g, _mm256_castsi256_ps(on));
  }
#endif
  __at_align__ T buf[Vectorized<T>::size()];
  g.store(buf);
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) {
    if (!((bits >> l) & 1u)) buf[l] = T(0);
  }
  return Vectorized<T>::loadu(buf);
}

// The bits of one acc vector's lanes, starting at element e (e % 8 == 0).
template <typename T>
inline uint32_t load_bits(const uint8_t* bits, int64_t e) {
  uint32_t v = 0;
  std::memcpy(&v, bits + e / 8, Vectorized<T>::size() / 8);
  return v;
}
template <typename T>
inline void store_bits(uint8_t* bits, int64_t e, uint32_t v) {
  std::memcpy(bits + e / 8, &v, Vectorized<T>::size() / 8);
}
inline bool bit_at(const uint8_t* bits, int64_t e) { return (bits[e / 8] >> (e % 8)) & 1u; }

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
// channels_last rows (element j in channel j; per_lane is std::true_type). Each thread's chunk ends
// with stream_fence, so bodies may use Step::store_stream.
template <class F>
void for_each_run(const ChannelView& v, const F& body) {
  constexpr int64_t kGrain = at::internal::GRAIN_SIZE;
  if (v.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(v.channels, 1));
    at::parallel_for(0, v.outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) body(r * v.channels, v.channels, 0, std::true_type{});
      stream_fence();
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(v.inner, 1));
    at::parallel_for(0, v.outer * v.channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        body(p * v.inner, v.inner, p % v.channels, std::false_type{});
      }
      stream_fence();
    });
  }
}

// Per-channel sums s1[c] = sum q1, s2[c] = sum q2 over all N*H*W positions, where
// terms.vec / terms.scalar produce (q1, q2) from an element and its channel's
// `center`. Two levels: fp32 (acc_t) partials over at most 4096 values per channel
// (NCHW: chunks of a plane; channels_last: blocks of at most 1024 rows), merged in fp64.
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

  // channels_last: blocks of whole rows, read front to back as one stream per tensor (as aten's
  // kernels read them). A block's running sums are one row of fp32 partials (2*C values, L1-resident);
  // the blocks' partials are merged in fp64, in parallel over channels (a serial merge would leave the
  // other threads idle). Block height depends on the shape alone, so results do not depend on the
  // thread count: about 64 blocks, of 8 to 1024 rows.
  const int64_t rows = std::clamp<int64_t>((v.outer + 63) / 64, 8, 1024);
  const int64_t blocks = (v.outer + rows - 1) / rows;
  const int64_t vec_end = C / S::kSize * S::kSize;
  const std::unique_ptr<acc_t[]> p1(new acc_t[blocks * C]), p2(new acc_t[blocks * C]);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* o1 = p1.get() + b * C;
      acc_t* o2 = p2.get() + b * C;
      std::fill(o1, o1 + C, acc_t(0));
      std::fill(o2, o2 + C, acc_t(0));
      for (int64_t r = b * rows, r1 = std::min(v.outer, r + rows); r < r1; ++r) {
        const int64_t off = r * C;
        int64_t j = 0;
        for (; j < vec_end; j += S::kSize) {
          S q1, q2;
          terms.vec(off + j, S::load_acc(center + j), q1, q2);
          S a1 = S::load_acc(o1 + j), a2 = S::load_acc(o2 + j);
          for (int k = 0; k < S::kParts; ++k) {
            a1.v[k] = a1.v[k] + q1.v[k];
            a2.v[k] = a2.v[k] + q2.v[k];
          }
          a1.store_acc(o1 + j);
          a2.store_acc(o2 + j);
        }
        for (; j < C; ++j) {
          acc_t e1, e2;
          terms.scalar(off + j, center[j], e1, e2);
          o1[j] += e1;
          o2[j] += e2;
        }
      }
    }
  });
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t c = begin; c < end; ++c) {
        s1[c] += p1[b * C + c];
        s2[c] += p2[b * C + c];
      }
    }
  });
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
