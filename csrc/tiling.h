// How the CUDA BatchNorm kernels (cuda/ops.cu) walk x, shared with the CPU
// library so that tests can check the index math without a GPU
// (torch.ops.resnet_fast._bn_tiling runs plan() and check() on the host).
//
// x is seen as [rows, row_len] with row_len = C * inner: NCHW rows are images
// (inner = H*W), channels_last rows are pixels (inner = 1). The grid is
// (tiles, row_blocks) of (bx, by) = 256 threads. A tile is a range of columns:
//   group mode: `group` whole channels (group * inner <= bx * vec columns), so
//               small NCHW planes (7x7, 14x14) are packed side by side;
//   piece mode: 1/pieces of one channel's plane, when a plane is wider than a tile.
// A thread owns the `vec` consecutive columns [col, col + vec) of every row it
// visits, so its elements' channels never change: they (and per-channel
// parameters) are computed once, before the loop over rows, which only adds
// offsets: no division in the loop. Vector accesses (vec > 1) need 16-byte
// aligned pointers, row_len % vec == 0 and tiles starting at multiples of vec;
// plan() falls back to vec = 1 otherwise.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define RF_HD __host__ __device__ __forceinline__
#else
#define RF_HD inline
#endif

namespace resnet_fast::tiling {

constexpr int kThreads = 256;
constexpr int kMaxTileCols = 2048;  // 256 threads x 8 columns
constexpr int64_t kMaxSplits = 1024;  // partial sums per channel, added in fp64 by the finalize kernels
constexpr int kRowsPerThread = 4;     // rows a thread should get at least (its loads in flight)

struct Tiling {
  int64_t rows, row_len, inner;
  int32_t channels;
  int32_t vec;         // elements per access; the kernel's VEC
  int32_t bx, by;      // block shape, bx * by = kThreads
  int32_t group;       // channels per tile in group mode, 0 in piece mode
  int32_t pieces;      // tiles per channel in piece mode, 1 in group mode
  int32_t tiles;       // gridDim.x
  int32_t row_blocks;  // gridDim.y
};

// The columns thread `tx` of `tile` owns; false when it owns none. chan[k] is
// the channel of column col + k.
template <int VEC>
RF_HD bool thread_columns(const Tiling& t, int32_t tile, int32_t tx, int64_t& col, int32_t (&chan)[VEC]) {
  if (t.group > 0) {
    const int32_t c0 = tile * t.group;
    const int32_t inner = static_cast<int32_t>(t.inner);  // group mode: inner <= kMaxTileCols
    const int32_t width = (t.channels - c0 < t.group ? t.channels - c0 : t.group) * inner;
    const int32_t l = tx * VEC;
    if (l >= width) return false;
    col = static_cast<int64_t>(c0) * t.inner + l;
    int32_t q = l / inner, r = l - q * inner;  // 32-bit, once per thread
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      chan[k] = c0 + q;
      if (++r == inner) {
        r = 0;
        ++q;
      }
    }
    return true;
  }
  const int32_t c = tile / t.pieces, piece = tile - c * t.pieces;
  const int64_t l = (static_cast<int64_t>(piece) * t.bx + tx) * VEC;
  if (l >= t.inner) return false;
  col = static_cast<int64_t>(c) * t.inner + l;
#pragma unroll
  for (int k = 0; k < VEC; ++k) chan[k] = c;
  return true;
}

// A tile's columns split by channel, for the reductions' epilogue: segment s
// is the tile's local columns [s * seg_len, min((s + 1) * seg_len, width)) and
// belongs to channel first + s; its partial sum goes to split
// row_block * pieces + piece.
struct Segments {
  int32_t first, count, seg_len, width, piece;
};

RF_HD Segments tile_segments(const Tiling& t, int32_t tile) {
  if (t.group > 0) {
    const int32_t c0 = tile * t.group;
    const int32_t n = t.channels - c0 < t.group ? t.channels - c0 : t.group;
    const int32_t inner = static_cast<int32_t>(t.inner);
    return {c0, n, inner, n * inner, 0};
  }
  const int32_t c = tile / t.pieces, piece = tile - c * t.pieces;
  const int64_t span = static_cast<int64_t>(t.bx) * t.vec;
  const int64_t left = t.inner - piece * span;
  const int32_t width = static_cast<int32_t>(left < span ? left : span);
  return {c, 1, width, width, piece};
}

// Rows of thread ty in row block rb: first, first + stride, ...
RF_HD int64_t first_row(const Tiling& t, int32_t rb, int32_t ty) {
  return static_cast<int64_t>(rb) * t.by + ty;
}
RF_HD int64_t row_stride(const Tiling& t) { return static_cast<int64_t>(t.row_blocks) * t.by; }

// ---- host: choosing a tiling, and checking one ------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tiling for vector width `vec`, or false if that width cannot tile this
// view. Among tiles whose share of working threads (columns and rows) is within
// 10% of the best: the narrowest that still leaves kRowsPerThread rows to each
// thread (else the one leaving the most). Narrow tiles mean more tiles, hence
// fewer row blocks for the same grid and fewer partial sums (row_blocks *
// pieces * C) for the reductions to write and the finalize kernels to read.
// Tiles narrower than a row keep at least 128 contiguous bytes per row (whole
// 32-byte sectors for every warp access).
inline bool try_plan(int64_t rows, int64_t C, int64_t inner, int vec, int elem_size,
                     int64_t target_blocks, Tiling& out) {
  const int64_t row_len = C * inner;
  if (vec > 1 && row_len % vec != 0) return false;
  const int64_t bx_min = std::max<int64_t>(1, 128 / (int64_t(vec) * elem_size));
  const int64_t m = vec / std::gcd<int64_t>(inner, vec);  // group * inner % vec == 0 iff m | group
  Tiling candidates[9];
  double used[9] = {};
  double best = 0;
  for (int i = 0; i < 9; ++i) {
    const int64_t bx = int64_t(1) << i, span = bx * vec;
    Tiling& t = candidates[i];
    t = {rows, row_len, inner, static_cast<int32_t>(C), vec, static_cast<int32_t>(bx),
         static_cast<int32_t>(kThreads / bx), 0, 1, 0, 0};
    if (inner * m <= span) {
      const int64_t group = std::min(C, span / inner / m * m);
      const int64_t tiles = ceil_div(C, group);
      if (tiles > 1 && bx < bx_min) continue;
      t.group = static_cast<int32_t>(group);
      t.tiles = static_cast<int32_t>(tiles);
      used[i] = double(row_len) / double(tiles * span);
    } else if (vec == 1 || inner % vec == 0) {
      const int64_t pieces = ceil_div(inner, span);
      if (bx < bx_min || (pieces > kMaxSplits && bx < kThreads) || C * pieces > INT32_MAX) continue;
      t.pieces = static_cast<int32_t>(pieces);
      t.tiles = static_cast<int32_t>(C * pieces);
      used[i] = double(inner) / double(pieces * span);
    }
    used[i] *= std::min(1.0, double(rows) / double(t.by));  // threadIdx.y past the last row idles
    best = std::max(best, used[i]);
  }
  if (best == 0) return false;
  int pick = -1;
  for (int i = 0; i < 9; ++i) {
    if (used[i] < 0.9 * best) continue;
    pick = i;  // ends at the widest (fewest rows per block) if none leaves enough rows
    if (rows >= int64_t(candidates[i].by) * kRowsPerThread) break;
  }
  out = candidates[pick];
  int64_t row_blocks = std::min(ceil_div(target_blocks, out.tiles), ceil_div(rows, out.by * kRowsPerThread));
  row_blocks = std::min(row_blocks, std::max<int64_t>(1, kMaxSplits / out.pieces));
  out.row_blocks = static_cast<int32_t>(std::clamp<int64_t>(row_blocks, 1, 65535));
  return true;
}

// max_vec: 16 / elem_size when every pointer involved is 16-byte aligned, else 1.
// Aims at kBlocksPerSM blocks per SM: 256-thread blocks are resident several at
// a time, and the row loop strides over whatever rows a block is left with.
constexpr int64_t kBlocksPerSM = 8;
inline Tiling plan(int64_t rows, int64_t C, int64_t inner, int max_vec, int elem_size, int64_t sms) {
  Tiling t{};
  if (max_vec > 1 && try_plan(rows, C, inner, max_vec, elem_size, kBlocksPerSM * sms, t)) return t;
  try_plan(rows, C, inner, 1, elem_size, kBlocksPerSM * sms, t);  // vec 1 always tiles
  return t;
}

inline std::string describe(const Tiling& t) {
  return "vec=" + std::to_string(t.vec) + " block=" + std::to_string(t.bx) + "x" + std::to_string(t.by) +
         (t.group ? " group=" + std::to_string(t.group) : " pieces=" + std::to_string(t.pieces)) +
         " grid=" + std::to_string(t.tiles) + "x" + std::to_string(t.row_blocks);
}

// Walks every block and thread of `t` through the functions the kernels use and
// checks: each element is visited exactly once, with its own channel; each
// (split, channel) partial is written by exactly one segment, whose columns are
// exactly that channel's columns in the tile. Returns "" or the first problem.
template <int VEC>
std::string check_with(const Tiling& t) {
  if (t.vec != VEC || t.bx * t.by != kThreads || (t.by & (t.by - 1)) != 0) return "bad block shape or width";
  if (t.row_len % VEC != 0) return "rows not a multiple of the width";
  std::vector<uint8_t> col_hits(t.row_len, 0);
  std::vector<int64_t> owner_chan(t.row_len, -1);
  std::vector<int32_t> split_hits(static_cast<size_t>(t.row_blocks) * t.pieces * t.channels, 0);
  for (int32_t tile = 0; tile < t.tiles; ++tile) {
    int64_t active_cols = 0, tile_col0 = -1;
    for (int32_t tx = 0; tx < t.bx; ++tx) {
      int64_t col = 0;
      int32_t chan[VEC];
      if (!thread_columns<VEC>(t, tile, tx, col, chan)) continue;
      if (col % VEC != 0) return "column " + std::to_string(col) + " is not vector-aligned";
      if (tile_col0 < 0) tile_col0 = col - int64_t(tx) * VEC;
      for (int k = 0; k < VEC; ++k) {
        if (col + k >= t.row_len) return "column past the row";
        if (chan[k] != (col + k) / t.inner) return "wrong channel for column " + std::to_string(col + k);
        if (col_hits[col + k]++) return "column " + std::to_string(col + k) + " visited twice";
        owner_chan[col + k] = chan[k];
      }
      active_cols += VEC;
    }
    const Segments s = tile_segments(t, tile);
    if (s.count * int64_t(s.seg_len) < s.width || s.width != active_cols) return "segments miss columns";
    for (int32_t j = 0; j < s.count; ++j) {
      const int32_t c = s.first + j;
      for (int64_t lc = int64_t(j) * s.seg_len; lc < std::min<int64_t>(int64_t(j + 1) * s.seg_len, s.width); ++lc) {
        if (owner_chan[tile_col0 + lc] != c) return "segment column in another channel";
      }
      for (int32_t rb = 0; rb < t.row_blocks; ++rb) {
        if (split_hits[(static_cast<size_t>(rb) * t.pieces + s.piece) * t.channels + c]++) return "partial written twice";
      }
    }
  }
  for (int64_t col = 0; col < t.row_len; ++col) {
    if (col_hits[col] != 1) return "column " + std::to_string(col) + " not visited";
  }
  for (int32_t hits : split_hits) {
    if (hits != 1) return "a partial sum is never written";
  }
  std::vector<uint8_t> row_hits(t.rows, 0);
  for (int32_t rb = 0; rb < t.row_blocks; ++rb) {
    for (int32_t ty = 0; ty < t.by; ++ty) {
      for (int64_t r = first_row(t, rb, ty); r < t.rows; r += row_stride(t)) {
        if (row_hits[r]++) return "row visited twice";
      }
    }
  }
  for (uint8_t hits : row_hits) {
    if (hits != 1) return "a row is never visited";
  }
  return "";
}

inline std::string check(const Tiling& t) {
  switch (t.vec) {
    case 1: return check_with<1>(t);
    case 2: return check_with<2>(t);
    case 4: return check_with<4>(t);
    case 8: return check_with<8>(t);
    default: return "unsupported width";
  }
}

}  // namespace resnet_fast::tiling
