"""The compiled sm_90 code of the CUDA BatchNorm kernels (no GPU needed): 128-bit loads in every
loop of the vector instantiations, no calls (the 64-bit division routine included), no spills.
Runs where resnet_fast._C was built with its CUDA kernels and cuobjdump is found (CI: nvcc is
there); `python tests/cuda_sass.py` prints the whole table."""
from pathlib import Path

import pytest

import cuda_sass
from resnet_fast.ops import ext

TILED = ("scale_bias_act_kernel", "bn_backward_elementwise_kernel", "channel_sums_kernel")


@pytest.fixture(scope="module")
def kernels():
    binary = cuda_sass.built_extension()
    if binary is None or not ext.cuda_kernels_built():
        pytest.skip("resnet_fast._C was built without its CUDA kernels")
    if cuda_sass.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found")
    report = cuda_sass.report(Path(binary), "sm_90")
    assert report, "no sm_90 code in the extension"
    return report


def test_bn_kernels_load_16_bytes_in_their_loops(kernels):
    tiled = {name: k for name, k in kernels.items() if k["kernel"] in TILED}
    assert {(k["kernel"], k["vec"]) for k in tiled.values()} >= {(name, vec) for name in TILED for vec in (1, 8)}
    for name, k in tiled.items():
        loop_loads = k["loads"]["in_loops"]
        if k["vec"] > 1:
            assert set(loop_loads) == {"128"}, f"{name}: loads in loops {loop_loads}"
        assert k["loops"] >= 2, name  # the row loop and its remainder


def test_no_calls_in_bn_kernels_and_no_64_bit_division_in_any_loop(kernels):
    for name, k in kernels.items():
        if k["kernel"] in TILED:
            assert k["calls"] == [], f"{name}: {k['calls']}"
        assert not any(c["int64_division"] and c["in_loop"] for c in k["calls"]), name


def test_no_spills_and_two_blocks_per_sm(kernels):
    for name, k in kernels.items():
        r = k["resources"]
        assert r["LOCAL"] == 0 and r["STACK"] == 0, f"{name}: {r}"
        if k["kernel"] in TILED:
            assert r["REG"] <= 128, f"{name}: {r['REG']} registers: fewer than two 256-thread blocks per SM"
