"""Which backends a test can run here, and proof that a kernel ran."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from resnet_fast.ops import dispatch, ext

from _numerics import DTYPES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("torch", "ext", "triton")
FAMILIES = ("ext", "triton")  # the backends whose ops share the C++ schemas
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FORMATS = [torch.contiguous_format, torch.channels_last]


def _cpu_has_avx512() -> bool:
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


# The C++ CPU kernels' variants, for RESNET_FAST_CPU_ISA (one per process: tests run them in subprocesses).
CPU_ISAS = [pytest.param("avx2"),
            pytest.param("avx512", marks=pytest.mark.skipif(not _cpu_has_avx512(),
                                                            reason="CPU lacks AVX-512: that variant cannot run here"))]


def run_check_on_isa(isa: str, test_file: str, check: str) -> int:
    """Run `check()` of the test module at `test_file` in a subprocess with RESNET_FAST_CPU_ISA=isa; assert
    that process ran that ISA's kernels and no other's. Returns what check returned (the cases run)."""
    here = os.path.dirname(os.path.abspath(test_file))
    module = os.path.splitext(os.path.basename(test_file))[0]
    code = (f"import sys, torch; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; import resnet_fast.ops.ext; "
            f"import {module} as t; before = torch.ops.resnet_fast._cpu_isa_calls(); n = t.{check}(); "
            "calls = [a - b for a, b in zip(torch.ops.resnet_fast._cpu_isa_calls(), before)]; "
            "print(torch.ops.resnet_fast._cpu_isa(), n, *calls)")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RESNET_FAST_CPU_ISA": isa},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ran_isa, cases, baseline_calls, avx512_calls = run.stdout.split()
    assert ran_isa == isa
    assert (int(avx512_calls) > 0, int(baseline_calls) > 0) == (isa == "avx512", isa == "avx2")
    return int(cases)


# The Triton conv's dtypes on DEVICE: bf16 on a GPU only (the interpreter's bf16 tl.dot is broken).
KERNEL_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                 pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]


# Shapes for the CUDA parity tests, each with the tiling csrc/tiling.h must pick for it (vector
# accesses or not; planes packed by whole channels ("group") or split ("pieces")), which
# cuda_tiling() checks, so that every path of the CUDA BN kernels runs in some case.
NCHW, NHWC = torch.contiguous_format, torch.channels_last
CUDA_TILING_CASES = [
    ((32, 64, 56, 56), NHWC, "vector group"),   # ResNet-sized: many row blocks
    ((8, 2048, 7, 7), NHWC, "vector group"),    # 64 channels to a tile, 32 tiles
    ((16, 256, 14, 14), NCHW, "vector group"),  # 14x14 planes, 10 to a tile
    ((8, 64, 7, 7), NCHW, "vector group"),      # 7x7 planes packed side by side
    ((4, 24, 7, 7), NCHW, "vector group"),      # the last tile half full
    ((4, 5, 7, 8), NCHW, "vector group"),       # odd C on the vector path
    ((5, 64, 1, 1), NCHW, "vector group"),      # one column per channel
    ((8, 64, 56, 56), NCHW, "vector pieces"),   # a plane split over tiles
    ((2, 64, 112, 112), NCHW, "vector pieces"),  # two rows only
    ((3, 7, 7, 7), NCHW, "scalar group"),       # C * 49 % 8 != 0
    ((3, 3, 7, 5), NHWC, "scalar group"),       # C % 8 != 0
    ((2, 5, 3, 3), NCHW, "scalar group"),
]


def every_cuda_tiling(families=FAMILIES):
    """Parametrize a GPU test over (family, dtype, shape, fmt, path): CUDA_TILING_CASES."""
    def decorate(test):
        test = pytest.mark.parametrize("shape,fmt,path", CUDA_TILING_CASES)(test)
        test = pytest.mark.parametrize("dtype", DTYPES)(test)
        return pytest.mark.gpu(pytest.mark.parametrize("family", families)(test))
    return decorate


def cuda_family(family: str, shape, dtype, fmt, path: str) -> Family:
    """Family(family, "cuda"), after checking that the extension's CUDA kernels tile an aligned x
    of this shape as `path` ("vector|scalar group|pieces") on this GPU."""
    ops = Family(family, "cuda")
    if family == "ext":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        text = torch.ops.resnet_fast._bn_tiling(list(shape), dtype, fmt == NHWC, True, sms)
        assert "ERROR" not in text, text
        assert ("scalar" if text.startswith("vec=1 ") else "vector") + \
            (" group" if "group=" in text else " pieces") == path, text
    return ops


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
