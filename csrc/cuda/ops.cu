// CUDA kernels for the resnet_fast ops and their registration for the CUDA
// dispatch key. Semantics (checks, formats, outputs) live in ops_impl.h; this
// file only supplies CudaKernels. Every launch goes to the current stream of
// x's device (ops_impl.h holds a CUDAGuard). Elementwise kernels move 16 bytes
// per access when pointers are aligned and the channel structure allows it.
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

namespace resnet_fast {
namespace {

constexpr int kThreads = 256;

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

// Channel of element i in the two kernel layouts.
template <bool CL>
__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t inner) {
  return CL ? i % C : (i / inner) % C;
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

// out = act(x * scale[c] + shift[c] (+ residual)); the normalize pass of bn_forward too.
template <typename scalar_t, int VEC, bool CL>
__global__ void scale_bias_act_kernel(const scalar_t* x, const scalar_t* r,
                                      const at::opmath_type<scalar_t>* __restrict__ scale,
                                      const at::opmath_type<scalar_t>* __restrict__ shift,
                                      scalar_t* out, int64_t packs, int64_t C, int64_t inner,
                                      bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t p = global_thread(); p < packs; p += grid_threads()) {
    const int64_t c0 = channel_of<CL>(p * VEC, C, inner);
    const auto xv = load_pack<VEC>(x + p * VEC);
    Pack<scalar_t, VEC> rv;
    if (r != nullptr) rv = load_pack<VEC>(r + p * VEC);
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = CL ? c0 + k : c0;
      acc_t y = static_cast<acc_t>(xv.v[k]) * scale[c] + shift[c];
      if (r != nullptr) y += static_cast<acc_t>(rv.v[k]);
      o.v[k] = static_cast<scalar_t>(relu ? relu_f(y) : y);
    }
    store_pack<VEC>(out + p * VEC, o);
  }
}

// grad_x = a[c] * dz + b[c] * (x - mean[c]) + d[c], grad_residual = dz, where
// dz = grad_out masked by out > 0 when the op had a ReLU. coef = [a; b; d].
template <typename scalar_t, int VEC, bool CL>
__global__ void bn_backward_elementwise_kernel(
    const scalar_t* grad_out, const scalar_t* out, const scalar_t* x,
    const at::opmath_type<scalar_t>* __restrict__ mean,
    const at::opmath_type<scalar_t>* __restrict__ coef, scalar_t* grad_x, scalar_t* grad_r,
    int64_t packs, int64_t C, int64_t inner, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t p = global_thread(); p < packs; p += grid_threads()) {
    const int64_t c0 = channel_of<CL>(p * VEC, C, inner);
    const auto gv = load_pack<VEC>(grad_out + p * VEC);
    const auto xv = load_pack<VEC>(x + p * VEC);
    Pack<scalar_t, VEC> ov;
    if (relu) ov = load_pack<VEC>(out + p * VEC);
    Pack<scalar_t, VEC> gx, gr;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = CL ? c0 + k : c0;
      acc_t dz = static_cast<acc_t>(gv.v[k]);
      if (relu) dz = mask_f(dz, static_cast<acc_t>(ov.v[k]));
      const acc_t xm = static_cast<acc_t>(xv.v[k]) - mean[c];
      gx.v[k] = static_cast<scalar_t>(coef[c] * dz + coef[C + c] * xm + coef[2 * C + c]);
      gr.v[k] = static_cast<scalar_t>(dz);
    }
    store_pack<VEC>(grad_x + p * VEC, gx);
    if (grad_r != nullptr) store_pack<VEC>(grad_r + p * VEC, gr);
  }
}

// ---- per-channel reductions -------------------------------------------------
// Each Terms type maps the VEC elements at index i (and their channels'
// centers) to (q1, q2); the kernels below sum both per channel into partials
// [splits, C, 2], and a finalize kernel adds the splits in fp64.

// Batch statistics: q1 = x - K, q2 = (x - K)^2, K = the channel's first value
// (a shift that keeps the one-pass variance well conditioned).
template <typename scalar_t>
struct StatsTerms {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  int64_t first_stride;  // channel c starts at x[c * first_stride]
  __device__ acc_t center(int64_t c) const { return static_cast<acc_t>(x[c * first_stride]); }
  template <int VEC>
  __device__ void terms(int64_t i, const acc_t (&ctr)[VEC], acc_t (&q1)[VEC],
                        acc_t (&q2)[VEC]) const {
    const auto v = load_pack<VEC>(x + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      q1[k] = static_cast<acc_t>(v.v[k]) - ctr[k];
      q2[k] = q1[k] * q1[k];
    }
  }
};

// Backward: q1 = dz, q2 = dz * (x - mean).
template <typename scalar_t>
struct GradTerms {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* out;
  const scalar_t* x;
  const acc_t* mean;
  bool relu;
  __device__ acc_t center(int64_t c) const { return mean[c]; }
  template <int VEC>
  __device__ void terms(int64_t i, const acc_t (&ctr)[VEC], acc_t (&q1)[VEC],
                        acc_t (&q2)[VEC]) const {
    const auto g = load_pack<VEC>(grad_out + i);
    const auto xv = load_pack<VEC>(x + i);
    Pack<scalar_t, VEC> o;
    if (relu) o = load_pack<VEC>(out + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t dz = static_cast<acc_t>(g.v[k]);
      if (relu) dz = mask_f(dz, static_cast<acc_t>(o.v[k]));
      q1[k] = dz;
      q2[k] = dz * (static_cast<acc_t>(xv.v[k]) - ctr[k]);
    }
  }
};

// Sum of a and b over a 1-D block (blockDim.x a multiple of 32); thread 0 holds the result.
template <typename T>
__device__ void block_sum2(T& a, T& b) {
  __shared__ T sa[32], sb[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    a = lane < warps ? sa[lane] : T(0);
    b = lane < warps ? sb[lane] : T(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

// NCHW: block (blockIdx.x = channel, blockIdx.y = split) walks chunks of the
// channel's N planes; consecutive threads read consecutive packs of a plane.
template <int VEC, class Terms>
__global__ void channel_sums_nchw_kernel(Terms t, int64_t N, int64_t C, int64_t inner,
                                         typename Terms::acc_t* partial) {
  using acc_t = typename Terms::acc_t;
  const int64_t c = blockIdx.x;
  const int64_t span = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t chunks = (inner + span - 1) / span;
  acc_t ctr[VEC];
  const acc_t k0 = t.center(c);
#pragma unroll
  for (int k = 0; k < VEC; ++k) ctr[k] = k0;
  acc_t s1 = 0, s2 = 0;
  for (int64_t u = blockIdx.y; u < N * chunks; u += gridDim.y) {
    const int64_t n = u / chunks;
    const int64_t j = (u - n * chunks) * span + static_cast<int64_t>(threadIdx.x) * VEC;
    if (j < inner) {
      acc_t q1[VEC], q2[VEC];
      t.template terms<VEC>((n * C + c) * inner + j, ctr, q1, q2);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s1 += q1[k];
        s2 += q2[k];
      }
    }
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    partial[(static_cast<int64_t>(blockIdx.y) * C + c) * 2] = s1;
    partial[(static_cast<int64_t>(blockIdx.y) * C + c) * 2 + 1] = s2;
  }
}

// channels_last: threadIdx.x owns VEC consecutive channels, threadIdx.y (and
// blockIdx.y) stride over rows; the blockDim.y partials are tree-summed in
// shared memory. blockDim.y must be a power of two.
template <int VEC, class Terms>
__global__ void channel_sums_cl_kernel(Terms t, int64_t rows, int64_t C,
                                       typename Terms::acc_t* partial) {
  using acc_t = typename Terms::acc_t;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][blockDim.x * VEC][2]
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;
  acc_t ctr[VEC], s1[VEC], s2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    s1[k] = 0;
    s2[k] = 0;
    ctr[k] = active ? t.center(c0 + k) : acc_t(0);
  }
  if (active) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
         r += stride) {
      acc_t q1[VEC], q2[VEC];
      t.template terms<VEC>(r * C + c0, ctr, q1, q2);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s1[k] += q1[k];
        s2[k] += q2[k];
      }
    }
  }
  const int width = blockDim.x * VEC;
  acc_t* mine = smem + (threadIdx.y * width + threadIdx.x * VEC) * 2;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    mine[2 * k] = s1[k];
    mine[2 * k + 1] = s2[k];
  }
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
#pragma unroll
      for (int k = 0; k < 2 * VEC; ++k) mine[k] += mine[half * width * 2 + k];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      partial[(static_cast<int64_t>(blockIdx.y) * C + c0 + k) * 2] = mine[2 * k];
      partial[(static_cast<int64_t>(blockIdx.y) * C + c0 + k) * 2 + 1] = mine[2 * k + 1];
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16-byte packs when every pointer is 16-byte aligned and `unit` (elements that
// share a channel run) divides evenly; otherwise scalar accesses.
template <typename scalar_t>
int pack_width(std::initializer_list<const void*> ptrs, int64_t unit) {
  constexpr int kMax = 16 / sizeof(scalar_t);
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return 1;
  }
  return unit % kMax == 0 ? kMax : 1;
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

template <class F>
void with_layout(bool channels_last, const F& f) {
  if (channels_last) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Launches the per-channel sums of `t` over the view; returns (partials, splits).
template <typename scalar_t, class Terms>
std::pair<at::Tensor, int64_t> channel_sums(const ChannelView& v, const Terms& t, int width,
                                            const at::TensorOptions& acc_opts) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t target_blocks = 4 * sm_count();
  const int64_t C = v.channels;
  at::Tensor partial;
  int64_t splits = 1;
  with_width<scalar_t>(width, [&](auto w) {
    constexpr int VEC = decltype(w)::value;
    if (!v.channels_last) {
      const int64_t units = v.outer * ceil_div(v.inner, int64_t(kThreads) * VEC);
      splits = std::clamp<int64_t>(ceil_div(target_blocks, C), 1, std::min<int64_t>(units, 1024));
      partial = at::empty({splits, C, 2}, acc_opts);
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(splits));
      channel_sums_nchw_kernel<VEC><<<grid, kThreads, 0, stream>>>(
          t, v.outer, C, v.inner, partial.mutable_data_ptr<acc_t>());
    } else {
      int bx = 1;
      while (bx < 32 && bx * VEC < C) bx *= 2;
      const int by = kThreads / bx;
      const int64_t gx = ceil_div(C, int64_t(bx) * VEC);
      splits = std::clamp<int64_t>(ceil_div(target_blocks, gx), 1,
                                   std::min<int64_t>(ceil_div(v.outer, by), 1024));
      partial = at::empty({splits, C, 2}, acc_opts);
      const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(splits));
      const dim3 block(bx, by);
      const size_t smem = sizeof(acc_t) * 2 * VEC * kThreads;
      channel_sums_cl_kernel<VEC><<<grid, block, smem, stream>>>(
          t, v.outer, C, partial.mutable_data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {partial, splits};
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
    const int64_t unit = v.channels_last ? v.channels : v.inner;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_bias_act_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto* xp = x.const_data_ptr<scalar_t>();
      const auto* rp = ptr_or_null<scalar_t>(residual);
      auto* op = out.mutable_data_ptr<scalar_t>();
      with_width<scalar_t>(pack_width<scalar_t>({xp, rp, op}, unit), [&](auto w) {
        constexpr int VEC = decltype(w)::value;
        const int64_t packs = x.numel() / VEC;
        with_layout(v.channels_last, [&](auto cl) {
          scale_bias_act_kernel<scalar_t, VEC, decltype(cl)::value>
              <<<blocks_for(packs), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  xp, rp, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), op, packs,
                  v.channels, v.inner, relu);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
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
      const StatsTerms<scalar_t> t{xp, v.channels_last ? 1 : v.inner};
      const int width = pack_width<scalar_t>({xp}, v.channels_last ? C : v.inner);
      auto [partial, splits] = channel_sums<scalar_t>(v, t, width, mean.options());
      bn_stats_finalize_kernel<scalar_t><<<ceil_div(C, kThreads), kThreads, 0,
                                           c10::cuda::getCurrentCUDAStream()>>>(
          t, partial.const_data_ptr<acc_t>(), splits, C, static_cast<double>(v.outer * v.inner),
          ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias), eps,
          mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
          coef.mutable_data_ptr<acc_t>());
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
    const int64_t unit = v.channels_last ? C : v.inner;
    auto coef = at::empty({3, C}, mean.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto stream = c10::cuda::getCurrentCUDAStream();
      const auto* gp = grad_out.const_data_ptr<scalar_t>();
      const auto* op = out.const_data_ptr<scalar_t>();
      const auto* xp = x.const_data_ptr<scalar_t>();
      const auto* mp = mean.const_data_ptr<acc_t>();
      const GradTerms<scalar_t> t{gp, op, xp, mp, relu};
      auto [partial, splits] =
          channel_sums<scalar_t>(v, t, pack_width<scalar_t>({gp, op, xp}, unit), mean.options());
      bn_grad_finalize_kernel<acc_t><<<ceil_div(C, kThreads), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), splits, C, static_cast<double>(v.outer * v.inner),
          ptr_or_null<acc_t>(weight), var.const_data_ptr<acc_t>(), eps,
          grad_weight.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(),
          coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      auto* gxp = grad_x.mutable_data_ptr<scalar_t>();
      auto* grp = grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
      with_width<scalar_t>(pack_width<scalar_t>({gp, op, xp, gxp, grp}, unit), [&](auto w) {
        constexpr int VEC = decltype(w)::value;
        const int64_t packs = x.numel() / VEC;
        with_layout(v.channels_last, [&](auto cl) {
          bn_backward_elementwise_kernel<scalar_t, VEC, decltype(cl)::value>
              <<<blocks_for(packs), kThreads, 0, stream>>>(gp, op, xp, mp,
                                                           coef.const_data_ptr<acc_t>(), gxp, grp,
                                                           packs, C, v.inner, relu);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
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
        update_stats_kernel<run_t, scalar_t><<<ceil_div(C, kThreads), kThreads, 0,
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
