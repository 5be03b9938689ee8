"""Small-batch inference without host overhead: resnet_fast.cuda_graphed, and torch.compile(mode=
"reduce-overhead") over every resnet_fast custom op.

On CPU: every op of each family compiles with mode="reduce-overhead" and fullgraph=True (no graph
break) and matches eager; cuda_graphed refuses what it cannot capture. On a GPU (gpu-marked): the same
ops really run as CUDA-graph replays, and whole models under cuda_graphed and reduce-overhead match
eager resnet_fast bitwise.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from _backends import DEVICES, Family

CL = torch.channels_last


def _inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.contiguous(memory_format=CL) if t.dim() == 4 else t

    c = 8
    return dict(x=rand(2, c, 6, 6), r=rand(2, c, 6, 6), w=rand(c, c, 3, 3, scale=c ** -1.5),
                b=rand(c).float(), scale=rand(c).float().abs() + 0.5, shift=rand(c).float(),
                fc_w=rand(5, c, scale=c ** -0.5), fc_b=rand(5).float())


def _every_op(ops, triton: bool):
    """One call of every op of the family (the ext family: its C++ ops; triton: also the conv and pools)."""
    def run(x, r, w, b, scale, shift, fc_w, fc_b):
        y = ops.scale_bias_act(x, scale, shift, r, True)
        added = ops.add_relu(y, r)
        out = torch.empty_like(added)
        ops.add_relu_out(y, r, out)
        ops.add_relu_(out, r)
        ops.scale_bias_act_(out, scale, shift, None, False)
        out2 = torch.empty_like(out)
        ops.scale_bias_act_out(out, scale, shift, r, True, out2)
        grad = ops.add_relu_backward(out2, added)
        bn, mean, var = ops.bn_act_fwd(out2, scale, shift, r, 1e-5, True)
        grads = ops.bn_act_bwd(grad, out2, bn, scale, mean, var, 1e-5, True, True)
        running_mean, running_var = torch.zeros_like(mean), torch.ones_like(var)
        ops.bn_update_stats_(running_mean, running_var, mean, var, 0.1, 72)
        results = [bn, *grads, running_mean, running_var]
        if triton:
            conv = ops.conv_bias_act(bn, w, b, r, [1, 1], [1, 1], [1, 1], True)
            results += [conv, ops.max_pool_3x3s2(conv), ops.avg_pool_fc(ops.avg_pool_2x2_ceil(conv), fc_w, fc_b)]
        return results
    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["ext", "triton"])
def test_every_custom_op_under_reduce_overhead(family, device):
    ops = Family(family, device)
    fn = _every_op(ops, family == "triton")
    args = _inputs(device)
    with torch.no_grad():
        eager = fn(**args)
        torch._dynamo.reset()
        from torch._dynamo.utils import counters
        counters.clear()
        compiled = torch.compile(fn, fullgraph=True, mode="reduce-overhead")  # raises on a graph break
        for _ in range(3):  # CUDA: warm-up, record, replay
            got = [t.clone() for t in compiled(**args)]
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    if device == "cuda":
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_cuda_graphed_refuses_what_it_cannot_capture():
    model = resnet_fast.resnet18(num_classes=4)
    with pytest.raises(ValueError, match="must be in eval"):
        resnet_fast.cuda_graphed(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="example must be a CUDA tensor"):
        resnet_fast.cuda_graphed(model.eval(), torch.randn(1, 3, 8, 8))


# --- on a GPU -------------------------------------------------------------------------------

def _fast_model(arch="resnet18", dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = getattr(resnet_fast, arch)(num_classes=10).eval()
    return model.to("cuda", dtype, memory_format=CL)


def _images(seed, batch=1, size=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to("cuda", dtype).contiguous(memory_format=CL)


@pytest.mark.gpu
def test_cuda_graphed_replays_eager_resnet_fast():
    model = _fast_model()
    graphed = resnet_fast.cuda_graphed(model, _images(0))
    with torch.inference_mode():
        for seed in (1, 2):
            x = _images(seed)
            got = graphed(x).clone()
            # The same kernels and tuned choices, no atomics: the replay is bitwise eager.
            assert torch.equal(got, model(x))
    with pytest.raises(ValueError, match="captured for input"):
        graphed(_images(3, batch=2))
    with torch.no_grad():
        model.fc.bias.add_(1)
    with pytest.raises(RuntimeError, match="parameters or buffers changed"):
        graphed(_images(1))


@pytest.mark.gpu
def test_an_untuned_shape_inside_a_capture_is_a_clear_error():
    from resnet_fast.ops.triton import conv
    x = torch.randn(3, 24, 13, 11, device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    w, b = torch.randn(40, 24, 3, 3, device="cuda", dtype=torch.float16), torch.randn(40, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="was not tuned before CUDA graph capture"):
        with torch.cuda.graph(graph):
            conv.conv_bias_act(x, w, b, None, 1, 1, 1, True)


@pytest.mark.gpu
def test_reduce_overhead_model_matches_eager_resnet_fast():
    model = _fast_model()
    eager_model = copy.deepcopy(model)
    with torch.inference_mode():
        torch._dynamo.reset()
        compiled = torch.compile(model, mode="reduce-overhead")
        for seed in range(3):  # warm-up (tunes), record, replay
            got = compiled(_images(seed)).clone()
        want = eager_model(_images(2))
    # Same kernels and folds; inductor may compute the BN fold (fp32, then rounded) in another order.
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert F.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0) > 0.9999
