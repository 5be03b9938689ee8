"""TMA (tensor-descriptor) variants of the fused conv, sm_90 tuner candidates beside the cp.async kernel.

  conv_tma_gemm      1x1 / stride 1 / pad 0 on dense NHWC: x is an [M, Cin] matrix, weight [Cout, Cin],
                     out and residual [M, Cout]; every tile moves by TMA, the epilogue stores by TMA.
  conv_tma_implicit  any KHxKW at stride 1: the output tile is a 4-D box (images, rows, columns, Cout)
                     and, per tap, the input tile is the same box over (N, H, W, Cin) shifted by
                     (kh * dil - pad, kw * dil - pad). TMA fills out-of-bounds elements with zeros,
                     which is the padding, and clips out-of-bounds stores, so no index needs div/mod.

Host-side descriptors (triton.tools.tensor_descriptor.TensorDescriptor, triton >= 3.6): no global scratch
allocator is involved. They need 16-byte aligned bases and row strides (the launcher's key says when),
and run under the interpreter too, so CI checks them on CPU. They are only ever candidates: the tuner
validates each against the references before any user output comes from it. The candidate lists
(which tiles are tried where) are conv.py's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import _mma

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older triton: no TMA candidates
    TensorDescriptor = None

AVAILABLE = TensorDescriptor is not None and hasattr(tl, "make_tensor_descriptor")
GEMM, IMPLICIT = "conv_tma_gemm", "conv_tma_implicit"


# --- kernels ------------------------------------------------------------------------

@triton.jit
def _tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`, GROUP_M row tiles at a time (weight tiles stay in L2)."""
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_size, (pid % group) // group_size


@triton.jit
def _epilogue(acc, b_ptr, stride_b, n0, C_OUT, residual, HAS_RES: tl.constexpr, RELU: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """bias (+ residual) (+ ReLU) in fp32."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    acc += tl.load(b_ptr + offs_n * stride_b, mask=offs_n < C_OUT, other=0.0)[None, :]
    if HAS_RES:
        acc += residual.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    return acc


@triton.jit
def _conv_tma_gemm_kernel(
    x_desc, w_desc, b_ptr, r_desc, out_desc, M, C_IN, C_OUT, stride_b,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C_OUT, BLOCK_N), GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C_IN, BLOCK_K):
        a = x_desc.load([m0, k0])
        b = w_desc.load([n0, k0])
        acc = _mma(a, b.T, acc, DOT_PRECISION, UPCAST_DOT)
    residual = r_desc.load([m0, n0]) if HAS_RES else None
    acc = _epilogue(acc, b_ptr, stride_b, n0, C_OUT, residual, HAS_RES, RELU, BLOCK_N)
    out_desc.store([m0, n0], acc.to(out_desc.dtype))


@triton.jit
def _conv_tma_implicit_kernel(
    x_desc, w_desc, b_ptr, r_desc, out_desc, C_IN, C_OUT, stride_b,
    TILES_H, TILES_W, TILES_M, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BOX_I: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BOX_I * BOX_H * BOX_W
    pid_m, pid_n = _tile(tl.program_id(0), TILES_M, tl.cdiv(C_OUT, BLOCK_N), GROUP_M)
    # The output box (n0.., ho0.., wo0..) of this row tile: scalar index math only.
    n0 = (pid_m // (TILES_H * TILES_W)) * BOX_I
    ho0 = ((pid_m // TILES_W) % TILES_H) * BOX_H
    wo0 = (pid_m % TILES_W) * BOX_W
    co0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(C_IN, BLOCK_K)
    for it in range(0, KH * KW * c_blocks):
        tap = it // c_blocks
        c0 = (it - tap * c_blocks) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        # Stride 1: input pixel = output pixel + tap offset; outside the image TMA reads zeros.
        a = x_desc.load([n0, ho0 + kh * DIL_H - PAD_H, wo0 + kw * DIL_W - PAD_W, c0])
        b = w_desc.load([co0, tap, c0])
        acc = _mma(a.reshape(BLOCK_M, BLOCK_K), b.reshape(BLOCK_N, BLOCK_K).T, acc, DOT_PRECISION, UPCAST_DOT)
    residual = r_desc.load([n0, ho0, wo0, co0]).reshape(BLOCK_M, BLOCK_N) if HAS_RES else None
    acc = _epilogue(acc, b_ptr, stride_b, co0, C_OUT, residual, HAS_RES, RELU, BLOCK_N)
    out_desc.store([n0, ho0, wo0, co0], acc.to(out_desc.dtype).reshape(BOX_I, BOX_H, BOX_W, BLOCK_N))


# --- launch arguments ----------------------------------------------------------------------

def _pow2_upto(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def box(block_m: int, n: int, ho: int, wo: int) -> tuple[int, int, int]:
    """(images, rows, columns) of a BLOCK_M-pixel output box: powers of two (TMA boxes), at most 256 each,
    with the least padded work over the whole output (ties: wider rows, for longer TMA bursts)."""
    best = None
    for bw in _pow2_upto(min(block_m, 256)):
        for bh in _pow2_upto(min(block_m // bw, 256)):
            bi = block_m // (bw * bh)
            if bi > 256:
                continue
            work = triton.cdiv(n, bi) * bi * triton.cdiv(ho, bh) * bh * triton.cdiv(wo, bw) * bw
            rank = (work, -bw, -bh)
            if best is None or rank < best[0]:
                best = (rank, (bi, bh, bw))
    return best[1]


def _nhwc(t, n, h, w, c, block):
    """A 4-D descriptor over a dense channels_last [N, C, H, W] tensor, in memory order (N, H, W, C).
    The strides are the dense ones, not t.stride(): a size-1 dim may carry any stride, TMA wants 16-byte ones."""
    return TensorDescriptor(t, [n, h, w, c], [h * w * c, w * c, c, 1], block)


def call(candidate, x, weight, bias, residual, out, ho, wo, padding, dilation, relu, precision, upcast):
    """(kernel, grid, args, kwargs) launching `candidate` on these tensors (already checked eligible:
    dense channels_last, 16-byte aligned)."""
    n, cin = x.shape[:2]
    cout, _, kh, kw = weight.shape
    p = candidate.kwargs
    bn, bk = p["BLOCK_N"], p["BLOCK_K"]
    flags = dict(HAS_RES=residual is not None, RELU=bool(relu), DOT_PRECISION=precision, UPCAST_DOT=upcast,
                 BLOCK_N=bn, BLOCK_K=bk, GROUP_M=p["GROUP_M"], num_warps=candidate.num_warps,
                 num_stages=candidate.num_stages)
    if candidate.kernel == GEMM:
        m, bm = n * ho * wo, p["BLOCK_M"]
        out_d = TensorDescriptor(out, [m, cout], [cout, 1], [bm, bn])
        res_d = TensorDescriptor(residual, [m, cout], [cout, 1], [bm, bn]) if residual is not None else out_d
        args = (TensorDescriptor(x, [m, cin], [cin, 1], [bm, bk]),
                TensorDescriptor(weight, [cout, cin], [cin, 1], [bn, bk]),
                bias, res_d, out_d, m, cin, cout, bias.stride(0))
        grid = (triton.cdiv(m, bm) * triton.cdiv(cout, bn),)
        return _conv_tma_gemm_kernel, grid, args, dict(flags, BLOCK_M=bm)
    bi, bh, bw = box(p["BLOCK_M"], n, ho, wo)
    tiles_h, tiles_w = triton.cdiv(ho, bh), triton.cdiv(wo, bw)
    tiles_m = triton.cdiv(n, bi) * tiles_h * tiles_w
    out_d = _nhwc(out, n, ho, wo, cout, [bi, bh, bw, bn])
    res_d = _nhwc(residual, n, ho, wo, cout, [bi, bh, bw, bn]) if residual is not None else out_d
    args = (_nhwc(x, n, x.shape[2], x.shape[3], cin, [bi, bh, bw, bk]),
            TensorDescriptor(weight, [cout, kh * kw, cin], [kh * kw * cin, cin, 1], [bn, 1, bk]),
            bias, res_d, out_d, cin, cout, bias.stride(0),
            tiles_h, tiles_w, tiles_m, padding[0], padding[1], dilation[0], dilation[1])
    grid = (tiles_m * triton.cdiv(cout, bn),)
    return _conv_tma_implicit_kernel, grid, args, dict(flags, KH=kh, KW=kw, BOX_I=bi, BOX_H=bh, BOX_W=bw)
