"""Which backends a test can run here, and proof that a kernel ran."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from resnet_fast.ops import dispatch, ext

from _numerics import DTYPES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("torch", "ext", "triton")
FAMILIES = ("ext", "triton")  # the backends whose ops share the C++ schemas
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FORMATS = [torch.contiguous_format, torch.channels_last]
# The Triton conv's dtypes on DEVICE: bf16 on a GPU only (the interpreter's bf16 tl.dot is broken).
KERNEL_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                 pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]


def every_family_dtype_layout(test):
    """Parametrize `test` over (device, family, dtype, fmt): the cases every op family is held to."""
    for name, values in (("fmt", FORMATS), ("dtype", DTYPES), ("family", FAMILIES), ("device", DEVICES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def require_triton_here() -> None:
    """Skip the calling test module where the Triton kernels cannot run."""
    if not dispatch.triton_usable(DEVICE):
        pytest.skip(dispatch.triton_status()[1], allow_module_level=True)


def rand_nhwc(*shape, dtype=torch.float32, scale=1.0, cl=True) -> torch.Tensor:
    """Random values on DEVICE drawn in float64 (the same values in every dtype), channels_last if 4-D."""
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t
REQUIRE_EXT = os.environ.get("RESNET_FAST_REQUIRE_EXT") == "1"  # CI builds _C: its tests must not skip


def skip_unless_usable(backend: str, device: torch.device = DEVICE) -> None:
    if backend == "ext" and not ext.available(device):
        assert not REQUIRE_EXT, ext.status()[1]
        pytest.skip(f"resnet_fast._C cannot run on {device.type}: {ext.status()[1]}")
    if backend == "triton" and not dispatch.triton_usable(device):
        pytest.skip(dispatch.triton_status()[1])


def launches() -> int:
    from resnet_fast.ops.triton._common import LAUNCHES
    return sum(LAUNCHES.values())


@contextlib.contextmanager
def launched(key: str, times: int = 1):
    """Assert the block launched Triton kernel `key` exactly `times` times."""
    from resnet_fast.ops.triton._common import LAUNCHES
    before = LAUNCHES[key]
    yield
    assert LAUNCHES[key] - before == times, f"expected {times} launch(es) of {key}, got {LAUNCHES[key] - before}"


class Family:
    """The ops of one family by their C++ names: Family("triton").bn_act_fwd is .triton_bn_act_fwd.
    Skips the test where that backend cannot run on `device`."""

    def __init__(self, impl: str, device="cpu"):
        skip_unless_usable(impl, torch.device(device))
        self.impl = impl
        self.prefix = "triton_" if impl == "triton" else ""

    def __getattr__(self, name: str):
        return dispatch.op(self.impl, name)
