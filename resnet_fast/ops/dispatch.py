"""Which implementation runs each fused op: the one routing table, the backend probes, explain().

A user asks for a backend (resnet_fast.use_backend / RESNET_FAST_BACKEND): "auto", "triton", "ext" or
"torch". An op runs on one of these implementations:

  triton  resnet_fast.ops.triton: Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1)
  ext     resnet_fast.ops.ext: the compiled extension _C (C++ kernels on CPU, CUDA kernels on CUDA)
  onednn  resnet_fast.ops.onednn: oneDNN's fused conv on prepacked weights (CPU; the "torch" backend)
  torch   resnet_fast.ops.reference: plain PyTorch composites (always available; the reference)

route() walks ROUTES[op][backend] ("auto": per device type) and returns the first implementation
that runs on the tensor's device and takes its dtype. An explicitly requested backend that cannot run
on the device raises, as does a dtype none of its implementations takes. Every decision is counted in
CALLS[(op, implementation)], so tests can prove which path ran.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections import Counter
from typing import Optional

import torch

from ..backend import get_backend

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# What each implementation can run: (backend whose probe it needs, dtypes (None: any float), grouped convs).
IMPLS = {
    "triton": ("triton", (F16, BF16, F32), False),
    "ext": ("ext", None, True),
    "onednn": ("torch", (F32, BF16), True),
    "torch": ("torch", None, True),
}

# op -> requested backend -> implementations in order of preference ("auto": per device type).
#   cpu  "auto" rows measured with benchmarks/bench_ops.py on a 2-core VM (quiet machine, clean commit:
#        benchmarks/results/ops_cpu_2026-11-27_at_3c6ddfe.json, 2 threads): scale_bias_act: ext beats
#        eager 8/8 (1.5-2x); bn_act forward: ext beats eager 6/8 (fp32 2-2.8x, bf16 about even); bn_act
#        forward+backward (what training runs): ext wins 4/8 (fp32 NCHW up to 1.6x), eager ahead on most
#        bf16 shapes: mixed, ext kept as the fp32 winner; add_relu: eager ahead 8/8, so torch. bn_act in a
#        whole training step (what the "auto" CPU row is for): README's CPU training table, 2026-12-03
#        at 2ab36ad (AVX-512 CPU, the kernels' AVX-512 variant, channels_last inside, the ReLU mask as bits):
#        0.96-1.05x eager channels_last, below 1.00x only resnet50 fp32 batch 8. Every C++ CPU figure before
#        2026-12-03's -fopenmp build ran the kernels on one thread (at::parallel_for compiled without
#        OpenMP) against 2-thread eager ops: the per-op rows above are from that build. (The
#        earlier ops_cpu_2026-11-27{,_1thread,_add_relu_2thread_rerun}.json ran under heavy load on the
#        uncommitted extension; their "commit" field predates it.) The Triton interpreter is never a choice.
#   cuda "auto" rows are NOT MEASURED YET (no GPU in the sessions that wrote this): a GPU session runs
#        `python benchmarks/bench_ops.py --device cuda` and reorders them to what it measures.
_ELEMENTWISE = {"triton": ("triton",), "ext": ("ext",), "torch": ("torch",)}
_POOL = {"auto": {"cuda": ("triton", "torch")}, "triton": ("triton", "torch"), "ext": ("torch",),
         "torch": ("torch",)}
ROUTES: dict[str, dict] = {
    # eval: conv with BN folded in, + bias (+ residual) (+ ReLU)
    "conv_bias_act": {"auto": {"cuda": ("triton", "ext", "torch"), "cpu": ("onednn", "torch")},
                      "triton": ("triton",), "ext": ("ext",), "torch": ("onednn", "torch")},
    # grouped convs (ResNeXt) have no Triton kernel: cuDNN + the extension's epilogue
    "grouped_conv_bias_act": {"auto": {"cuda": ("ext", "torch"), "cpu": ("onednn", "torch")},
                              "triton": ("ext", "torch"), "ext": ("ext",), "torch": ("onednn", "torch")},
    # train: BatchNorm (batch statistics) (+ residual) (+ ReLU), forward and backward
    "bn_act": {"auto": {"cpu": ("ext", "torch"), "cuda": ("ext", "triton", "torch")}, **_ELEMENTWISE},
    "add_relu": {"auto": {"cpu": ("torch",), "cuda": ("ext", "triton", "torch")}, **_ELEMENTWISE},
    "scale_bias_act": {"auto": {"cpu": ("ext", "torch"), "cuda": ("ext", "triton", "torch")}, **_ELEMENTWISE},
    # the stem max-pool, ResNet-D's shortcut avg-pool, global avg-pool + fc; "torch" calls the modules
    # CPU: the extension's channels_last fp32 kernel (ops/pool.py says when it applies)
    "max_pool": {**_POOL, "auto": {"cuda": ("triton", "torch"), "cpu": ("ext", "torch")}},
    "shortcut_pool": _POOL,
    "avgpool_fc": _POOL,
}

CALLS: Counter = Counter()


# --- availability: one probe per backend ------------------------------------------

def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; Linux only)"
    try:
        import triton
    except Exception as exc:  # a broken install must not break resnet_fast
        return False, f"import triton failed: {exc}"
    where = []
    if torch.cuda.is_available():
        where.append("CUDA")
    if interpreter_enabled():
        where.append("CPU via TRITON_INTERPRET=1")
    if not where:
        return False, (f"triton {triton.__version__} is installed but there is no CUDA device; "
                       "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU")
    return True, f"triton {triton.__version__} on {' and '.join(where)}"


def ext_status() -> tuple[bool, str]:
    from . import ext  # loads resnet_fast._C on first use
    return ext.status()


def torch_status() -> tuple[bool, str]:
    return True, f"torch {torch.__version__}"


def availability() -> dict[str, tuple[bool, str]]:
    """{backend: (whether it can run here, why)} for "triton", "ext" and "torch"."""
    return {"triton": triton_status(), "ext": ext_status(), "torch": torch_status()}


def explain() -> list[str]:
    """What `resnet-fast info` prints about the backends: the selected one, and why each can or cannot run."""
    lines = [f"{'backend':>12}: {get_backend()} (set with resnet_fast.use_backend or RESNET_FAST_BACKEND)"]
    for name, (ok, why) in availability().items():
        lines.append(f"{name:>12}: {'available' if ok else 'unavailable'} - {why}")
    if ext_status()[0]:
        from . import ext
        lines.append(f"{'_C build':>12}: {ext.build_summary()}")
    if torch.backends.mkldnn.is_available():
        from . import onednn
        bf16 = ("bf16 natively" if onednn.compute_dtype(BF16) == BF16
                else "bf16 computed in fp32 (this CPU has no oneDNN bf16 kernels: they need AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
        lines.append(f"{'oneDNN':>12}: CPU eval convs of the auto and torch backends: fp32, {bf16}")
    return lines


# Under torch.compile these are evaluated once while tracing, as constants: probing a library is not
# something to trace.
@torch.compiler.assume_constant_result
def triton_usable(device: torch.device) -> bool:
    if not triton_status()[0]:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


@torch.compiler.assume_constant_result
def ext_usable(device: torch.device) -> bool:
    from . import ext
    return ext.available(device)


@torch.compiler.assume_constant_result
def onednn_usable(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def backend_usable(backend: str, device: torch.device) -> bool:
    if backend == "triton":
        return triton_usable(device)
    return ext_usable(device) if backend == "ext" else True


def require(backend: str, device: torch.device) -> None:
    """Raise a clear error when an explicitly requested backend cannot run on this device."""
    if not backend_usable(backend, device):
        why = (triton_status() if backend == "triton" else ext_status())[1]
        raise RuntimeError(f"resnet_fast backend {backend!r} cannot run on {device.type} tensors: {why}")


def usable(impl: str, device: torch.device, dtype: torch.dtype, grouped: bool = False) -> bool:
    """Whether implementation `impl` can run this case here."""
    backend, dtypes, runs_grouped = IMPLS[impl]
    if (dtypes is not None and dtype not in dtypes) or (grouped and not runs_grouped):
        return False
    return onednn_usable(device) if impl == "onednn" else backend_usable(backend, device)


# --- routing -------------------------------------------------------------------------

def route(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None,
          count: bool = True) -> str:
    """The implementation that runs `op` on tensors of this device and dtype (counted in CALLS).

    backend: the requested backend (default: the thread's, see resnet_fast.use_backend).
    count: False for a caller that counts its calls itself."""
    requested = backend or get_backend()
    routes = ROUTES[op][requested]
    if requested == "auto":
        routes = routes.get(device.type, ("torch",))
    else:
        require(requested, device)
    grouped = op == "grouped_conv_bias_act"
    for impl in routes:
        if usable(impl, device, dtype, grouped):
            CALLS[(op, impl)] += count
            return impl
    raise TypeError(f"resnet_fast backend {requested!r} runs {op} in {_names(IMPLS[routes[0]][1])}, got {dtype}")


def _names(dtypes) -> str:
    *rest, last = [str(d).replace("torch.", "") for d in dtypes]
    return f"{', '.join(rest)} or {last}" if rest else last


def op(impl: str, name: str):
    """The registered op `name` of an op family: torch.ops.resnet_fast.<name> (ext) or .triton_<name>."""
    if impl == "triton":
        from . import triton  # noqa: F401  registers the Triton ops
        name = "triton_" + name
    else:
        from . import ext  # noqa: F401  loads _C, which registers the C++ ops
    return getattr(torch.ops.resnet_fast, name)


@functools.cache
def eager_op(impl: str, name: str):
    """op(impl, name), resolved once: for eager hot paths (op costs ~20 us a call). Traced code calls op."""
    return op(impl, name)
