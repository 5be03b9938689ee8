"""add_relu: relu(x + residual), the residual join of an unfused block, on every backend: the
front (out= and in-place forms, autograd) and both op families against eager PyTorch and a
float64 reference under the 2x rule, with proof of the implementation that ran."""
import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from _backends import BACKENDS, DEVICES, FAMILIES, FORMATS, Family, every_family_dtype_layout, skip_unless_usable
from _numerics import DTYPES, Spy, assert_2x, grads_of, rand, step
from resnet_fast.ops import dispatch
from resnet_fast.ops.add_relu import add_relu


@pytest.mark.parametrize("backend", BACKENDS)
def test_front_on_each_backend(backend):
    skip_unless_usable(backend)
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    grad = torch.randn(2, 3, 4, 4)
    before = dispatch.CALLS[("add_relu", backend)]
    with resnet_fast.use_backend(backend):
        out, gx, gr = step(add_relu, x, r, grad)
        inplace = x.clone()
        assert add_relu(inplace, r, out=inplace) is inplace
        into = torch.empty_like(x).to(memory_format=torch.channels_last)
        add_relu(x, r, out=into)
        with pytest.raises(RuntimeError, match="does not support autograd"):
            add_relu(x.clone().requires_grad_(), r, out=torch.empty_like(x))
        with pytest.raises(ValueError, match="residual must have x's shape, dtype and device"):
            add_relu(x, r.double())
    eout, egx, egr = step(lambda a, b: F.relu(a + b), x, r, grad)
    for got, want in ((out, eout), (gx, egx), (gr, egr), (inplace, eout), (into, eout)):
        torch.testing.assert_close(got, want)
    assert dispatch.CALLS[("add_relu", backend)] == before + 3


@every_family_dtype_layout
def test_ops_parity(family, dtype, fmt, device):
    ops = Family(family, device)
    torch.manual_seed(3)
    x, r, grad = (rand((3, 5, 4, 6), dtype, fmt, device) for _ in range(3))
    with Spy() as spy:
        out, (gx, gr) = grads_of(ops.add_relu, (x, r), grad)
    assert spy.count(ops.prefix + "add_relu") == 1 and spy.count(ops.prefix + "add_relu_backward") == 1
    assert out.is_contiguous(memory_format=fmt)
    eager, (ex, er) = grads_of(lambda a, b: F.relu(a + b), (x, r), grad)
    ref, (rx, rr) = grads_of(lambda a, b: F.relu(a + b), (x.double(), r.double()), grad.double())
    assert_2x(out, eager, ref, dtype, "out")
    assert_2x(gx, ex, rx, dtype, "grad_x")
    assert_2x(gr, er, rr, dtype, "grad_residual")


@pytest.mark.parametrize("family", FAMILIES)
def test_ops_out_and_inplace(family):
    ops = Family(family)
    x, r = rand((2, 3, 4, 4)), rand((2, 3, 4, 4))
    expected = F.relu(x + r)
    out = torch.empty_like(x)
    ops.add_relu_out(x, r, out)
    torch.testing.assert_close(out, expected)
    y = x.clone()
    ops.add_relu_(y, r)
    torch.testing.assert_close(y, expected)
    strided = torch.empty(2, 3, 4, 8)[..., ::2]  # not dense: written through a copy
    ops.add_relu_out(x, r, strided)
    torch.testing.assert_close(strided, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_layouts_follow_x(family):
    ops = Family(family)
    x = rand((2, 8, 3, 3), fmt=torch.channels_last)
    r = rand((2, 8, 3, 3))  # NCHW residual is converted to x's layout
    out = ops.add_relu(x, r)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.relu(x + r))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(family, fmt, device):
    ops = Family(family, device)
    x, r, g = (rand((2, 4, 3, 3), fmt=fmt, device=device) for _ in range(3))
    torch.library.opcheck(ops.add_relu, (x.clone().requires_grad_(), r.clone().requires_grad_()))
    torch.library.opcheck(ops.add_relu_out, (x, r, torch.empty_like(x)))
    torch.library.opcheck(ops.add_relu_, (x.clone(), r))
    torch.library.opcheck(ops.add_relu_backward, (g, ops.add_relu(x, r)))


def test_ext_gradcheck_fp64():
    ops = Family("ext")  # Triton takes no float64
    x, r = (rand((2, 3, 3, 2), torch.float64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(ops.add_relu, (x, r))


@pytest.mark.parametrize("family", FAMILIES)
def test_ops_clear_errors(family):
    ops = Family(family)
    x = rand((2, 4, 3, 3))
    with pytest.raises((RuntimeError, ValueError), match="residual must"):
        ops.add_relu(x, rand((2, 4, 3, 2)))
    with pytest.raises((RuntimeError, ValueError), match="must be float32, float16"):
        ops.add_relu(x.int(), x.int())


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_the_current_stream(family):
    ops = Family(family, "cuda")
    x, r = rand((2, 8, 4, 4), device="cuda"), rand((2, 8, 4, 4), device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ops.add_relu(x, r)
    stream.synchronize()
    torch.testing.assert_close(out, F.relu(x + r))
