"""scale_bias_act: act(x * scale[c] + bias[c] (+ residual)), the eval BatchNorm epilogue, on every
backend: the front (autograd, out= and in-place) and both op families against eager PyTorch and a
float64 reference under the 2x rule, with proof of the implementation that ran."""
import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from _backends import (BACKENDS, DEVICES, FAMILIES, FORMATS, Family, cuda_family,
                       every_cuda_tiling, every_family_dtype_layout, skip_unless_usable)
from _numerics import DTYPES, Spy, assert_2x, rand, step
from resnet_fast.ops import dispatch
from resnet_fast.ops.scale_bias_act import scale_bias_act

SHAPE = (1, -1, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_front_on_each_backend(backend):
    skip_unless_usable(backend)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    r, grad = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    scale, bias = (torch.rand(3) + 0.5).requires_grad_(), torch.randn(3, requires_grad=True)
    before = dispatch.CALLS[("scale_bias_act", backend)]
    with resnet_fast.use_backend(backend):
        out, gx, gr = step(lambda a, b: scale_bias_act(a, scale, bias, b), x, r, grad)
        gs, gb = scale.grad.clone(), bias.grad.clone()
        inplace = x.clone()
        with torch.no_grad():
            assert scale_bias_act(inplace, scale, bias, r, out=inplace) is inplace
    assert dispatch.CALLS[("scale_bias_act", backend)] == before + 2
    scale.grad = bias.grad = None
    eout, egx, egr = step(lambda a, b: F.relu(a * scale.view(SHAPE) + bias.view(SHAPE) + b), x, r, grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for got, want in ((out, eout), (gx, egx), (gr, egr), (gs, scale.grad), (gb, bias.grad), (inplace, eout)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@every_family_dtype_layout
def test_ops_parity(family, dtype, fmt, device):
    ops = Family(family, device)
    torch.manual_seed(4)
    x, r = rand((2, 6, 5, 3), dtype, fmt, device), rand((2, 6, 5, 3), dtype, fmt, device)
    scale, bias = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    with Spy() as spy:
        out = ops.scale_bias_act(x, scale, bias, r, True)
    assert spy.count(ops.prefix + "scale_bias_act") == 1
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    eager = F.relu(x * scale.to(dtype).view(SHAPE) + bias.to(dtype).view(SHAPE) + r)
    ref = F.relu(x.double() * scale.double().view(SHAPE) + bias.double().view(SHAPE) + r.double())
    assert_2x(out, eager, ref, dtype, "out")


@every_cuda_tiling(families=["ext"])  # the tiling is the extension's; Triton's kernel is tested above
def test_ops_every_tiling_on_cuda(family, dtype, shape, fmt, path):
    """Out of place and in place (out == x), on each tiling path of the CUDA kernel."""
    ops = cuda_family(family, shape, dtype, fmt, path)
    torch.manual_seed(7)
    x, r = rand(shape, dtype, fmt, "cuda"), rand(shape, dtype, fmt, "cuda")
    scale, bias = torch.rand(shape[1], device="cuda") + 0.5, torch.randn(shape[1], device="cuda")
    out = ops.scale_bias_act(x, scale, bias, r, True)
    eager = F.relu(x * scale.to(dtype).view(SHAPE) + bias.to(dtype).view(SHAPE) + r)
    ref = F.relu(x.double() * scale.double().view(SHAPE) + bias.double().view(SHAPE) + r.double())
    assert out.is_contiguous(memory_format=fmt)
    assert_2x(out, eager, ref, dtype, "out")
    inplace = x.clone(memory_format=fmt)
    ops.scale_bias_act_(inplace, scale, bias, r, True)
    assert torch.equal(inplace, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_ops_out_inplace_and_ndim(family):
    ops = Family(family)
    x = rand((2, 4, 3))  # (N, C, L): any rank >= 2, channel dim 1
    scale, bias = torch.rand(4), torch.randn(4)
    expected = x * scale.view(1, -1, 1) + bias.view(1, -1, 1)
    torch.testing.assert_close(ops.scale_bias_act(x, scale, bias, None, False), expected)
    out = torch.empty_like(x)
    ops.scale_bias_act_out(x, scale, bias, None, True, out)
    torch.testing.assert_close(out, expected.relu())
    ops.scale_bias_act_(x, scale, bias, None, True)
    torch.testing.assert_close(x, expected.relu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(family, fmt, device):
    ops = Family(family, device)
    x, r = (rand((2, 4, 3, 3), fmt=fmt, device=device) for _ in range(2))
    s, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rg = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(ops.scale_bias_act, (rg(x), rg(s), rg(b), rg(r), True))
    torch.library.opcheck(ops.scale_bias_act_out, (x, s, b, None, False, torch.empty_like(x)))
    torch.library.opcheck(ops.scale_bias_act_, (x.clone(), s, b, r, True))


def test_ext_gradcheck_fp64():
    ops = Family("ext")  # Triton takes no float64
    x, r = (rand((2, 3, 3, 2), torch.float64).requires_grad_() for _ in range(2))
    s = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    h = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.scale_bias_act(*a, True), (x, s, h, r))


@pytest.mark.parametrize("family", FAMILIES)
def test_ops_clear_errors(family):
    ops = Family(family)
    with pytest.raises((RuntimeError, ValueError), match="scale must be 1-D"):
        ops.scale_bias_act(rand((2, 4, 3, 3)), torch.ones(3), torch.ones(4), None, True)
