"""Fused inference convolution in Triton: conv + bias (folded BN) [+ residual] [+ ReLU].

Implicit GEMM over NHWC activations: rows are output pixels (M = N*Ho*Wo),
columns are output channels (Cout), the reduction runs over (kh, kw, cin).
Three ways to run a call, picked per call (`_mode`; LAUNCHES counts
"conv_bias_act.<mode>", and "conv_bias_act.tma_gemm" / ".tma_implicit" for the
TMA variants in conv_tma.py):

  gemm      1x1 / stride 1 / pad 0 on a dense channels_last input: the input
            *is* an [M, Cin] matrix, so this is a plain GEMM.
  implicit  any kernel; the loop walks (tap, Cin-block) so each K step reads
            BLOCK_K contiguous channels of one input pixel.
  stem      Cin < 16 (the RGB stems): the input is packed into 16-channel
            pixels first (space-to-depth where the stride allows, see
            "the packed stem"), then the implicit mode runs on tensor cores.

The epilogue indexes a dense channels_last residual by the output's row
offsets (no div/mod); any other residual layout is read through its strides.

Tile sizes (and, on sm_90, the TMA variants) are the tuner's choice per shape
key (tuner.py): every candidate of CANDIDATES that _fits the key is validated
against PyTorch before it can run, and the torch path (cuDNN/oneDNN + the
fused epilogue) is a candidate too.

Precision: fp16/bf16 operands accumulate in fp32. fp32 operands use TF32
exactly when cuDNN would for a convolution (torch.backends.cudnn.conv
fp32_precision on torch >= 2.9, inheriting as torch does; else the legacy
torch.backends.cudnn.allow_tf32), and full IEEE fp32 otherwise. The epilogue
(bias, residual, ReLU) runs in fp32 and rounds once, to x's dtype.

Registered as the custom op resnet_fast::triton_conv_bias_act (fake impl
with channels_last strides, autograd via aten.convolution_backward), so it
works under torch.compile(fullgraph=True) and torch.library.opcheck.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from ... import fold
from .. import ext, reference
from ..dispatch import interpreter_enabled
from . import _common, conv_tma, tuner
from ._common import (DTYPE_KEYS, KEY_DTYPES, LAUNCHES, SHORT_NAMES, TORCH_PATH, _mma, check_dtype, device_guard,
                      fp32_allows_tf32, require_usable)
from .tuner import Candidate

_MODES = {"gemm": 0, "implicit": 1}  # the kernel's MODE; the stem runs the implicit mode
_CL = torch.channels_last


# --- tuning: shape keys and candidates ---------------------------------------

class ConvKey(NamedTuple):
    """What the tuner tunes for: a call's shape, dtype, epilogue, TF32 rule and layouts."""
    n: int
    cin: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int
    dtype: str  # "float16", "bfloat16", "float32"
    mode: str  # "gemm", "implicit", "stem": the call's load path (_mode)
    has_res: bool
    relu: bool
    precision: str  # tl.dot input precision: "tf32" or "ieee" (fp32 only)
    x_cl: bool  # x dense channels_last
    w_cl: bool  # weight dense channels_last
    r_cl: bool  # residual dense channels_last (True when there is none)
    tma: bool  # every tensor and row stride 16-byte aligned, all dense NHWC: TMA descriptors can cover them

    def out_hw(self) -> tuple[int, int]:
        return _out_hw(self.h, self.w, self.kh, self.kw, (self.stride_h, self.stride_w), (self.pad_h, self.pad_w),
                       (self.dil_h, self.dil_w))


def _tiles(kernel, bm, bn, bk, group_m, warps, stages):
    return Candidate.make(kernel, warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages).
# Hopper (sm90: H100/H200): 8-warp big tiles for wgmma and 227 KB of shared memory.
_HOPPER = [
    _tiles("conv", 128, 256, 64, 8, 8, 3),
    _tiles("conv", 256, 128, 64, 8, 8, 3),
    _tiles("conv", 128, 128, 64, 8, 8, 4),
    _tiles("conv", 256, 64, 64, 8, 8, 4),  # the Cout=64 layers
    _tiles("conv", 256, 64, 16, 8, 8, 4),  # the packed stems
]
# Ampere (sm80/86) and the smaller problems everywhere: 4-warp mma tiles.
_AMPERE = [
    _tiles("conv", 128, 128, 32, 8, 4, 4),
    _tiles("conv", 128, 64, 32, 8, 4, 4),
    _tiles("conv", 64, 128, 32, 8, 4, 4),
    _tiles("conv", 64, 64, 64, 8, 4, 4),
    _tiles("conv", 32, 64, 32, 8, 4, 4),  # tiny M: late layers at batch 1
    _tiles("conv", 128, 64, 16, 8, 4, 4),  # the packed stems: 16 channels per pixel
]
# TMA variants (conv_tma.py): sm_90 only, beside the cp.async ones; 4- and 8-warp.
_HOPPER_TMA = [
    _tiles(conv_tma.GEMM, 128, 256, 64, 8, 8, 3),
    _tiles(conv_tma.GEMM, 128, 128, 64, 8, 8, 4),
    _tiles(conv_tma.GEMM, 128, 128, 64, 8, 4, 4),
    _tiles(conv_tma.GEMM, 64, 128, 64, 8, 4, 4),
    _tiles(conv_tma.IMPLICIT, 128, 128, 64, 8, 8, 4),
    _tiles(conv_tma.IMPLICIT, 128, 128, 64, 8, 4, 4),
    _tiles(conv_tma.IMPLICIT, 128, 64, 64, 8, 4, 4),
    _tiles(conv_tma.IMPLICIT, 64, 128, 64, 8, 4, 4),
] if conv_tma.AVAILABLE else []
# The interpreter gets one fixed config. Its cost is per program and per loop
# step, so wide N and K tiles run ~9x faster there than 32x32x16 (CPU model tests depend on it).
CANDIDATES = {"sm90": _HOPPER + _AMPERE + _HOPPER_TMA, "sm80": _AMPERE,
              "interpreter": [_tiles("conv", 32, 64, 64, 4, 4, 1)]}


def _applies(c: Candidate, key: ConvKey) -> bool:
    """Whether candidate c can run this key at all."""
    if c.kernel == conv_tma.GEMM:
        return key.tma and key.mode == "gemm"
    if c.kernel == conv_tma.IMPLICIT:
        return key.tma and key.mode == "implicit" and (key.stride_h, key.stride_w) == (1, 1)
    return True


def _fits(c: Candidate, key: ConvKey, target: str, smem: int) -> bool:
    """Whether candidate c is worth trying for this key on this target: no tile overshoots the problem, K
    steps of 16 only where Cin is that small, the pipeline's buffers (and TMA's output tile) fit in shared
    memory; on a GPU target no Hopper tile too short for wgmma (64 rows per warpgroup: mma.sync instead)
    and no fp32 tile that spills (benchmarks/static_report.py compiles every kept candidate spill-free)."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    ho, wo = key.out_hw()
    m = key.n * ho * wo
    cin = _STEM_CHANNELS if key.mode == "stem" else key.cin  # what the kernel's K loop sees
    size = KEY_DTYPES[key.dtype].itemsize
    if bm > max(32, triton.next_power_of_2(m)) or bn > max(64, triton.next_power_of_2(key.cout)):
        return False
    if not min(32, triton.next_power_of_2(cin)) <= bk <= max(16, triton.next_power_of_2(cin)):
        return False
    epilogue = bm * bn * size if c.kernel in (conv_tma.GEMM, conv_tma.IMPLICIT) else 0
    if c.num_stages * (bm + bn) * bk * size + epilogue > smem:
        return False
    if target == "interpreter":
        return True
    fma = size == 4 and key.precision == "ieee"  # CUDA-core dot: no tensor cores
    if target == "sm90" and bm < 16 * c.num_warps and not fma:
        return False
    # mma.sync and the FMA dot keep a K step of fp32 operands in registers beside the accumulator.
    fp32_in_registers = size == 4 and (fma or target != "sm90")
    return not (fp32_in_registers and (bm * bn > (32 if fma else 64) * 32 * c.num_warps or (fma and bk > 32)))


def _torch_offered(key: ConvKey) -> bool:
    """The torch path runs torch's conv, whose fp32 TF32 use follows cuDNN's setting: it is a candidate
    where that equals the key's precision (always, except an fp32 fc under a different matmul setting)."""
    return key.dtype != "float32" or (key.precision == "tf32") == fp32_allows_tf32("conv")


class _ConvFamily(tuner.Family):
    name = "conv_bias_act"
    key_type = ConvKey

    @property
    def sources(self):
        return (__file__, conv_tma.__file__)

    def candidates(self, target, key, smem):
        listed = [c for c in CANDIDATES[target] if _applies(c, key)]
        kept = [c for c in listed if _fits(c, key, target, smem)]
        plain = [c for c in listed if c.kernel == "conv"]
        if plain and not any(c.kernel == "conv" for c in kept):  # a tiny problem: the smallest tile runs it
            kept.insert(0, min(plain, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]))
        return kept + ([tuner.TORCH_CANDIDATE] if _torch_offered(key) else [])

    def inputs(self, key, device, generator):
        dtype = KEY_DTYPES[key.dtype]

        def rand(*shape, scale=1.0, cl=True, dt=dtype):
            t = (torch.randn(*shape, generator=generator, device=device) * scale).to(dt)
            return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t

        ho, wo = key.out_hw()
        x = rand(key.n, key.cin, key.h, key.w, cl=key.x_cl)
        weight = rand(key.cout, key.cin, key.kh, key.kw, scale=(key.cin * key.kh * key.kw) ** -0.5, cl=key.w_cl)
        bias = rand(key.cout, dt=torch.float32)
        residual = rand(key.n, key.cout, ho, wo, cl=key.r_cl) if key.has_res else None
        conv_args = ([key.stride_h, key.stride_w], [key.pad_h, key.pad_w], [key.dil_h, key.dil_w], key.relu)
        return (x, weight, bias, residual, *conv_args), key.precision == "tf32"

    def run(self, candidate, inputs):
        args, tf32 = inputs
        return conv_bias_act_fwd(*args, allow_tf32=tf32, candidate=candidate)

    def references(self, inputs):
        (x, weight, bias, residual, stride, padding, dilation, relu), _ = inputs
        eager = reference.conv_bias_act(x, weight, bias, residual, stride, padding, dilation, relu)
        exact = reference.conv_bias_act(x.double(), weight.double(), bias.double(),
                                        None if residual is None else residual.double(),
                                        stride, padding, dilation, relu)
        return eager, exact

    def rule_dtype(self, key):
        # TF32 rounds the operands to fp16's 10-bit mantissa: fp16's floor.
        return torch.float16 if key.dtype == "float32" and key.precision == "tf32" else KEY_DTYPES[key.dtype]

    def describe(self, key):
        epilogue = ("+res" if key.has_res else "") + ("+relu" if key.relu else "")
        stride = key.stride_h if key.stride_h == key.stride_w else f"{key.stride_h}x{key.stride_w}"
        return (f"{key.kh}x{key.kw}/{stride} {key.cin}->{key.cout} {key.h}x{key.w} n{key.n} "
                f"{SHORT_NAMES[key.dtype]}{epilogue} ({key.mode})")


FAMILY = tuner.register(_ConvFamily())


# --- kernel -----------------------------------------------------------------

@triton.jit
def _epilogue(acc, rows, cols, m_mask, b_ptr, stride_b, r_ptr, out_ptr, C_OUT,
              n_idx, ho, wo, stride_rn, stride_rc, stride_rh, stride_rw,
              BLOCK_M: tl.constexpr, HAS_RES: tl.constexpr, RES_ROWS: tl.constexpr, RELU: tl.constexpr):
    """out[rows, cols] = relu?(acc + bias + residual?) in fp32, one rounding at the store. The output
    is always freshly allocated dense channels_last: row-major [M, Cout]."""
    n_mask = cols < C_OUT
    mask = m_mask[:, None] & n_mask[None, :]
    shift = tl.load(b_ptr + cols * stride_b, mask=n_mask, other=0.0)[None, :]
    # int32 offsets from the tile's first row (at most BLOCK_M * C_OUT).
    tile = rows.to(tl.int64) * C_OUT
    offs = tl.arange(0, BLOCK_M)[:, None] * C_OUT + cols[None, :]
    if HAS_RES:
        if RES_ROWS:  # a dense channels_last residual has the output's [M, Cout] rows
            r_ptrs = r_ptr + tile + offs
        else:
            r_ptrs = (r_ptr + (n_idx * stride_rn + ho * stride_rh + wo * stride_rw)[:, None]
                      + cols[None, :] * stride_rc)
        shift = shift + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc += shift
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + tile + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bias_act_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
    M, C_IN, H, W, C_OUT, HO, WO,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_b, stride_rn, stride_rc, stride_rh, stride_rw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr,
    HAS_RES: tl.constexpr, RES_ROWS: tl.constexpr, RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles in a row share weight tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_OUT, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C_OUT
    # (n, ho, wo) of each output row, for the implicit loads and a strided residual (unused, and
    # compiled away, otherwise): the only div/mod, once per tile. int64 where products can pass 2**31.
    n_idx = (offs_m // (HO * WO)).to(tl.int64)
    hw = offs_m % (HO * WO)
    ho = hw // WO
    wo = hw % WO

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_cols = w_ptr + offs_n[None, :] * stride_wo
    if MODE == 0:
        # gemm: the launcher passes the row stride (Cin) as stride_xw.
        a_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xw
        for k0 in range(0, C_IN, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < C_IN
            a = tl.load(a_rows + k[None, :] * stride_xc, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + k[:, None] * stride_wc, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST_DOT)
    else:
        # implicit: one flat loop over (tap, channel block) so the compiler can
        # pipeline across taps even when Cin is a single block.
        hi0 = ho * STRIDE_H - PAD_H
        wi0 = wo * STRIDE_W - PAD_W
        x_rows = x_ptr + n_idx * stride_xn
        c_blocks = tl.cdiv(C_IN, BLOCK_K)
        for it in range(0, KH * KW * c_blocks):
            if KH * KW == 1:
                # A strided 1x1 (the downsample convs): without the tap arithmetic. With it,
                # triton loads this A tile one element at a time instead of by cp.async.
                kh = 0
                kw = 0
                k = it * BLOCK_K + offs_k
            else:
                tap = it // c_blocks
                k = (it - tap * c_blocks) * BLOCK_K + offs_k
                kh = tap // KW
                kw = tap % KW
            hi = hi0 + kh * DIL_H
            wi = wi0 + kw * DIL_W
            row_ok = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            k_ok = k < C_IN
            a_ptrs = x_rows[:, None] + (hi * stride_xh + wi * stride_xw)[:, None] + k[None, :] * stride_xc
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_ptrs = w_cols + kh * stride_wh + kw * stride_ww + k[:, None] * stride_wc
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST_DOT)

    # A residual tile is as large as the accumulator: with both in registers the wide tiles
    # spill, so those add it one half of the columns at a time.
    rows = pid_m * BLOCK_M
    if HAS_RES and BLOCK_N >= 128:
        half: tl.constexpr = BLOCK_N // 2
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
        for part in tl.static_range(2):
            cols = pid_n * BLOCK_N + part * half + tl.arange(0, half)
            _epilogue(acc_hi if part else acc_lo, rows, cols, m_mask, b_ptr, stride_b, r_ptr, out_ptr, C_OUT,
                      n_idx, ho, wo, stride_rn, stride_rc, stride_rh, stride_rw,
                      BLOCK_M, HAS_RES, RES_ROWS, RELU)
    else:
        _epilogue(acc, rows, offs_n, m_mask, b_ptr, stride_b, r_ptr, out_ptr, C_OUT,
                  n_idx, ho, wo, stride_rn, stride_rc, stride_rh, stride_rw,
                  BLOCK_M, HAS_RES, RES_ROWS, RELU)


# --- the packed stem ----------------------------------------------------------------
# An RGB stem (Cin < 16) would waste most of every tl.dot K step (>= 16) on channel padding and read
# 6-byte pixels one element at a time. Instead its input is packed once into a dense NHWC tensor of
# _STEM_CHANNELS channels per pixel: a stride-s conv with s*s*Cin <= 16 becomes a stride-1 conv by
# space-to-depth (pixel (i, j) holds the s x s input patch at (s*i, s*j)), with the zero padding
# written out, so the implicit mode runs it with 32-byte aligned rows: the 7x7/2 RGB stem becomes a
# 4x4/1 conv with K = 256 (147 useful), ResNet-D's 3x3/2 3->32 stem a 2x2/1 conv with K = 64 (27
# useful). Other small-Cin convs (dilated, or s*s*Cin > 16) only get their channels padded.

_STEM_CHANNELS = 16  # packed channels per pixel: one bf16 K step of the dot


class _StemPlan(NamedTuple):
    factor: int  # space-to-depth factor (1: channels padded only)
    top: int  # input rows/columns of zero padding written above/left of the image
    left: int
    shift: tuple[int, int]  # zero taps put before the weight's first row/column
    kernel: tuple[int, int]  # the packed conv's kernel, stride and dilation
    stride: tuple[int, int]
    dilation: tuple[int, int]


def _stem_plan(cin, kh, kw, stride, padding, dilation) -> _StemPlan:
    s = stride[0]
    factor = s if (s > 1 and stride[1] == s and tuple(dilation) == (1, 1)
                   and s * s * cin <= _STEM_CHANNELS) else 1
    # Packed row i, sub-row r holds input row factor*i + r - top; a tap k of the original kernel
    # lands on packed tap (k + shift) // factor, sub-row (k + shift) % factor.
    before = [-(-p // factor) for p in padding]  # packed rows of padding above / left
    shift = tuple(factor * b - p for b, p in zip(before, padding))
    kernel = tuple(-(-(k + e) // factor) for k, e in zip((kh, kw), shift))
    return _StemPlan(factor, factor * before[0], factor * before[1], shift, kernel,
                     tuple(v // factor for v in stride), tuple(dilation))


@triton.jit
def _stem_pack_kernel(x_ptr, out_ptr, P, HP, WP, H, W, TOP, LEFT,
                      stride_xn, stride_xc, stride_xh, stride_xw,
                      C_IN: tl.constexpr, FACTOR: tl.constexpr, C_P: tl.constexpr, BLOCK_P: tl.constexpr):
    # out[n, i, j, (r*FACTOR + q)*C_IN + c] = x[n, c, FACTOR*i + r - TOP, FACTOR*j + q - LEFT]; zero
    # outside the image and in the padding channels. out is dense [P, C_P] rows, P = N*HP*WP.
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, C_P)
    p_ok = offs_p < P
    n = (offs_p // (HP * WP)).to(tl.int64)
    i = (offs_p % (HP * WP)) // WP
    j = offs_p % WP
    tap = ch // C_IN
    c = ch % C_IN
    h = FACTOR * i[:, None] + (tap // FACTOR)[None, :] - TOP
    w = FACTOR * j[:, None] + (tap % FACTOR)[None, :] - LEFT
    ok = p_ok[:, None] & (ch < FACTOR * FACTOR * C_IN)[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    v = tl.load(x_ptr + n[:, None] * stride_xn + (c * stride_xc)[None, :] + h * stride_xh + w * stride_xw,
                mask=ok, other=0.0)
    tl.store(out_ptr + offs_p.to(tl.int64)[:, None] * C_P + ch[None, :], v, mask=p_ok[:, None])


def _pack_stem_input(x: torch.Tensor, plan: _StemPlan, ho: int, wo: int) -> torch.Tensor:
    """x (any strides) -> the packed conv's input, [N, _STEM_CHANNELS, HP, WP] dense channels_last."""
    (kh, kw), (sh, sw), (dh, dw) = plan.kernel, plan.stride, plan.dilation
    hp, wp = (ho - 1) * sh + dh * (kh - 1) + 1, (wo - 1) * sw + dw * (kw - 1) + 1
    packed = torch.empty((x.shape[0], _STEM_CHANNELS, hp, wp), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    p = x.shape[0] * hp * wp
    block_p = 64
    with device_guard(x):
        _stem_pack_kernel[(triton.cdiv(p, block_p),)](
            x, packed, p, hp, wp, x.shape[2], x.shape[3], plan.top, plan.left, *x.stride(),
            C_IN=x.shape[1], FACTOR=plan.factor, C_P=_STEM_CHANNELS, BLOCK_P=block_p)
    return packed


def _pack_stem_weight(weight: torch.Tensor, plan: _StemPlan) -> torch.Tensor:
    """[Cout, Cin, KH, KW] -> the packed conv's weight, [Cout, _STEM_CHANNELS, KHs, KWs] channels_last."""
    cout, cin, kh, kw = weight.shape
    f, (khs, kws), (eh, ew) = plan.factor, plan.kernel, plan.shift
    taps = weight.new_zeros((cout, cin, khs * f, kws * f))
    taps[:, :, eh:eh + kh, ew:ew + kw] = weight
    # tap row a*f + r -> packed tap a, sub-row r; channels ordered (r, q, c) as the input packing.
    taps = taps.view(cout, cin, khs, f, kws, f).permute(0, 2, 4, 3, 5, 1).reshape(cout, khs, kws, f * f * cin)
    packed = F.pad(taps, (0, _STEM_CHANNELS - f * f * cin))
    return packed.permute(0, 3, 1, 2)


# Packed stem weights, by the weight they pack: while its version counter says it is unchanged, or,
# for a weight from the fold cache (never written to: a changed source makes a new fold), for good.
# Inference tensors have no version counter: those from the fold are packed once by conv_bn_eval, any
# other is packed every call.
_PACKED_WEIGHTS = WeakIdKeyDictionary()


def _stem_weight(weight: torch.Tensor, plan: _StemPlan, folded: bool = False) -> torch.Tensor:
    cached = _PACKED_WEIGHTS.get(weight)
    if cached is not None and cached[0] == ("folded", plan):
        return cached[1]
    if folded:
        key = ("folded", plan)
    else:
        try:
            key = (weight._version, weight.data_ptr(), plan)
        except RuntimeError:  # an inference tensor
            return _pack_stem_weight(weight, plan)
    if cached is None or cached[0] != key:
        cached = _PACKED_WEIGHTS[weight] = (key, _pack_stem_weight(weight, plan))
    return cached[1]


# --- launcher -----------------------------------------------------------------

def _mode(x: torch.Tensor, kh: int, kw: int, stride, padding) -> str:
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) \
            and x.is_contiguous(memory_format=torch.channels_last):
        return "gemm"
    return "stem" if x.shape[1] < _STEM_CHANNELS else "implicit"


def _out_hw(h, w, kh, kw, stride, padding, dilation):
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def _check_conv_args(x, weight, bias, residual, stride, padding, dilation):
    """Validate the op's inputs; returns (Ho, Wo)."""
    name = "resnet_fast conv_bias_act"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: x must be a 4-D [N, Cin, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_dtype(x, name)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{name}: weight must be a 4-D [Cout, Cin, KH, KW] tensor")
    if weight.dtype != x.dtype:
        raise ValueError(f"{name}: weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: weight expects Cin={weight.shape[1]} but x has {x.shape[1]} channels "
                         "(only groups=1 is supported)")
    cout = weight.shape[0]
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != cout:
        raise ValueError(f"{name}: bias must be a 1-D tensor of Cout={cout} elements, got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias.dtype != torch.float32:
        raise ValueError(f"{name}: bias (the folded BN shift) must be float32, got {bias.dtype}")
    for label, seq, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(seq) != 2 or any(int(v) < low for v in seq):
            raise ValueError(f"{name}: {label} must be two ints >= {low}, got {list(seq)}")
    tensors = [("weight", weight), ("bias", bias)] + ([("residual", residual)] if residual is not None else [])
    for label, t in tensors:
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device} but x is on {x.device}")
    ho, wo = _out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"{name}: input {tuple(x.shape[2:])} is too small for a {tuple(weight.shape[2:])} "
                         f"kernel with stride {list(stride)}, padding {list(padding)}, dilation {list(dilation)}")
    if residual is not None:
        expected = (x.shape[0], cout, ho, wo)
        if tuple(residual.shape) != expected or residual.dtype != x.dtype:
            raise ValueError(f"{name}: residual must match the output: shape {expected} and dtype {x.dtype}, "
                             f"got {tuple(residual.shape)} {residual.dtype}")
    return ho, wo


def _empty_out(x, cout, ho, wo):
    return torch.empty((x.shape[0], cout, ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def shape_key(x, weight, residual, out, stride, padding, dilation, relu, precision) -> ConvKey:
    """The tuner's key for a call (the tensors as the launcher gets them; `out`: a given dense NHWC output
    buffer, or None for a fresh one, which the caching allocator aligns)."""
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    size = x.element_size()
    x_cl = x.is_contiguous(memory_format=_CL)
    w_cl = weight.is_contiguous(memory_format=_CL)
    r_cl = residual is None or residual.is_contiguous(memory_format=_CL)
    tma = (x_cl and w_cl and r_cl and (cin * size) % 16 == 0 and (cout * size) % 16 == 0
           and all(t.data_ptr() % 16 == 0 for t in (x, weight, out, residual) if t is not None))
    return ConvKey(n, cin, h, w, cout, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0],
                   dilation[1], DTYPE_KEYS[x.dtype], _mode(x, kh, kw, stride, padding), residual is not None,
                   bool(relu), precision, x_cl, w_cl, r_cl, tma)


def kernel_call(candidate, key, x, weight, bias, residual, out, stride, padding, dilation, relu, precision):
    """(kernel, grid, args, kwargs): exactly the launch conv_bias_act_fwd makes for a Triton candidate. x,
    weight and the conv arguments are those the kernel reads: for the stem, the packed ones."""
    upcast = interpreter_enabled() and x.dtype == torch.bfloat16
    ho, wo = key.out_hw()
    if candidate.kernel != "conv":
        return conv_tma.call(candidate, x, weight, bias, residual, out, ho, wo, padding, dilation, relu,
                             precision, upcast)
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    sx = [x.stride(0), x.stride(1), x.stride(2), x.stride(3)]
    if key.mode == "gemm":
        sx[1], sx[3] = 1, cin  # dense channels_last rows; strides of size-1 dims may be arbitrary
    res = residual if residual is not None else out  # never read when HAS_RES is False
    sr = [res.stride(0), res.stride(1), res.stride(2), res.stride(3)] if residual is not None else [0, 0, 0, 0]
    m, p = n * ho * wo, candidate.kwargs
    args = (x, weight, bias, res, out, m, cin, h, w, cout, ho, wo, *sx,
            weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3), bias.stride(0), *sr,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    kwargs = dict(KH=kh, KW=kw, MODE=_MODES["gemm" if key.mode == "gemm" else "implicit"],
                  HAS_RES=key.has_res, RES_ROWS=key.has_res and key.r_cl, RELU=bool(relu),
                  DOT_PRECISION=precision, UPCAST_DOT=upcast, **p, num_warps=candidate.num_warps,
                  num_stages=candidate.num_stages)
    grid = (triton.cdiv(m, p["BLOCK_M"]) * triton.cdiv(cout, p["BLOCK_N"]),)
    return _conv_bias_act_fwd_kernel, grid, args, kwargs


def _torch_path(x, weight, bias, residual, stride, padding, dilation, relu):
    """torch's conv (cuDNN, oneDNN), then bias (+ residual) (+ ReLU) in one fp32 pass: the extension's
    scale_bias_act with a unit scale (plain torch without the extension)."""
    with torch.autocast(x.device.type, enabled=False):  # x's dtype, as the Triton candidates compute
        y = F.conv2d(x, weight, None, stride, padding, dilation).contiguous(memory_format=_CL)
    ones = _UNIT_SCALES.get((bias.shape[0], bias.device))
    if ones is None:
        ones = _UNIT_SCALES[(bias.shape[0], bias.device)] = torch.ones_like(bias, dtype=torch.float32)
    if ext.available(y.device):
        torch.ops.resnet_fast.scale_bias_act_(y, ones, bias, residual, relu)
        return y
    return reference.scale_bias_act(y, ones, bias, residual, relu).contiguous(memory_format=_CL)


_UNIT_SCALES: dict = {}


def conv_bias_act_fwd(x, weight, bias, residual, stride, padding, dilation, relu, out=None, allow_tf32=None,
                      candidate=None):
    """Run the call (inputs already validated) on the tuner's choice for its shape key, or on
    `candidate` (the tuner's trial runs). `out`, if given, must be a dense channels_last
    [N, Cout, Ho, Wo] buffer (avg_pool_fc writes its fc result straight into a 2-D tensor this
    way). allow_tf32=None follows cuDNN's conv setting; callers that are not convs pass their own rule."""
    require_usable(x, "resnet_fast Triton conv")
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = _out_hw(h, w, kh, kw, stride, padding, dilation)
    if n * ho * wo == 0 or cout == 0:
        return _empty_out(x, cout, ho, wo) if out is None else out
    if allow_tf32 is None:
        allow_tf32 = fp32_allows_tf32("conv")
    precision = "ieee" if x.dtype == torch.float32 and not allow_tf32 else "tf32"  # ignored for fp16/bf16
    key = shape_key(x, weight, residual, out, stride, padding, dilation, relu, precision)
    choice = candidate or tuner.choose(FAMILY, key, x.device)
    if choice.is_torch:
        y = _torch_path(x, weight, bias, residual, stride, padding, dilation, relu)
        TORCH_PATH["conv_bias_act"] += candidate is None
        return y if out is None else out.copy_(y)
    if out is None:
        out = _empty_out(x, cout, ho, wo)
    if key.mode == "stem":
        plan = _stem_plan(cin, kh, kw, stride, padding, dilation)
        x, weight = _pack_stem_input(x, plan, ho, wo), _stem_weight(weight, plan)
        stride, padding, dilation = plan.stride, (0, 0), plan.dilation
    kernel, grid, args, kwargs = kernel_call(choice, key, x, weight, bias, residual, out, stride, padding,
                                             dilation, relu, precision)
    with device_guard(x):
        kernel[grid](*args, **kwargs)
    if candidate is None:  # the tuner's trial runs are not the caller's output
        LAUNCHES[f"conv_bias_act.{_LAUNCH_NAMES.get(choice.kernel, key.mode)}"] += 1
        LAUNCHES["conv_stem_pack"] += key.mode == "stem"
    return out


_LAUNCH_NAMES = {conv_tma.GEMM: "tma_gemm", conv_tma.IMPLICIT: "tma_implicit"}


# --- torch.library registration ------------------------------------------------

@torch.library.custom_op(
    "resnet_fast::triton_conv_bias_act", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, Tensor? residual, int[] stride, int[] padding, "
           "int[] dilation, bool relu) -> Tensor",
)
def _conv_bias_act_op(x, weight, bias, residual, stride, padding, dilation, relu):
    _check_conv_args(x, weight, bias, residual, stride, padding, dilation)
    return conv_bias_act_fwd(x, weight, bias, residual, stride, padding, dilation, relu)


@_conv_bias_act_op.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, relu):
    ho, wo = _check_conv_args(x, weight, bias, residual, stride, padding, dilation)
    return _empty_out(x, weight.shape[0], ho, wo)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, relu = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv_args = (list(stride), list(padding), list(dilation))
    ctx.relu = relu
    ctx.has_residual = residual is not None


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    if ctx.relu:  # relu(z) > 0 exactly where z > 0
        grad = grad * (out > 0)
    stride, padding, dilation = ctx.conv_args
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    grad_x = grad_w = None
    if need_x or need_w:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], 1, [need_x, need_w, False])
    grad_b = grad.sum(dim=(0, 2, 3), dtype=torch.float32) if need_b else None
    grad_r = grad if need_r and ctx.has_residual else None
    return grad_x, grad_w, grad_b, grad_r, None, None, None, None


_conv_bias_act_op.register_autograd(_backward, setup_context=_setup_context)


# --- public API ------------------------------------------------------------------

def _pair(value, label):
    if isinstance(value, int):
        return [value, value]
    try:
        pair = [int(v) for v in value]
    except TypeError:
        pair = []
    if len(pair) != 2:
        raise ValueError(f"resnet_fast conv_bias_act: {label} must be an int or a pair of ints, got {value!r}")
    return pair


def conv_bias_act(x, weight, bias, residual=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                  relu=False):
    """relu?(conv2d(x, weight) + bias + residual?) in one Triton kernel.

    x:        [N, Cin, H, W], float32/float16/bfloat16, channels_last for speed
              (any strides are read correctly; none are copied).
    weight:   [Cout, Cin, KH, KW], x's dtype (groups=1).
    bias:     [Cout] float32, e.g. the folded BatchNorm shift.
    residual: None or [N, Cout, Ho, Wo] in x's dtype, added before the ReLU.
    Returns [N, Cout, Ho, Wo] channels_last in x's dtype. fp32 inputs use TF32
    iff cuDNN would for a conv (see the module docstring).
    """
    return torch.ops.resnet_fast.triton_conv_bias_act(
        x, weight, bias, residual, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), bool(relu))


def conv_bn_eval(x, conv, bn, residual, relu, differentiable=False):
    """A ResNet conv + eval BatchNorm (+ residual) (+ ReLU) as one launch of this kernel.

    BN is folded into the weights: cached per weight version, or, when `differentiable`, folded on
    every call so autograd and torch.compile trace through the parameters."""
    if differentiable:
        w, b = fold.fold_conv_bn(conv, bn)
        w = w.to(x.dtype)
    else:
        w, b = fold.folded(conv, bn, x.device, x.dtype)
        if _mode(x, *w.shape[2:], conv.stride, conv.padding) == "stem":  # its packing is cached with the fold
            _stem_weight(w, _stem_plan(w.shape[1], *w.shape[2:], conv.stride, conv.padding, conv.dilation), True)
    return torch.ops.resnet_fast.triton_conv_bias_act(
        x, w, b, residual, list(conv.stride), list(conv.padding), list(conv.dilation), relu)
