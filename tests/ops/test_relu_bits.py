"""The CPU ReLU-mask bits ops (bn_relu_bits_fwd/bwd) and their C++ autograd node.

Eager CPU training runs BN+ReLU through them (ops/bn_act_train.py): the forward saves the ReLU's mask
as bits, the backward reads the bits instead of the output. They must compute exactly what
bn_act_fwd/bn_act_bwd compute (the forward and the masked grads bit for bit) on both ISA variants; the bits must be out > 0 in memory
order; what they cannot run must be a clear error; and the bn_act front must reach them (the C++ node
in the graph) with eager BatchNorm2d+ReLU's gradients, whichever inputs need grad.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from _backends import CPU_ISAS, run_check_on_isa, skip_unless_usable
from resnet_fast.ops.bn_act import bn_act

CL, NCHW = torch.channels_last, torch.contiguous_format
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ULP = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# (shape, layout): AVX-512 Steps of 16 (fp32) / 32 (bf16) lanes, AVX2's of 8 / 16, a scalar tail, NCHW planes.
CASES = [((2, 8, 5, 3), CL), ((2, 24, 4, 5), CL), ((3, 40, 3, 3), CL), ((2, 72, 4, 4), CL),
         ((2, 3, 4, 6), NCHW), ((2, 5, 8, 8), NCHW)]


def _ops():
    return torch.ops.resnet_fast


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    return (t.permute(0, 2, 3, 1) if t.dim() == 4 and t.is_contiguous(memory_format=CL)
            and not t.is_contiguous() else t).reshape(-1)


def packed_positive(out: torch.Tensor) -> torch.Tensor:
    """out > 0 as bits: bit e % 8 of byte e / 8, e in memory order."""
    flat = (_memory_order(out) > 0).to(torch.int32)
    flat = F.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


def check_bits_ops_equal_bn_act_ops() -> int:
    """Every CASES x dtype x residual x weight: the bits ops compute what the bn_act ops do (the forward
    and the mask bit for bit, the backward's sums to an ulp). Returns the cases run."""
    ops, n = _ops(), 0
    for shape, fmt in CASES:
        for dtype in DTYPES.values():
            for residual in (False, True):
                for affine in (False, True):
                    torch.manual_seed(n)
                    x = (torch.randn(shape) * 2 + 0.3).to(dtype=dtype, memory_format=fmt)
                    r = torch.randn(shape).to(dtype=dtype, memory_format=fmt) if residual else None
                    w = torch.rand(shape[1]) + 0.5 if affine else None
                    b = torch.randn(shape[1]) if affine else None
                    out, mean, var = ops.bn_act_fwd(x, w, b, r, 1e-5, True)
                    bout, bmean, bvar, bits = ops.bn_relu_bits_fwd(x, w, b, r, 1e-5)
                    for name, a, e in (("out", bout, out), ("mean", bmean, mean), ("var", bvar, var)):
                        assert torch.equal(a, e), (shape, fmt, dtype, residual, affine, name)
                    assert bout.stride() == out.stride()
                    assert torch.equal(bits, packed_positive(out)), (shape, fmt, dtype, residual, affine, "bits")
                    grad = torch.randn(shape).to(dtype=dtype, memory_format=fmt)
                    for residual_grad in (False, True):
                        want = ops.bn_act_bwd(grad, x, out, w, mean, var, 1e-5, True, residual_grad)
                        got = ops.bn_relu_bits_bwd(grad, x, bits, w, mean, var, 1e-5, residual_grad)
                        case = (shape, fmt, dtype, residual, affine, residual_grad)
                        # grad_r is grad_out under the mask, no arithmetic: equal bit for bit. The sums may
                        # round differently (the compiler contracts a*b+c per instantiation): one ulp.
                        assert torch.equal(got[3], want[3]), (*case, "grad_r")
                        for name, a, e in zip(("grad_x", "grad_w", "grad_b"), got, want):
                            torch.testing.assert_close(a, e, rtol=ULP[a.dtype], atol=1e-6, msg=f"{case} {name}")
                    n += 1
    return n


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_bits_ops_equal_bn_act_ops(isa):
    skip_unless_usable("ext")
    assert run_check_on_isa(isa, __file__, "check_bits_ops_equal_bn_act_ops") == len(CASES) * len(DTYPES) * 4


def test_bits_ops_reject_what_they_cannot_run():
    skip_unless_usable("ext")
    ops = _ops()
    x = torch.randn(2, 12, 3, 3).to(memory_format=CL)
    with pytest.raises(RuntimeError, match="need a channel count that is a multiple of 8, got 12"):
        ops.bn_relu_bits_fwd(x, None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="need a spatial size that is a multiple of 8, got 9"):
        ops.bn_relu_bits_fwd(torch.randn(2, 8, 3, 3), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="take float32, float16 or bfloat16, got Double"):
        ops.bn_relu_bits_fwd(torch.randn(2, 8, 4, 2, dtype=torch.float64), None, None, None, 1e-5)
    x = torch.randn(2, 8, 4, 4).to(memory_format=CL)
    out, mean, var, bits = ops.bn_relu_bits_fwd(x, None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="relu_bits must be bn_relu_bits_fwd's uint8 tensor of 32 bytes"):
        ops.bn_relu_bits_bwd(torch.ones_like(x), x, bits[:-1], None, mean, var, 1e-5, False)
    with pytest.raises(RuntimeError, match="relu_bits must be"):
        ops.bn_relu_bits_bwd(torch.ones_like(x), x, bits.float(), None, mean, var, 1e-5, False)


def test_opcheck_bits_ops():
    skip_unless_usable("ext")
    ops = _ops()
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 4).to(memory_format=CL)
    w, b, r = torch.rand(16) + 0.5, torch.randn(16), torch.randn(2, 16, 3, 4).to(memory_format=CL)
    torch.library.opcheck(ops.bn_relu_bits_fwd, (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                                 b.clone().requires_grad_(), r.clone().requires_grad_(), 1e-5))
    out, mean, var, bits = ops.bn_relu_bits_fwd(x, w, b, r, 1e-5)
    torch.library.opcheck(ops.bn_relu_bits_bwd, (torch.randn_like(out), x, bits, w, mean, var, 1e-5, True))


# (which leaves need grad, affine): the C++ node's needs_input_grad bookkeeping over its optional inputs.
GRAD_CASES = [("x,w,b,r", True), ("x,r", True), ("w,b", True), ("x", False), ("r", False)]


@pytest.mark.parametrize("needs,affine", GRAD_CASES)
def test_front_runs_the_cpp_node_with_eager_gradients(needs, affine):
    skip_unless_usable("ext")
    torch.manual_seed(1)
    shape = (3, 16, 5, 4)
    x = (torch.randn(shape) * 2 + 0.5).to(memory_format=CL)
    r = torch.randn(shape).to(memory_format=CL)
    grad = torch.randn(shape).to(memory_format=CL)
    ours = nn.BatchNorm2d(16, affine=affine)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(ours)
    results = []
    for bn, run in ((ours, lambda x, r, bn: bn_act(x, bn, r, relu=True)),
                    (ref, lambda x, r, bn: F.relu(bn(x) + r))):
        xl, rl = x.clone().requires_grad_("x" in needs), r.clone().requires_grad_("r" in needs)
        if affine:
            bn.weight.requires_grad_("w" in needs)
            bn.bias.requires_grad_("b" in needs)
        with resnet_fast.use_backend("ext"):
            out = run(xl, rl, bn)
        results.append((out, out.grad_fn.name()))
        out.backward(grad)
        results[-1] += (xl.grad, rl.grad, *((bn.weight.grad, bn.bias.grad) if affine else ()))
    (out, node, *got), (eout, _, *want) = results
    assert "BnReluBitsFunction" in node  # the C++ autograd node ran, not the Python Function
    torch.testing.assert_close(out, eout, atol=1e-5, rtol=1e-5)
    for name, a, e in zip(("x", "r", "w", "b"), got, want):
        assert (a is None) == (e is None), name
        if a is not None:
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("fmt,node", [(NCHW, "_BnActBackward"), (CL, "BnReluBitsFunction")])
def test_backward_is_once_differentiable_under_create_graph(fmt, node):
    # Neither eager node has a double backward: under create_graph=True the first-order grads must be
    # right and a second backward through them must raise, not return zeros.
    skip_unless_usable("ext")
    torch.manual_seed(3)
    x = torch.randn(4, 8, 3, 3).to(memory_format=fmt).requires_grad_()
    bn = nn.BatchNorm2d(8)
    with resnet_fast.use_backend("ext"):
        out = bn_act(x, bn, relu=True)
        assert node in out.grad_fn.name()
        (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        (plain,) = torch.autograd.grad(bn_act(x, copy.deepcopy(bn), relu=True).square().sum(), x)
    torch.testing.assert_close(grad, plain)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()
