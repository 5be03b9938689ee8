"""The BatchNorm fold cache never serves stale weights, on any backend.

Each eval backend caches its own fold (Triton's and torch's folded weights, oneDNN's prepacked ones,
the extension's scale/shift) keyed by the identity, storage and version of every source tensor:
in-place edits, load_state_dict, an optimizer step, a replaced Parameter and a dtype change must all
show in the next forward, exactly as torchvision computes it.
"""
import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from _backends import BACKENDS, skip_unless_usable
from _models import eval_out, pair, randomize_bn
from _numerics import max_rel_err


@pytest.fixture(params=BACKENDS)
def backend(request):
    skip_unless_usable(request.param)
    with resnet_fast.use_backend(request.param):
        yield request.param


def test_fold_sees_in_place_parameter_and_buffer_changes(backend):
    tv, fast = pair("resnet18", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    eval_out(fast, x)
    with torch.no_grad():
        for m_tv, m_fast in ((tv.layer2[0].conv1, fast.layer2[0].conv1),):
            m_tv.weight.mul_(1.5)
            m_fast.weight.mul_(1.5)
        for bn_tv, bn_fast in ((tv.layer3[1].bn2, fast.layer3[1].bn2),):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn_tv, name).add_(0.3)
                getattr(bn_fast, name).add_(0.3)
    assert max_rel_err(eval_out(fast, x), eval_out(tv, x)) < 1e-5


def test_fold_sees_load_state_dict(backend):
    tv, fast = pair("resnet18", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    eval_out(fast, x)
    other = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=1).eval()
    fast.load_state_dict(other.state_dict())
    assert max_rel_err(eval_out(fast, x), eval_out(other, x)) < 1e-5


def test_fold_sees_train_step_eval_cycle(backend):
    tv, fast = pair("resnet18", num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    before = eval_out(fast, x)
    for model in (tv, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        model(x).logsumexp(1).sum().backward()
        opt.step()
        model.eval()
    after = eval_out(fast, x)
    # The step moves the logits by orders of magnitude; fp32 training-op rounding moves them ~1e-4.
    assert max_rel_err(after, eval_out(tv, x)) < 1e-3
    assert max_rel_err(after, before) > 1


def test_fold_sees_replaced_parameter_and_dtype_change(backend):
    tv, fast = pair("resnet18", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    eval_out(fast, x)
    w = torch.randn_like(tv.conv1.weight)
    tv.conv1.weight = nn.Parameter(w.clone())
    fast.conv1.weight = nn.Parameter(w.clone())
    assert max_rel_err(eval_out(fast, x), eval_out(tv, x)) < 1e-5
    dtype, tol = (torch.float16, 1e-2) if backend == "triton" else (torch.float64, 1e-10)  # Triton: no fp64
    fast.to(dtype)
    assert max_rel_err(eval_out(fast, x.to(dtype)), eval_out(tv.double(), x.double())) < tol


def test_fold_cache_hits_when_nothing_changes(backend):
    from resnet_fast import fold
    _, fast = pair("resnet18", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    eval_out(fast, x)
    misses = fold.STATS["misses"]
    eval_out(fast, x)
    assert fold.STATS["misses"] == misses
