"""The TMA (tensor-descriptor) conv candidates, resnet_fast.ops.triton.conv_tma, on every edge their
boxes meet: partial tiles, several images per box, padding by out-of-bounds zero fill, dilation,
channel counts that are not a multiple of BLOCK_K or BLOCK_N. Without CUDA they run under the Triton
interpreter, which executes tensor descriptors (4-D boxes, negative offsets, zero fill). That they
compile to TMA and wgmma instructions on sm_90 is tests/test_static_report.py's job."""
import pytest
import torch

from _backends import DEVICE, launched, rand_nhwc, require_triton_here
from _numerics import assert_2x, fp32_precision
from resnet_fast.ops import reference

require_triton_here()
from resnet_fast.ops.triton import conv, conv_tma, tuner  # noqa: E402

pytestmark = [pytest.mark.skipif(not conv_tma.AVAILABLE, reason="this triton has no tensor descriptors"),
              pytest.mark.skipif(DEVICE.type == "cuda" and torch.cuda.get_device_capability() < (9, 0),
                                 reason="TMA candidates are sm_90 ones")]

# name: (N, Cin, Cout, H, W, kernel, padding, dilation, residual)
SHAPES = {
    "1x1_residual": (2, 32, 48, 5, 7, 1, 0, 1, True),
    "3x3_residual": (2, 24, 40, 7, 9, 3, 1, 1, True),
    "3x3_several_images_per_box": (5, 16, 32, 3, 3, 3, 1, 1, False),
    "5x5_dilation2": (1, 16, 24, 9, 8, 5, 4, 2, True),
    "3x3_wide": (1, 72, 80, 6, 5, 3, 1, 1, False),  # K blocks and N tiles with ragged ends
    "1x1_padded": (1, 16, 16, 4, 4, 1, 1, 1, False),  # the implicit box over a 1x1 tap with padding
}
TMA = [c for c in conv.CANDIDATES["sm90"] if c.kernel in (conv_tma.GEMM, conv_tma.IMPLICIT)]


@pytest.fixture(autouse=True)
def ieee_fp32():
    with fp32_precision("ieee", "ieee"):
        yield


def case(shape, dtype):
    n, cin, cout, h, w, k, p, d, res = SHAPES[shape]
    x = rand_nhwc(n, cin, h, w, dtype=dtype)
    weight = rand_nhwc(cout, cin, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5)
    ho, wo = h + 2 * p - d * (k - 1), w + 2 * p - d * (k - 1)
    r = rand_nhwc(n, cout, ho, wo, dtype=dtype) if res else None
    return (x, weight, rand_nhwc(cout), r, [1, 1], [p, p], [d, d], True)


def check(out, args):
    double = [t.double() if isinstance(t, torch.Tensor) else t for t in args]
    assert_2x(out, reference.conv_bias_act(*args), reference.conv_bias_act(*double))


def applicable(args):
    x, weight, _, residual, *conv_args = args
    key = conv.shape_key(x, weight, residual, None, *conv_args, "ieee")
    return key, [c for c in TMA if conv._applies(c, key)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_tma_candidate_matches_eager(shape, dtype):
    args = case(shape, dtype)
    key, candidates = applicable(args)
    assert key.tma and candidates, key
    for candidate in candidates:
        check(conv.conv_bias_act_fwd(*args, allow_tf32=False, candidate=candidate), args)


def test_a_size_one_dim_with_any_stride_still_runs():
    """Dense channels_last ignores a size-1 dim's stride; TMA wants 16-byte strides: the dense ones are used."""
    args = list(case("5x5_dilation2", torch.float16))  # N = 1
    args[0] = torch.as_strided(args[0], args[0].shape, (7, *args[0].stride()[1:]))
    key, candidates = applicable(args)
    assert key.tma and candidates
    for candidate in candidates:
        check(conv.conv_bias_act_fwd(*args, allow_tf32=False, candidate=candidate), args)


def test_the_tuner_runs_a_tma_candidate_on_a_users_call(monkeypatch):
    """Through the op and the tuner (Hopper's list, forced), the user's output comes from the TMA kernel."""
    monkeypatch.setenv(tuner.TARGET_ENV, "sm90")
    monkeypatch.setitem(SHAPES, "user", None)
    hopper = list(conv.CANDIDATES["sm90"])
    for k, p, kernel, launch in ((1, 0, conv_tma.GEMM, "tma_gemm"), (3, 1, conv_tma.IMPLICIT, "tma_implicit")):
        SHAPES["user"] = (2, 64, 128, 5, 7, k, p, 1, True)  # Cin 64, Cout 128: the TMA tiles are not pruned
        args = case("user", torch.float16)
        monkeypatch.setitem(conv.CANDIDATES, "sm90", hopper)
        only = [c for c in tuner.candidates("sm90", applicable(args)[0]) if c.kernel == kernel][:1]
        assert only
        monkeypatch.setitem(conv.CANDIDATES, "sm90", only)
        tuner.clear()
        with launched(f"conv_bias_act.{launch}"):
            check(conv.conv_bias_act(*args), args)
    tuner.clear()


def test_tma_needs_aligned_dense_nhwc():
    x, weight, bias, r, *rest = case("3x3_residual", torch.float16)
    assert applicable((x, weight, bias, r, *rest))[0].tma
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEVICE)[1:].view_as(x)  # 2-byte offset
    unaligned = torch.as_strided(shifted, x.shape, x.stride())
    odd_channels = rand_nhwc(2, 12, 7, 9, dtype=torch.float16)  # 24-byte rows
    for args in ((unaligned, weight, bias, r, *rest), (x.contiguous(), weight, bias, r, *rest),
                 (x, weight.contiguous(), bias, r, *rest),
                 (odd_channels, rand_nhwc(40, 12, 3, 3, dtype=torch.float16), bias, r, *rest)):
        key, candidates = applicable(args)
        assert not key.tma and not candidates


@pytest.mark.parametrize("block_m,n,ho,wo,expected", [
    (128, 256, 56, 56, (2, 8, 8)),  # no padded work
    (128, 256, 7, 7, (128, 1, 1)),  # layer4: a pixel of 128 images rather than 8x8 boxes (23% padding)
    (128, 8, 7, 7, (2, 8, 8)),  # 8 images: padding is unavoidable; the widest rows among the least work
    (64, 1, 1, 300, (1, 1, 64)),
    (128, 1, 3, 5, (1, 4, 32)),  # one box whatever its shape: the widest rows
])
def test_box_is_a_power_of_two_tile_of_least_padded_work(block_m, n, ho, wo, expected):
    assert conv_tma.box(block_m, n, ho, wo) == expected
