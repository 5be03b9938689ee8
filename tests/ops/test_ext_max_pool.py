"""The extension's CPU stem max-pool (csrc/cpu/pool.cpp): exact against torch, NaN included, on the shapes
that exercise its vector and scalar channel loops and its window edges; routed only where it applies."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast.ops import dispatch, pool

pytestmark = pytest.mark.skipif(not dispatch.ext_usable(torch.device("cpu")), reason="resnet_fast._C not built")

CL = torch.channels_last


def _x(n, c, h, w, dtype=torch.float32):
    return torch.randn(n, c, h, w, dtype=torch.float64).to(dtype).contiguous(memory_format=CL)


def _op():
    return dispatch.op("ext", "max_pool_3x3s2")


# channels: a whole vector and a tail, tail only, several vectors; spatial: odd, even, 1, 2
@pytest.mark.parametrize("shape", [(2, 20, 9, 7), (1, 3, 1, 1), (1, 64, 2, 5), (3, 17, 8, 8), (1, 33, 13, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_against_torch(shape, dtype):
    x = _x(*shape, dtype=dtype)
    out = _op()(x)
    want = F.max_pool2d(x, 3, 2, 1)
    assert out.shape == want.shape and out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_nan_propagates_in_vector_and_tail_lanes():
    x = _x(1, 20, 6, 6)
    x[0, 1, 2, 2] = x[0, 17, 3, 3] = float("nan")  # lane 1 of the first vector; channel 17 is in the tail
    torch.testing.assert_close(_op()(x), F.max_pool2d(x, 3, 2, 1), equal_nan=True, atol=0, rtol=0)


def test_opcheck():
    torch.library.opcheck(_op(), (_x(2, 20, 9, 7),))


def test_model_uses_it_only_where_it_applies():
    module = nn.MaxPool2d(3, 2, 1)
    cases = {  # input -> implementation
        "fp32 channels_last": (_x(2, 16, 9, 9), "ext"),
        "bf16": (_x(2, 16, 9, 9, torch.bfloat16), "torch"),  # aten's is faster for bf16
        "NCHW": (_x(2, 16, 9, 9).contiguous(), "torch"),
        "needs grad": (_x(2, 16, 9, 9).requires_grad_(), "torch"),  # no backward formula
    }
    for name, (x, impl) in cases.items():
        before = dispatch.CALLS[("max_pool", impl)]
        with resnet_fast.use_backend("auto"):
            out = pool.max_pool(module, x)
        assert dispatch.CALLS[("max_pool", impl)] == before + 1, name
        torch.testing.assert_close(out, F.max_pool2d(x, 3, 2, 1), atol=0, rtol=0)
    with torch.no_grad(), resnet_fast.use_backend("torch"):
        before = dispatch.CALLS[("max_pool", "torch")]
        pool.max_pool(module, _x(2, 16, 9, 9))
        assert dispatch.CALLS[("max_pool", "torch")] == before + 1


def test_traced_graphs_keep_aten_max_pool():
    """Compilers and exporters (ONNX) get aten's max-pool, which they know, not the C++ op."""
    x = _x(2, 16, 9, 9)

    class Pool(nn.Module):
        def forward(self, t):
            return pool.max_pool(nn.MaxPool2d(3, 2, 1), t)
    with torch.no_grad():
        graph = torch.export.export(Pool(), (x,)).graph
        fn = torch.compile(Pool(), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(fn(x), F.max_pool2d(x, 3, 2, 1), atol=0, rtol=0)
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert not any("resnet_fast" in t for t in targets) and any("max_pool2d" in t for t in targets), targets
