// CUDA kernels for the resnet_fast ops and their registration for the CUDA
// dispatch key. Semantics (checks, formats, outputs) live in ops_impl.h; this
// file only supplies CudaKernels. Every launch goes to the current stream of
// x's device (ops_impl.h holds a CUDAGuard).
//
// BatchNorm kernels (scale_bias_act, the per-channel sums, the backward
// elementwise pass) follow tiling.h: each thread owns 8 (fp16/bf16), 4 (fp32)
// or 2 (fp64) consecutive columns of x's [rows, C * inner] view and walks rows,
// so every layout (channels_last, NCHW with large planes, NCHW 14x14 and 7x7
// planes packed side by side) moves 16 bytes per access when pointers are
// aligned; channels and per-channel parameters are fixed per thread and held in
// registers; the row loop only adds offsets and keeps kRowsPerThread loads in
// flight. add_relu / relu_grad are flat 16-byte elementwise loops.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h drags in cuBLAS/cuSPARSE
// headers that a bare toolkit lacks, and compiles slower.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../ops_impl.h"
#include "../tiling.h"

namespace resnet_fast {
namespace {

constexpr int kThreads = tiling::kThreads;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// ReLU that keeps NaN, like torch.relu; grad masked by out > 0 (false for NaN).
template <typename T>
__device__ __forceinline__ T relu_f(T v) {
  return v < T(0) ? T(0) : v;
}
template <typename T>
__device__ __forceinline__ T mask_f(T g, T out) {
  return out > T(0) ? g : T(0);
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ---- elementwise ----------------------------------------------------------

template <typename scalar_t, int VEC>
__global__ void add_relu_kernel(const scalar_t* x, const scalar_t* r, scalar_t* out, int64_t packs) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma unroll 1  // unrolled, the loop would need its trip count: a 64-bit division
  for (int64_t p = global_thread(); p < packs; p += grid_threads()) {
    const auto a = load_pack<VEC>(x + p * VEC);
    const auto b = load_pack<VEC>(r + p * VEC);
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      o.v[k] = static_cast<scalar_t>(
          relu_f(static_cast<acc_t>(a.v[k]) + static_cast<acc_t>(b.v[k])));
    }
    store_pack<VEC>(out + p * VEC, o);
  }
}

template <typename scalar_t, int VEC>
__global__ void relu_grad_kernel(const scalar_t* g, const scalar_t* out, scalar_t* grad,
                                 int64_t packs) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma unroll 1  // unrolled, the loop would need its trip count: a 64-bit division
  for (int64_t p = global_thread(); p < packs; p += grid_threads()) {
    const auto a = load_pack<VEC>(g + p * VEC);
    const auto o = load_pack<VEC>(out + p * VEC);
    Pack<scalar_t, VEC> d;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      d.v[k] = static_cast<scalar_t>(
          mask_f(static_cast<acc_t>(a.v[k]), static_cast<acc_t>(o.v[k])));
    }
    store_pack<VEC>(grad + p * VEC, d);
  }
}

// ---- BatchNorm: tiled kernels (see tiling.h) ------------------------------

using tiling::Tiling;

// 16-byte loads each thread issues before using any: a round covers
// kLoadsInFlight / streams rows (8 for the statistics, 4 for scale_bias_act,
// 2 for the backward passes, which read grad, x and out); the kernels' registers
// stay within the 128 that two 256-thread blocks per SM allow.
constexpr int kLoadsInFlight = 8;

// use(offset, load(offset)) for every row this thread visits, offset = row *
// row_len + col. All loads of a round are issued before its uses, which also
// keeps in-place ops (out == x) correct: a thread's rows are its own.
template <int kStreams, class Load, class Use>
__device__ __forceinline__ void for_each_row(const Tiling& t, int64_t col, const Load& load, const Use& use) {
  constexpr int kRows = kLoadsInFlight / kStreams;
  const int64_t stride = tiling::row_stride(t);
  const int64_t step = stride * t.row_len;
  int64_t r = tiling::first_row(t, blockIdx.y, threadIdx.y);
  int64_t off = r * t.row_len + col;
  // unroll 1: a compiler-unrolled loop needs its trip count, a 64-bit division.
#pragma unroll 1
  for (; r + (kRows - 1) * stride < t.rows; r += kRows * stride, off += kRows * step) {
    decltype(load(off)) v[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) v[u] = load(off + u * step);
#pragma unroll
    for (int u = 0; u < kRows; ++u) use(off + u * step, v[u]);
  }
#pragma unroll 1
  for (; r < t.rows; r += stride, off += step) use(off, load(off));
}

template <typename scalar_t, int VEC>
struct XR {
  Pack<scalar_t, VEC> x, r;
};

// out = act(x * scale[c] + shift[c] (+ residual)); the normalize pass of bn_forward too.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(tiling::kThreads, 2)
    scale_bias_act_kernel(const scalar_t* x, const scalar_t* r,
                          const at::opmath_type<scalar_t>* __restrict__ scale,
                          const at::opmath_type<scalar_t>* __restrict__ shift, scalar_t* out,
                          Tiling t, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t col;
  int32_t chan[VEC];
  if (!tiling::thread_columns<VEC>(t, blockIdx.x, threadIdx.x, col, chan)) return;
  acc_t a[VEC], b[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    a[k] = scale[chan[k]];
    b[k] = shift[chan[k]];
  }
  for_each_row<2>(
      t, col,
      [&](int64_t off) {
        XR<scalar_t, VEC> in;
        in.x = load_pack<VEC>(x + off);
        if (r != nullptr) in.r = load_pack<VEC>(r + off);
        return in;
      },
      [&](int64_t off, const XR<scalar_t, VEC>& in) {
        Pack<scalar_t, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t y = static_cast<acc_t>(in.x.v[k]) * a[k] + b[k];
          if (r != nullptr) y += static_cast<acc_t>(in.r.v[k]);
          o.v[k] = static_cast<scalar_t>(relu ? relu_f(y) : y);
        }
        store_pack<VEC>(out + off, o);
      });
}

template <typename scalar_t, int VEC>
struct GXO {
  Pack<scalar_t, VEC> g, x, o;
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ GXO<scalar_t, VEC> load_gxo(const scalar_t* g, const scalar_t* x,
                                                       const scalar_t* out, bool relu, int64_t off) {
  GXO<scalar_t, VEC> in;
  in.g = load_pack<VEC>(g + off);
  in.x = load_pack<VEC>(x + off);
  if (relu) in.o = load_pack<VEC>(out + off);
  return in;
}

// grad_x = a[c] * dz + b[c] * (x - mean[c]) + d[c], grad_residual = dz, where
// dz = grad_out masked by out > 0 when the op had a ReLU. coef = [a; b; d].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(tiling::kThreads, 2)
    bn_backward_elementwise_kernel(const scalar_t* grad_out, const scalar_t* out, const scalar_t* x,
                                   const at::opmath_type<scalar_t>* __restrict__ mean,
                                   const at::opmath_type<scalar_t>* __restrict__ coef,
                                   scalar_t* grad_x, scalar_t* grad_r, Tiling t, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t col;
  int32_t chan[VEC];
  if (!tiling::thread_columns<VEC>(t, blockIdx.x, threadIdx.x, col, chan)) return;
  acc_t m[VEC], a[VEC], b[VEC], d[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    m[k] = mean[chan[k]];
    a[k] = coef[chan[k]];
    b[k] = coef[t.channels + chan[k]];
    d[k] = coef[2 * t.channels + chan[k]];
  }
  for_each_row<3>(
      t, col, [&](int64_t off) { return load_gxo<scalar_t, VEC>(grad_out, x, out, relu, off); },
      [&](int64_t off, const GXO<scalar_t, VEC>& in) {
        Pack<scalar_t, VEC> gx, gr;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t dz = static_cast<acc_t>(in.g.v[k]);
          if (relu) dz = mask_f(dz, static_cast<acc_t>(in.o.v[k]));
          gx.v[k] = static_cast<scalar_t>(a[k] * dz + b[k] * (static_cast<acc_t>(in.x.v[k]) - m[k]) + d[k]);
          gr.v[k] = static_cast<scalar_t>(dz);
        }
        store_pack<VEC>(grad_x + off, gx);
        if (grad_r != nullptr) store_pack<VEC>(grad_r + off, gr);
      });
}

// ---- per-channel reductions -------------------------------------------------
// Each Terms type loads a row's VEC elements and adds their (q1, q2) to a
// thread's per-column sums, given their channels' centers; channel_sums_kernel
// sums both per channel into partials [splits, C, 2], and a finalize kernel
// adds the splits in fp64.

// Batch statistics: q1 = x - K, q2 = (x - K)^2, K = the channel's first value
// (a shift that keeps the one-pass variance well conditioned; the CPU kernels
// use the same).
template <typename scalar_t>
struct StatsTerms {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kStreams = 1;
  const scalar_t* x;
  int64_t first_stride;  // channel c starts at x[c * first_stride]
  __device__ acc_t center(int64_t c) const { return static_cast<acc_t>(x[c * first_stride]); }
  template <int VEC>
  __device__ Pack<scalar_t, VEC> load(int64_t off) const {
    return load_pack<VEC>(x + off);
  }
  template <int VEC>
  __device__ void add(const Pack<scalar_t, VEC>& v, const acc_t (&ctr)[VEC], acc_t (&s1)[VEC],
                      acc_t (&s2)[VEC]) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t q = static_cast<acc_t>(v.v[k]) - ctr[k];
      s1[k] += q;
      s2[k] += q * q;
    }
  }
};

// Backward: q1 = dz, q2 = dz * (x - mean).
template <typename scalar_t>
struct GradTerms {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kStreams = 3;
  const scalar_t* grad_out;
  const scalar_t* out;
  const scalar_t* x;
  const acc_t* mean;
  bool relu;
  __device__ acc_t center(int64_t c) const { return mean[c]; }
  template <int VEC>
  __device__ GXO<scalar_t, VEC> load(int64_t off) const {
    return load_gxo<scalar_t, VEC>(grad_out, x, out, relu, off);
  }
  template <int VEC>
  __device__ void add(const GXO<scalar_t, VEC>& in, const acc_t (&ctr)[VEC], acc_t (&s1)[VEC],
                      acc_t (&s2)[VEC]) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t dz = static_cast<acc_t>(in.g.v[k]);
      if (relu) dz = mask_f(dz, static_cast<acc_t>(in.o.v[k]));
      s1[k] += dz;
      s2[k] += dz * (static_cast<acc_t>(in.x.v[k]) - ctr[k]);
    }
  }
};

template <typename T>
__device__ __forceinline__ void warp_sum2(T& a, T& b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
}

// Per-channel sums of a tile's columns over this row block's rows, one partial
// per (split, channel). Threads accumulate their VEC columns in registers; the
// block then adds its rows (threadIdx.y) in shared memory laid out [sum][thread]
// (consecutive threads, consecutive banks) and adds each channel's columns.
template <int VEC, class Terms>
__global__ void __launch_bounds__(tiling::kThreads, 2)
    channel_sums_kernel(Terms terms, Tiling t, typename Terms::acc_t* partial) {
  using acc_t = typename Terms::acc_t;
  // A row stride = 32 / VEC (mod 32) banks: the column reads below hit 32
  // distinct banks for any 32 consecutive columns starting at a multiple of VEC.
  constexpr int kStride = tiling::kThreads + 32 / VEC;
  __shared__ acc_t sums[2 * VEC][kStride];
  int64_t col = 0;
  int32_t chan[VEC];
  const bool active = tiling::thread_columns<VEC>(t, blockIdx.x, threadIdx.x, col, chan);
  acc_t s1[VEC], s2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    s1[k] = 0;
    s2[k] = 0;
  }
  if (active) {
    acc_t ctr[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) ctr[k] = terms.center(chan[k]);
    for_each_row<Terms::kStreams>(
        t, col, [&](int64_t off) { return terms.template load<VEC>(off); },
        [&](int64_t, const auto& in) { terms.template add<VEC>(in, ctr, s1, s2); });
  }
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sums[k][tid] = s1[k];
    sums[VEC + k][tid] = s2[k];
  }
  __syncthreads();
  for (unsigned half = blockDim.y / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
#pragma unroll
      for (int j = 0; j < 2 * VEC; ++j) sums[j][tid] += sums[j][tid + half * blockDim.x];
    }
    __syncthreads();
  }
  // The tile's column sums: local column l is sums[l % VEC][l / VEC] (and + VEC).
  const tiling::Segments seg = tiling::tile_segments(t, blockIdx.x);
  acc_t* out = partial + (static_cast<int64_t>(blockIdx.y) * t.pieces + seg.piece) * t.channels * 2;
  if (seg.seg_len == 1) {  // one column per channel (channels_last)
    for (unsigned l = tid; l < static_cast<unsigned>(seg.width); l += tiling::kThreads) {
      out[(seg.first + l) * 2] = sums[l % VEC][l / VEC];
      out[(seg.first + l) * 2 + 1] = sums[VEC + l % VEC][l / VEC];
    }
    return;
  }
  const unsigned warp = tid / 32, lane = tid % 32;
  for (unsigned s = warp; s < static_cast<unsigned>(seg.count); s += tiling::kThreads / 32) {
    const unsigned lo = s * seg.seg_len;
    const unsigned hi = min(lo + seg.seg_len, static_cast<unsigned>(seg.width));
    acc_t a = 0, b = 0;
    for (unsigned l = lo + lane; l < hi; l += 32) {
      a += sums[l % VEC][l / VEC];
      b += sums[VEC + l % VEC][l / VEC];
    }
    warp_sum2(a, b);
    if (lane == 0) {
      out[(seg.first + s) * 2] = a;
      out[(seg.first + s) * 2 + 1] = b;
    }
  }
}

template <typename acc_t>
__device__ void sum_splits(const acc_t* partial, int64_t splits, int64_t C, int64_t c, double& s1,
                           double& s2) {
  s1 = 0;
  s2 = 0;
  for (int64_t s = 0; s < splits; ++s) {
    s1 += static_cast<double>(partial[(s * C + c) * 2]);
    s2 += static_cast<double>(partial[(s * C + c) * 2 + 1]);
  }
}

// mean, biased var, and the normalize pass's scale/shift (coef = [scale; shift]).
template <typename scalar_t>
__global__ void bn_stats_finalize_kernel(StatsTerms<scalar_t> t,
                                         const at::opmath_type<scalar_t>* partial, int64_t splits,
                                         int64_t C, double count,
                                         const at::opmath_type<scalar_t>* weight,
                                         const at::opmath_type<scalar_t>* bias, double eps,
                                         at::opmath_type<scalar_t>* mean,
                                         at::opmath_type<scalar_t>* var,
                                         at::opmath_type<scalar_t>* coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = global_thread();
  if (c >= C) return;
  double s1, s2;
  sum_splits(partial, splits, C, c, s1, s2);
  const double d = s1 / count;
  const double m = static_cast<double>(t.center(c)) + d;
  const double v = fmax(s2 / count - d * d, 0.0);
  const double a = (weight ? static_cast<double>(weight[c]) : 1.0) / sqrt(v + eps);
  mean[c] = static_cast<acc_t>(m);
  var[c] = static_cast<acc_t>(v);
  coef[c] = static_cast<acc_t>(a);
  coef[C + c] = static_cast<acc_t>((bias ? static_cast<double>(bias[c]) : 0.0) - m * a);
}

// grad_weight, grad_bias and the elementwise pass's coef = [a; b; d].
template <typename acc_t>
__global__ void bn_grad_finalize_kernel(const acc_t* partial, int64_t splits, int64_t C,
                                        double count, const acc_t* weight, const acc_t* var,
                                        double eps, acc_t* grad_w, acc_t* grad_b, acc_t* coef) {
  const int64_t c = global_thread();
  if (c >= C) return;
  double sum_dz, sum_dz_xmu;
  sum_splits(partial, splits, C, c, sum_dz, sum_dz_xmu);
  const double invstd = 1.0 / sqrt(static_cast<double>(var[c]) + eps);
  const double w = weight ? static_cast<double>(weight[c]) : 1.0;
  grad_w[c] = static_cast<acc_t>(sum_dz_xmu * invstd);
  grad_b[c] = static_cast<acc_t>(sum_dz);
  coef[c] = static_cast<acc_t>(w * invstd);
  coef[C + c] = static_cast<acc_t>(-w * invstd * invstd * invstd * sum_dz_xmu / count);
  coef[2 * C + c] = static_cast<acc_t>(-w * invstd * sum_dz / count);
}

template <typename run_t, typename stat_t>
__global__ void update_stats_kernel(run_t* rm, run_t* rv, const stat_t* mean, const stat_t* var,
                                    int64_t C, double momentum, double unbias) {
  const int64_t c = global_thread();
  if (c >= C) return;
  rm[c] = static_cast<run_t>((1.0 - momentum) * static_cast<double>(rm[c]) +
                             momentum * static_cast<double>(mean[c]));
  rv[c] = static_cast<run_t>((1.0 - momentum) * static_cast<double>(rv[c]) +
                             momentum * static_cast<double>(var[c]) * unbias);
}

// ---- launch helpers -----------------------------------------------------------

// SM count of the current device, queried once per device.
int64_t sm_count() {
  static std::array<std::atomic<int>, 64> cache{};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int sms = device < 64 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

int64_t blocks_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, sm_count() * 16));
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// 16-byte packs when every pointer is 16-byte aligned and `unit` (elements that
// share a channel run) divides evenly; otherwise scalar accesses.
template <typename scalar_t>
int pack_width(std::initializer_list<const void*> ptrs, int64_t unit) {
  constexpr int kMax = 16 / sizeof(scalar_t);
  return aligned16(ptrs) && unit % kMax == 0 ? kMax : 1;
}

template <typename scalar_t, class F>
void with_width(int width, const F& f) {
  constexpr int kMax = 16 / sizeof(scalar_t);
  if (width == kMax) {
    f(std::integral_constant<int, kMax>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// The tiling of x's view for a BN kernel that reads and writes `ptrs`.
template <typename scalar_t>
Tiling plan_for(const ChannelView& v, std::initializer_list<const void*> ptrs) {
  constexpr int kMax = 16 / sizeof(scalar_t);
  return tiling::plan(v.outer, v.channels, v.inner, aligned16(ptrs) ? kMax : 1, sizeof(scalar_t), sm_count());
}

dim3 grid_of(const Tiling& t) { return dim3(t.tiles, t.row_blocks); }
dim3 block_of(const Tiling& t) { return dim3(t.bx, t.by); }

// Launches the per-channel sums of `terms` over the view; returns the partials [splits, C, 2].
template <typename scalar_t, class Terms>
at::Tensor channel_sums(const Tiling& t, const Terms& terms, const at::TensorOptions& acc_opts) {
  using acc_t = at::opmath_type<scalar_t>;
  auto partial = at::empty({int64_t(t.row_blocks) * t.pieces, t.channels, 2}, acc_opts);
  with_width<scalar_t>(t.vec, [&](auto w) {
    channel_sums_kernel<decltype(w)::value><<<grid_of(t), block_of(t), 0, c10::cuda::getCurrentCUDAStream()>>>(
        terms, t, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  static void add_relu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cuda", [&] {
      const auto* xp = x.const_data_ptr<scalar_t>();
      const auto* rp = residual.const_data_ptr<scalar_t>();
      auto* op = out.mutable_data_ptr<scalar_t>();
      with_width<scalar_t>(pack_width<scalar_t>({xp, rp, op}, x.numel()), [&](auto w) {
        constexpr int VEC = decltype(w)::value;
        const int64_t packs = x.numel() / VEC;
        add_relu_kernel<scalar_t, VEC><<<blocks_for(packs), kThreads, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(xp, rp, op, packs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void relu_grad(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "relu_grad_cuda", [&] {
      const auto* gp = grad_out.const_data_ptr<scalar_t>();
      const auto* op = out.const_data_ptr<scalar_t>();
      auto* dp = grad.mutable_data_ptr<scalar_t>();
      with_width<scalar_t>(pack_width<scalar_t>({gp, op, dp}, out.numel()), [&](auto w) {
        constexpr int VEC = decltype(w)::value;
        const int64_t packs = out.numel() / VEC;
        relu_grad_kernel<scalar_t, VEC><<<blocks_for(packs), kThreads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(gp, op, dp, packs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void scale_bias_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const at::Tensor& residual, bool relu, const at::Tensor& out) {
    const auto v = channel_view(x, kernel_format(out));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_bias_act_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto* xp = x.const_data_ptr<scalar_t>();
      const auto* rp = ptr_or_null<scalar_t>(residual);
      auto* op = out.mutable_data_ptr<scalar_t>();
      const Tiling t = plan_for<scalar_t>(v, {xp, rp, op});
      with_width<scalar_t>(t.vec, [&](auto w) {
        scale_bias_act_kernel<scalar_t, decltype(w)::value>
            <<<grid_of(t), block_of(t), 0, c10::cuda::getCurrentCUDAStream()>>>(
                xp, rp, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), op, t, relu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& residual, double eps, bool relu, const at::Tensor& out,
                         const at::Tensor& mean, const at::Tensor& var) {
    const auto v = channel_view(x, kernel_format(out));
    const int64_t C = v.channels;
    auto coef = at::empty({2, C}, mean.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto* xp = x.const_data_ptr<scalar_t>();
      const StatsTerms<scalar_t> terms{xp, v.channels_last ? 1 : v.inner};
      const auto partial = channel_sums<scalar_t>(plan_for<scalar_t>(v, {xp}), terms, mean.options());
      bn_stats_finalize_kernel<scalar_t><<<tiling::ceil_div(C, kThreads), kThreads, 0,
                                           c10::cuda::getCurrentCUDAStream()>>>(
          terms, partial.const_data_ptr<acc_t>(), partial.size(0), C,
          static_cast<double>(v.outer * v.inner), ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias), eps,
          mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    scale_bias_act(x, coef[0], coef[1], residual, relu, out);
  }

  static void bn_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                          const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                          double eps, bool relu, const at::Tensor& grad_x,
                          const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                          const at::Tensor& grad_residual) {
    const auto v = channel_view(x, kernel_format(grad_x));
    const int64_t C = v.channels;
    auto coef = at::empty({3, C}, mean.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto stream = c10::cuda::getCurrentCUDAStream();
      const auto* gp = grad_out.const_data_ptr<scalar_t>();
      const auto* op = out.const_data_ptr<scalar_t>();
      const auto* xp = x.const_data_ptr<scalar_t>();
      const auto* mp = mean.const_data_ptr<acc_t>();
      const auto partial = channel_sums<scalar_t>(plan_for<scalar_t>(v, {gp, op, xp}),
                                                  GradTerms<scalar_t>{gp, op, xp, mp, relu}, mean.options());
      bn_grad_finalize_kernel<acc_t><<<tiling::ceil_div(C, kThreads), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), partial.size(0), C, static_cast<double>(v.outer * v.inner),
          ptr_or_null<acc_t>(weight), var.const_data_ptr<acc_t>(), eps, grad_weight.mutable_data_ptr<acc_t>(),
          grad_bias.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      auto* gxp = grad_x.mutable_data_ptr<scalar_t>();
      auto* grp = grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
      const Tiling t = plan_for<scalar_t>(v, {gp, op, xp, gxp, grp});
      with_width<scalar_t>(t.vec, [&](auto w) {
        bn_backward_elementwise_kernel<scalar_t, decltype(w)::value><<<grid_of(t), block_of(t), 0, stream>>>(
            gp, op, xp, mp, coef.const_data_ptr<acc_t>(), gxp, grp, t, relu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const at::Tensor& mean, const at::Tensor& var, double momentum,
                                   int64_t count) {
    const int64_t C = running_mean.numel();
    const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "bn_update_stats_cuda", [&] {
      using run_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_update_stats_cuda_acc", [&] {
        update_stats_kernel<run_t, scalar_t><<<tiling::ceil_div(C, kThreads), kThreads, 0,
                                               c10::cuda::getCurrentCUDAStream()>>>(
            running_mean.mutable_data_ptr<run_t>(), running_var.mutable_data_ptr<run_t>(),
            mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), C, momentum, unbias);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) { impl::register_impls<CudaKernels>(m); }

}  // namespace resnet_fast
