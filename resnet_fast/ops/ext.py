"""The "ext" backend: the compiled extension resnet_fast._C, and the eval conv it serves.

Importing this module loads _C (whose library registers the C++/CUDA ops
torch.ops.resnet_fast.*) and registers their fake kernels and autograd, as
pytorch/extension-cpp does. The extension is optional: without it resnet_fast
runs on its Triton and torch paths; the reason is logged once (logger
"resnet_fast") and returned by status(), which `resnet-fast info` prints.
"""
from __future__ import annotations

import logging
import platform
import re

import torch
import torch.nn.functional as F

from .. import fold
from . import _op_meta

log = logging.getLogger("resnet_fast")

BUILD_HINT = "install torch, then run pip install --no-build-isolation -e . in the source checkout"

# Results that cannot change within a process. A plain dict, not lru_cache:
# torch.compile traces through these lookups without warnings.
_cache: dict = {}


def _load() -> tuple[bool, str]:
    if platform.machine().lower() in ("x86_64", "amd64") and not torch.cpu._is_avx2_supported():
        # setup.py compiles the x86 CPU kernels for AVX2: loading them here could crash.
        why = "not loaded: this x86 CPU lacks AVX2, which the extension's CPU kernels are built for"
        log.warning("resnet_fast: C++/CUDA extension %s; using the Triton and torch paths", why)
        return False, why
    try:
        from .. import _C  # noqa: F401  loading the library registers torch.ops.resnet_fast.*
    except ImportError as exc:
        why = f"not built: {exc}; {BUILD_HINT}"
        log.warning("resnet_fast: C++/CUDA extension unavailable (%s); using the Triton and torch paths", why)
        return False, why
    _op_meta.register("")  # fake kernels and autograd for the C++ ops
    _op_meta.register_relu_bits()
    torch.library.register_fake("resnet_fast::max_pool_3x3s2", _max_pool_fake)  # CPU-only, inference-only
    return True, describe(build_info())


def _max_pool_fake(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return torch.empty((n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def build_info() -> dict[str, str]:
    """What setup.py compiled in: cuda (version or "none"), archs, why, cpu, torch, compiler, cpu_flags."""
    if "build_info" not in _cache:
        text = torch.ops.resnet_fast._build_info()
        _cache["build_info"] = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return _cache["build_info"]


def build_summary() -> str:
    """How _C was built, for `resnet-fast info`: torch, CUDA and arches, CPU ISA flags, compiler."""
    info = build_info()
    cuda = "none" if info.get("cuda", "none") == "none" else f"{info['cuda']} for {info.get('archs', '?')}"
    return "; ".join([f"torch {info.get('torch', 'unrecorded')}", f"CUDA {cuda}",
                      f"CPU flags {info.get('cpu_flags', 'unrecorded')}",
                      f"compiler {info.get('compiler', 'unrecorded')}"])


def _sm(arch: str) -> str:
    # "8.0" -> "sm_80", "9.0+PTX" -> "sm_90+PTX"
    return "sm_" + arch.replace(".", "", 1)


def describe(info: dict[str, str]) -> str:
    cpu = f"CPU kernels ({info.get('cpu', 'baseline')})"
    if info.get("cuda", "none") == "none":
        return f"{cpu} only: built without CUDA kernels ({info.get('why', 'reason unknown')})"
    archs = ", ".join(_sm(a) for a in info.get("archs", "").split())
    return f"built with CUDA kernels ({archs}; CUDA {info['cuda']}) and {cpu}"


def status() -> tuple[bool, str]:
    """(whether resnet_fast._C loaded, a human-readable reason)."""
    return _cache["status"]


def cuda_kernels_built() -> bool:
    return status()[0] and torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fast::add_relu", "CUDA")


def _arch_runs(built: str, capability: tuple[int, int]) -> bool:
    # SASS runs on the same major and an equal or newer minor; PTX JIT-compiles
    # for any newer GPU; an "a" arch (9.0a) runs on exactly that GPU.
    m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", built.strip())
    if m is None:
        return False
    arch = (int(m.group(1)), int(m.group(2)))
    if m.group(4):
        return arch <= capability
    if m.group(3):
        return arch == capability
    return arch[0] == capability[0] and arch[1] <= capability[1]


def available(device: torch.device | str) -> bool:
    """Whether the extension can run its ops on tensors of `device`."""
    device = torch.device(device)
    key = ("available", device)
    if key not in _cache:
        _cache[key] = _available(device)
    return _cache[key]


def _available(device: torch.device) -> bool:
    if not status()[0]:
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not cuda_kernels_built() or not torch.cuda.is_available():
        return False
    capability = torch.cuda.get_device_capability(device)
    return any(_arch_runs(a, capability) for a in build_info().get("archs", "").split())


_cache["status"] = _load()


# --- eval: conv + BN (+ residual) (+ ReLU) ----------------------------------------

def _scale_shift(conv, bn, device):
    def build():
        s, t = fold.bn_scale_shift(bn, conv.bias)
        return s.to(device), t.to(device)
    return fold.cached(conv, bn, ("scale_shift", device), build)


def conv_bn_eval(x, conv, bn, residual, relu):
    """torch's conv (cuDNN, oneDNN) on the original weights, then BN + residual + ReLU in one pass."""
    s, t = _scale_shift(conv, bn, x.device)
    y = F.conv2d(x, conv.weight.to(x.dtype), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return torch.ops.resnet_fast.scale_bias_act(y, s, t, residual, relu)
