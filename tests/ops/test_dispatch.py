"""resnet_fast.ops.dispatch: the one routing table, the backend probes, explain(), and how short the
way from a residual block to its kernel is."""
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

import resnet_fast
from _backends import DEVICE, skip_unless_usable
from _numerics import Spy
from resnet_fast.ops import dispatch

CPU = torch.device("cpu")
PACKAGE = str(Path(resnet_fast.__file__).parent)


def test_every_op_has_a_route_for_every_backend():
    for op, routes in dispatch.ROUTES.items():
        assert set(routes) == set(resnet_fast.BACKENDS), op
        for backend, impls in routes.items():
            for impl in (sum(impls.values(), ()) if backend == "auto" else impls):
                assert impl in dispatch.IMPLS, (op, backend, impl)


@pytest.mark.parametrize("op,backend,dtype,expected", [
    ("conv_bias_act", "auto", torch.float32, "onednn"),
    ("conv_bias_act", "auto", torch.float64, "torch"),  # oneDNN takes fp32 and bf16
    ("conv_bias_act", "torch", torch.bfloat16, "onednn"),
    ("conv_bias_act", "triton", torch.float16, "triton"),
    ("conv_bias_act", "ext", torch.float64, "ext"),
    ("grouped_conv_bias_act", "triton", torch.float32, "ext"),  # no Triton grouped conv
    ("bn_act", "auto", torch.float32, "ext"),
    ("add_relu", "auto", torch.float32, "torch"),
    ("max_pool", "auto", torch.float32, "ext"),  # the C++ kernel; the interpreter is never "fastest"
    ("shortcut_pool", "auto", torch.float32, "torch"),
    ("max_pool", "triton", torch.float64, "torch"),  # pools fall back to the module
])
def test_route_on_cpu(op, backend, dtype, expected):
    for impl in ("triton", "ext"):
        if impl in (backend, expected):
            skip_unless_usable(impl, CPU)
    before = dispatch.CALLS[(op, expected)]
    assert dispatch.route(op, CPU, dtype, backend) == expected
    assert dispatch.CALLS[(op, expected)] == before + 1


def test_route_refuses_what_a_backend_cannot_run(monkeypatch):
    skip_unless_usable("triton", CPU)
    with pytest.raises(TypeError, match="backend 'triton' runs bn_act in float16, bfloat16 or float32, got"):
        dispatch.route("bn_act", CPU, torch.float64, "triton")
    monkeypatch.setattr(dispatch, "ext_usable", lambda device: False)
    with pytest.raises(RuntimeError, match="backend 'ext' cannot run on cpu tensors: "):
        dispatch.route("scale_bias_act", CPU, torch.float32, "ext")
    assert dispatch.route("scale_bias_act", CPU, torch.float32, "auto") == "torch"  # auto moves on


def test_explain_is_what_info_prints(capsys):
    from resnet_fast.cli import main
    lines = dispatch.explain()
    assert lines[0].strip().startswith("backend: auto")
    for line, (name, (ok, why)) in zip(lines[1:], dispatch.availability().items()):
        assert line == f"{name:>12}: {'available' if ok else 'unavailable'} - {why}"
    assert main(["info"]) == 0
    assert capsys.readouterr().out.endswith("\n".join(lines) + "\n")
    assert resnet_fast.availability() == dispatch.availability()


# --- from a residual block to its kernel ------------------------------------------------

def _frames_between_block_and_here(stack: list) -> list[str]:
    """resnet_fast frames between the innermost block forward and the end of `stack` (the first: fused.run_block,
    the one description of a block that the module path and the CPU runner both run)."""
    names = [(f.filename, f.name) for f in stack]
    block = max(i for i, (file, name) in enumerate(names) if file.endswith("models/blocks.py") and name == "forward")
    return [name for file, name in names[block + 1:] if file.startswith(PACKAGE)]


def _bottleneck():
    torch.manual_seed(0)
    block = resnet_fast.models.resnet.Bottleneck(16, 4)
    return block.to(DEVICE).to(memory_format=torch.channels_last)


def test_eval_block_reaches_the_triton_launch_in_at_most_5_frames(monkeypatch):
    skip_unless_usable("triton")
    from resnet_fast.ops.triton import conv
    stacks = []
    kernel = conv._conv_bias_act_fwd_kernel

    class Recording:
        def __getitem__(self, grid):
            stacks.append(traceback.extract_stack()[:-1])
            return kernel[grid]

    block, x = _bottleneck().eval(), torch.randn(2, 16, 5, 5, device=DEVICE)
    with torch.no_grad(), resnet_fast.use_backend("triton"):
        block(x)  # the first call of a shape may tune; the steady state is what is measured
        monkeypatch.setattr(conv, "_conv_bias_act_fwd_kernel", Recording())
        block(x)
    assert len(stacks) == 3  # conv1, conv2, conv3
    for stack in stacks:
        frames = _frames_between_block_and_here(stack)
        assert len(frames) <= 5 and frames[0] == "run_block", frames  # run_block: models/fused.py's steps


def test_train_block_reaches_the_extension_bn_op_in_at_most_5_frames():
    skip_unless_usable("ext")
    stacks = []

    class Recording(Spy):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) in ("resnet_fast.bn_act_fwd", "resnet_fast.bn_relu_bits_fwd"):
                stacks.append(traceback.extract_stack()[:-1])
            return super().__torch_dispatch__(func, types, args, kwargs)

    block = _bottleneck().train()
    with Recording(), resnet_fast.use_backend("ext"):
        block(torch.randn(2, 16, 5, 5, device=DEVICE))
    assert len(stacks) == 3
    for stack in stacks:
        frames = _frames_between_block_and_here(stack)
        assert len(frames) <= 5 and frames[0] == "run_block", frames  # run_block: models/fused.py's steps
