"""The CPU op for a projection block's end, relu(bn(x) + bn_s(shortcut)): bn2_relu_bits_fwd/bwd, their C++
autograd node, and the front that reaches them (ops.bn_act.bn2_relu, ops.conv_bn.fused_projection_end).

Against an fp64 reference, each op's error must stay within twice that of the two-op path it replaces
(bn_act_fwd for the shortcut, bn_relu_bits_fwd adding it), plus a floor; its statistics and bits must
be exactly the single-BN op's; on both ISA variants. The front must run it in eager CPU training
(the C++ node in the graph) with eager torch's gradients and running statistics, and fall back to
bn_act twice where it cannot run.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from _backends import CPU_ISAS, run_check_on_isa, skip_unless_usable
from resnet_fast.ops import dispatch
from resnet_fast.ops.bn_act import bn2_relu
from test_relu_bits import CASES, CL, DTYPES, NCHW, packed_positive

EPS, SHORTCUT_EPS = 1e-5, 1e-3


def _ref_forward(x, w, b, r, sw, sb):
    """relu(bn(x) + bn_s(r)) in fp64 with batch statistics: the reference."""
    def bn(t, weight, bias, eps):
        t = t.double()
        return F.batch_norm(t, None, None, None if weight is None else weight.double(),
                            None if bias is None else bias.double(), True, 0.0, eps)
    return F.relu(bn(x, w, b, EPS) + bn(r, sw, sb, SHORTCUT_EPS))


def _leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _err(a, e):
    return (a.double() - e).abs().max().item()


def check_bn2_ops_against_the_two_op_path() -> int:
    """Every CASES x dtype x affine pattern: bn2_relu_bits_fwd/bwd vs fp64, no worse than twice the two-op
    path (plus a floor); mean, var and bits exactly the single-BN ops'. Returns the cases run."""
    ops, n = torch.ops.resnet_fast, 0
    for shape, fmt in CASES:
        for dtype in DTYPES.values():
            for main_affine, shortcut_affine in ((False, False), (True, True), (True, False)):
                torch.manual_seed(n)
                x = (torch.randn(shape) * 2 + 0.3).to(dtype=dtype, memory_format=fmt)
                r = (torch.randn(shape) - 0.2).to(dtype=dtype, memory_format=fmt)
                c = shape[1]
                w, b = (torch.rand(c) + 0.5, torch.randn(c)) if main_affine else (None, None)
                sw, sb = (torch.rand(c) + 0.5, torch.randn(c)) if shortcut_affine else (None, None)
                grad = torch.randn(shape).to(dtype=dtype, memory_format=fmt)
                case = (shape, fmt, dtype, main_affine, shortcut_affine)

                out, mean, var, s_mean, s_var, bits = ops.bn2_relu_bits_fwd(x, w, b, EPS, r, sw, sb, SHORTCUT_EPS)
                identity, m2, v2 = ops.bn_act_fwd(r, sw, sb, None, SHORTCUT_EPS, False)
                two_out, m1, v1, two_bits = ops.bn_relu_bits_fwd(x, w, b, identity, EPS)
                for name, a, e in (("mean", mean, m1), ("var", var, v1), ("s_mean", s_mean, m2), ("s_var", s_var, v2)):
                    assert torch.equal(a, e), (*case, name)
                assert out.stride() == two_out.stride() and out.dtype == dtype, case
                assert torch.equal(bits, packed_positive(out)), (*case, "bits")

                leaves = _leaves(x, w, b, r, sw, sb)
                ref = _ref_forward(*leaves)
                floor = 1e-5 if dtype == torch.float32 else 2e-2
                assert _err(out, ref) <= 2 * _err(two_out, ref) + floor, (*case, "out")

                # The reference's grads under the fp64 mask; where the low-precision output rounded to
                # another side of 0 the masks differ, so both paths are compared under their own.
                got = ops.bn2_relu_bits_bwd(grad, bits, x, w, mean, var, EPS, r, sw, s_mean, s_var, SHORTCUT_EPS)
                gx, gw, gb, g_id = ops.bn_relu_bits_bwd(grad, x, two_bits, w, m1, v1, EPS, True)
                gr, gsw, gsb, _ = ops.bn_act_bwd(g_id, r, identity, sw, m2, v2, SHORTCUT_EPS, False, False)
                two = (gx, gw, gb, gr, gsw, gsb)
                want = torch.autograd.grad(ref, [t for t in leaves if t is not None], grad.double())
                want = iter(want)
                for name, a, t, e2 in zip(("x", "w", "b", "r", "sw", "sb"), got, leaves, two):
                    if t is None:
                        continue
                    e = next(want)
                    scale = e.abs().max().item() + 1e-3
                    assert _err(a, e) <= 2 * _err(e2, e) + floor * scale, (*case, "grad", name)
                n += 1
    return n


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_bn2_ops_match_the_two_op_path(isa):
    skip_unless_usable("ext")
    assert run_check_on_isa(isa, __file__, "check_bn2_ops_against_the_two_op_path") == len(CASES) * len(DTYPES) * 3


def test_bn2_ops_reject_what_they_cannot_run():
    skip_unless_usable("ext")
    ops = torch.ops.resnet_fast
    x = torch.randn(2, 8, 4, 4).to(memory_format=CL)
    with pytest.raises(RuntimeError, match="shortcut must have x's shape"):
        ops.bn2_relu_bits_fwd(x, None, None, EPS, x[:1], None, None, EPS)
    with pytest.raises(RuntimeError, match="shortcut must have x's dtype"):
        ops.bn2_relu_bits_fwd(x, None, None, EPS, x.bfloat16(), None, None, EPS)
    with pytest.raises(RuntimeError, match="need a channel count that is a multiple of 8, got 12"):
        y = torch.randn(2, 12, 3, 3).to(memory_format=CL)
        ops.bn2_relu_bits_fwd(y, None, None, EPS, y, None, None, EPS)
    with pytest.raises(RuntimeError, match="shortcut_eps must be >= 0"):
        ops.bn2_relu_bits_fwd(x, None, None, EPS, x, None, None, -1.0)
    with pytest.raises(RuntimeError, match="shortcut_weight must be 1-D with one value per channel"):
        ops.bn2_relu_bits_fwd(x, None, None, EPS, x, torch.ones(3), None, EPS)
    with pytest.raises(RuntimeError, match="more than 1 value per channel, got x of shape"):
        ops.bn2_relu_bits_fwd(x[:1, :, :1, :1], None, None, EPS, x[:1, :, :1, :1], None, None, EPS)
    out, mean, var, s_mean, s_var, bits = ops.bn2_relu_bits_fwd(x, None, None, EPS, x, None, None, EPS)
    with pytest.raises(RuntimeError, match="relu_bits must be bn2_relu_bits_fwd's uint8 tensor of 32 bytes"):
        ops.bn2_relu_bits_bwd(torch.ones_like(x), bits[:-1], x, None, mean, var, EPS, x, None, s_mean, s_var, EPS)
    with pytest.raises(RuntimeError, match="shortcut_var must be 1-D with one value per channel"):
        ops.bn2_relu_bits_bwd(torch.ones_like(x), bits, x, None, mean, var, EPS, x, None, s_mean, s_var[:3], EPS)


def test_opcheck_bn2_ops():
    skip_unless_usable("ext")
    ops = torch.ops.resnet_fast
    torch.manual_seed(0)
    x, r = (torch.randn(2, 16, 3, 4).to(memory_format=CL) for _ in range(2))
    w, b, sw, sb = torch.rand(16) + 0.5, torch.randn(16), torch.rand(16) + 0.5, torch.randn(16)
    grad_args = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(ops.bn2_relu_bits_fwd, (*grad_args, EPS, r.clone().requires_grad_(),
                                                  sw.clone().requires_grad_(), sb.clone().requires_grad_(), EPS))
    out, mean, var, s_mean, s_var, bits = ops.bn2_relu_bits_fwd(x, w, b, EPS, r, sw, sb, EPS)
    torch.library.opcheck(ops.bn2_relu_bits_bwd,
                          (torch.randn_like(out), bits, x, w, mean, var, EPS, r, sw, s_mean, s_var, EPS))


def _bn(c: int, affine: bool, momentum=0.1) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, affine=affine, momentum=momentum)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


# (which leaves need grad, main BN affine, shortcut BN affine): the node's bookkeeping over optional inputs.
GRAD_CASES = [("x,w,b,r,sw,sb", True, True), ("x,r", False, False), ("w,b,sw,sb", True, True),
              ("x,r,sw,sb", False, True), ("r", True, False), ("b,sb", True, True)]


@pytest.mark.parametrize("needs,affine,shortcut_affine", GRAD_CASES)
def test_front_runs_the_cpp_node_with_eager_gradients(needs, affine, shortcut_affine):
    skip_unless_usable("ext")
    torch.manual_seed(1)
    shape = (3, 16, 5, 4)
    x = (torch.randn(shape) * 2 + 0.5).to(memory_format=CL)
    r = torch.randn(shape).to(memory_format=CL)
    grad = torch.randn(shape).to(memory_format=CL)
    ours = (_bn(16, affine), _bn(16, shortcut_affine, momentum=None))  # momentum None: a cumulative average
    ref = copy.deepcopy(ours)
    results = []
    for (bn, sbn), run in ((ours, bn2_relu), (ref, lambda x, bn, r, sbn: F.relu(bn(x) + sbn(r)))):
        xl, rl = x.clone().requires_grad_("x" in needs), r.clone().requires_grad_("r" in needs)
        params = {}
        for prefix, norm in (("", bn), ("s", sbn)):
            if norm.affine:
                params[prefix + "w"], params[prefix + "b"] = norm.weight, norm.bias
        for name, p in params.items():
            p.requires_grad_(name in needs.split(","))
        calls = dispatch.CALLS[("bn2_relu", "ext")]
        with resnet_fast.use_backend("ext"):
            out = run(xl, bn, rl, sbn)
            out = run(xl, bn, rl, sbn)  # twice: the running statistics' second update too
        results.append((out, out.grad_fn.name(), dispatch.CALLS[("bn2_relu", "ext")] - calls))
        out.backward(grad)
        results[-1] += tuple(t.grad for t in (xl, rl, *params.values()))
    (out, node, calls, *got), (eout, _, _, *want) = results
    assert "Bn2ReluBitsFunction" in node and calls == 2  # the C++ node ran, not bn_act twice
    torch.testing.assert_close(out, eout, atol=1e-5, rtol=1e-5)
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    for a, e in zip((*ours[0].buffers(), *ours[1].buffers()), (*ref[0].buffers(), *ref[1].buffers())):
        torch.testing.assert_close(a, e)


def test_backward_is_once_differentiable_under_create_graph():
    skip_unless_usable("ext")
    torch.manual_seed(3)
    x, r = (torch.randn(4, 8, 3, 3).to(memory_format=CL).requires_grad_() for _ in range(2))
    bn, sbn = _bn(8, True), _bn(8, True)
    with resnet_fast.use_backend("ext"):
        out = bn2_relu(x, bn, r, sbn)
        assert "Bn2ReluBitsFunction" in out.grad_fn.name()
        grads = torch.autograd.grad(out.square().sum(), (x, r), create_graph=True)
    plain = torch.autograd.grad(F.relu(copy.deepcopy(bn)(x) + copy.deepcopy(sbn)(r)).square().sum(), (x, r))
    for a, e in zip(grads, plain):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="bn2_relu_bits_fwd has no double backward"):
        grads[0].sum().backward()


@pytest.mark.parametrize("case", ["eval", "nchw_odd", "dtypes", "torch_backend"])
def test_front_falls_back_to_bn_act_twice(case):
    """Where bn2_relu_bits_fwd cannot run, the result is eager torch's all the same."""
    skip_unless_usable("ext")
    torch.manual_seed(4)
    shape, fmt = ((2, 8, 3, 3), NCHW) if case == "nchw_odd" else ((2, 8, 4, 4), CL)
    x, r = (torch.randn(shape).to(memory_format=fmt) for _ in range(2))
    if case == "dtypes":  # bn2_relu_bits_fwd takes one dtype; bn_act promotes (eager's sum does too)
        x = x.bfloat16()
    ours = (_bn(8, True), _bn(8, True))
    for bn in ours:
        bn.train(case != "eval")
    ref = copy.deepcopy(ours)
    calls = dispatch.CALLS[("bn2_relu", "ext")]
    with resnet_fast.use_backend("torch" if case == "torch_backend" else "ext"):
        out = bn2_relu(x, ours[0], r, ours[1])
    assert dispatch.CALLS[("bn2_relu", "ext")] == calls
    tol = 2e-2 if case == "dtypes" else 1e-5
    torch.testing.assert_close(out, F.relu(ref[0](x) + ref[1](r)), atol=tol, rtol=tol)


def test_projection_blocks_of_a_training_resnet_run_it():
    """resnet18's three projection blocks run bn2_relu_bits_fwd in a CPU training step."""
    skip_unless_usable("ext")
    model = resnet_fast.resnet18(num_classes=4).to(memory_format=CL).train()
    calls = dispatch.CALLS[("bn2_relu", "ext")]
    with resnet_fast.use_backend("ext"):
        model(torch.randn(2, 3, 64, 64).to(memory_format=CL)).sum().backward()
    assert dispatch.CALLS[("bn2_relu", "ext")] - calls == 3
    assert all(p.grad is not None for p in model.parameters())
