"""The CUDA BatchNorm kernels' tiling (csrc/tiling.h), checked on the CPU.

torch.ops.resnet_fast._bn_tiling plans the tiling the CUDA kernels would launch for a shape, dtype
and layout, then walks every block and thread through the same index functions the kernels call
(thread_columns, tile_segments, first_row/row_stride) and checks that each element is visited once
with its own channel, and each per-channel partial sum is written once from exactly that channel's
columns. No GPU needed; the parity tests in tests/ops/ run the kernels themselves on one.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _backends import skip_unless_usable

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
H200_SMS = 132


@pytest.fixture(autouse=True)
def _extension():
    skip_unless_usable("ext", torch.device("cpu"))


def plan(shape, dtype="bf16", channels_last=False, aligned=True, sms=H200_SMS) -> str:
    text = torch.ops.resnet_fast._bn_tiling(list(shape), DTYPES[dtype], channels_last, aligned, sms)
    assert "ERROR" not in text, f"{shape} {dtype} {'NHWC' if channels_last else 'NCHW'}: {text}"
    return text


@pytest.mark.parametrize("shape, channels_last, dtype, expected", [
    # ResNet-50 training activations at batch 128: every layout moves 16 bytes per access.
    ((128, 2048, 7, 7), False, "bf16", "vec=8 block=256x1 group=40"),     # 7x7 planes packed 40 to a tile
    ((128, 1024, 14, 14), False, "bf16", "vec=8 block=256x1 group=10"),   # 14x14 planes, 10 to a tile
    ((128, 256, 56, 56), False, "bf16", "vec=8 block=8x32 pieces=49"),    # a plane over 49 tiles
    ((128, 64, 56, 56), True, "bf16", "vec=8 block=8x32 group=64"),
    ((128, 2048, 7, 7), True, "bf16", "vec=8 block=8x32 group=64"),
    ((128, 2048, 7, 7), False, "fp32", "vec=4"),
    ((128, 64, 112, 112), True, "fp16", "vec=8"),
    # odd channel counts and small planes
    ((4, 5, 7, 8), False, "bf16", "vec=8"),      # C odd, H*W % 8 == 0: still vectors
    ((4, 24, 7, 7), False, "bf16", "group=8"),   # the last tile holds 8 of its 16 channels
    ((3, 7, 7, 7), False, "bf16", "vec=1"),      # C * 49 % 8 != 0: scalar
    ((3, 3, 7, 5), True, "fp16", "vec=1"),       # C % 8 != 0
    ((5, 64, 1, 1), False, "bf16", "vec=8"),     # one column per channel, NCHW
])
def test_resnet_shapes_get_the_expected_tiling(shape, channels_last, dtype, expected):
    assert expected in plan(shape, dtype, channels_last)


def test_misaligned_pointers_fall_back_to_scalar_accesses():
    assert plan((8, 64, 7, 7), aligned=False).startswith("vec=1 ")


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 70), h=st.integers(1, 24), w=st.integers(1, 24),
       dtype=st.sampled_from(sorted(DTYPES)), channels_last=st.booleans(), aligned=st.booleans(),
       sms=st.sampled_from([1, 3, 108, 132]))
def test_every_tiling_visits_each_element_once(n, c, h, w, dtype, channels_last, aligned, sms):
    plan((n, c, h, w), dtype, channels_last, aligned, sms)


@pytest.mark.parametrize("shape", [(2, 3), (6, 4, 1000), (1, 2, 3, 4, 5), (2, 3, 40000)])
def test_other_ranks_and_wide_planes(shape):
    plan(shape, "fp32")
    plan(shape, "bf16")
