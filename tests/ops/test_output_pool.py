"""The CPU output pool (csrc/cpu/output_pool.cpp): freed outputs of the extension's CPU ops from 1 MiB up
are kept and handed to the next output of their size, so a training step's outputs land on pages already
mapped instead of faulting in fresh ones. A reused buffer must hold only the new result, the idle bytes
must stay under RESNET_FAST_CPU_POOL_MB (0: off), and a bad value must be a clear error.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import resnet_fast
from _backends import skip_unless_usable

CL = torch.channels_last
BIG = (4, 64, 32, 32)  # 1 MiB of fp32


@pytest.fixture(autouse=True)
def _ext():
    skip_unless_usable("ext", torch.device("cpu"))
    torch.ops.resnet_fast._cpu_output_pool_release()


def _stats() -> dict[str, int]:
    idle, idle_bytes, reused, fresh, cap = torch.ops.resnet_fast._cpu_output_pool_stats()
    return {"idle": idle, "idle_bytes": idle_bytes, "reused": reused, "fresh": fresh, "cap": cap}


def _add_relu(x, r):
    return torch.ops.resnet_fast.add_relu(x, r)


def test_a_freed_output_is_reused_and_holds_only_the_new_result():
    x, r = torch.randn(BIG).contiguous(memory_format=CL), torch.randn(BIG).contiguous(memory_format=CL)
    before = _stats()
    out = _add_relu(x, r)
    ptr = out.data_ptr()
    del out
    assert _stats()["idle"] == 1 and _stats()["fresh"] == before["fresh"] + 1
    x2, r2 = -x, r + 1  # a different result: stale values from the first output would show
    out2 = _add_relu(x2, r2)
    assert out2.data_ptr() == ptr
    assert _stats()["reused"] == before["reused"] + 1 and _stats()["idle"] == 0
    torch.testing.assert_close(out2, torch.relu(x2 + r2), rtol=0, atol=0)
    assert out2.is_contiguous(memory_format=CL)


def test_the_most_recently_freed_buffer_is_handed_out_first():
    # The last one freed is the likeliest to still be in cache for its next writer.
    x = torch.randn(BIG).contiguous(memory_format=CL)
    older, newer = _add_relu(x, x), _add_relu(x, -x)
    older_ptr, newer_ptr = older.data_ptr(), newer.data_ptr()
    del older
    del newer
    assert _stats()["idle"] == 2
    first = _add_relu(x, x)
    second = _add_relu(x, x)
    assert (first.data_ptr(), second.data_ptr()) == (newer_ptr, older_ptr)


def test_small_outputs_bypass_the_pool():
    before = _stats()
    x = torch.randn(2, 8, 4, 4)
    for _ in range(3):
        _add_relu(x, x)
    assert _stats() == before


def test_release_frees_the_idle_buffers():
    x = torch.randn(BIG)
    _add_relu(x, x)
    assert _stats()["idle"] == 1 and _stats()["idle_bytes"] >= x.numel() * 4
    torch.ops.resnet_fast._cpu_output_pool_release()
    assert _stats()["idle"] == 0 and _stats()["idle_bytes"] == 0


def test_a_pooled_output_can_grow():
    x = torch.randn(BIG)
    out = _add_relu(x, x)
    expected = torch.relu(x + x).reshape(-1)
    out = out.reshape(-1).resize_(3 * x.numel())  # resize_ reallocates through the storage's allocator
    torch.testing.assert_close(out[: x.numel()], expected, rtol=0, atol=0)


def test_training_steps_reuse_their_outputs():
    model = resnet_fast.resnet18(num_classes=10).to(memory_format=CL)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=CL)  # stem output 4x64x32x32: 1 MiB
    y = torch.randint(0, 10, (4,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    first = _stats()
    assert first["fresh"] > 0
    step()
    second = _stats()
    assert second["fresh"] == first["fresh"]  # every large output of step 2 got a buffer from step 1
    assert second["reused"] > first["reused"]


def _run(env_value: str) -> subprocess.CompletedProcess:
    code = ("import torch, resnet_fast\n"
            "x = torch.randn(4, 80, 32, 32)\n"
            "for _ in range(3): torch.ops.resnet_fast.add_relu(x, x)\n"
            "print(list(torch.ops.resnet_fast._cpu_output_pool_stats()))\n")
    env = {**os.environ, "RESNET_FAST_CPU_POOL_MB": env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_the_idle_cap_is_the_environment_variable():
    # 1 MiB cap: a 1.25 MiB output is over it, so it is freed, never kept.
    idle, idle_bytes, reused, fresh, cap = eval(_run("1").stdout.strip().splitlines()[-1])
    assert cap == 1 << 20 and idle == 0 and idle_bytes == 0 and reused == 0 and fresh == 3
    # 0: off, every output from malloc.
    idle, idle_bytes, reused, fresh, cap = eval(_run("0").stdout.strip().splitlines()[-1])
    assert cap == 0 and (idle, idle_bytes, reused, fresh) == (0, 0, 0, 0)


def test_a_bad_cap_is_a_clear_error():
    result = _run("lots")
    assert result.returncode != 0
    assert "RESNET_FAST_CPU_POOL_MB must be a whole number of MiB >= 0" in result.stderr
