// The ResNet stem's max-pool (3x3, stride 2, padding 1) on channels_last fp32/fp64/uint8 CPU tensors, for
// inference: one pass vectorized over channels, and no index output (aten's channels_last kernel writes
// an int64 index per output element, more bytes than the output itself). Not for bf16/fp16: at::vec's
// maximum converts them to fp32 per load, which measured slower than aten's kernel for them. uint8: the int8
// path's quantized activations (aten's max_pool2d fails on uint8 channels_last in torch 2.14).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace resnet_fast {
namespace {

template <typename scalar_t>
void max_pool_rows(const scalar_t* x, scalar_t* out, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                   int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const scalar_t lowest = std::numeric_limits<scalar_t>::has_infinity ? -std::numeric_limits<scalar_t>::infinity()
                                                                      : std::numeric_limits<scalar_t>::lowest();
  for (int64_t row = begin; row < end; ++row) {  // row = (n, oh)
    const int64_t n = row / Ho, oh = row % Ho;
    const int64_t h0 = std::max<int64_t>(2 * oh - 1, 0), h1 = std::min<int64_t>(2 * oh + 2, H);
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int64_t w0 = std::max<int64_t>(2 * ow - 1, 0), w1 = std::min<int64_t>(2 * ow + 2, W);
      scalar_t* o = out + (row * Wo + ow) * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        Vec m(lowest);
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            m = at::vec::maximum(m, Vec::loadu(x + ((n * H + h) * W + w) * C + c));  // NaN propagates
          }
        }
        m.store(o + c);
      }
      for (; c < C; ++c) {
        scalar_t m = lowest;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const scalar_t v = x[((n * H + h) * W + w) * C + c];
            if (v > m || v != v) m = v;  // v != v: NaN
          }
        }
        o[c] = m;
      }
    }
  }
}

at::Tensor max_pool_3x3s2(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resnet_fast::max_pool_3x3s2: expected a 4-D channels_last tensor, got sizes ", x.sizes(),
              " and strides ", x.strides());
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "resnet_fast::max_pool_3x3s2: empty spatial size ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  auto out = at::empty({N, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kByte, x.scalar_type(), "max_pool_3x3s2_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // grain: enough output rows per task to amortize the task (~a row is Wo * C elements)
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, Wo * C * 9));
    at::parallel_for(0, N * Ho, grain, [&](int64_t begin, int64_t end) {
      max_pool_rows(xp, op, C, H, W, Ho, Wo, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) { m.impl("max_pool_3x3s2", &max_pool_3x3s2); }

}  // namespace resnet_fast
