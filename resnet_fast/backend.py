"""Backend selection: which implementation runs the fused ops.

"auto"   the fastest correct choice for the tensor's device and dtype
"triton" Triton kernels (CUDA; on CPU tensors under TRITON_INTERPRET=1)
"ext"    the compiled extension resnet_fast._C (C++ on CPU, CUDA on GPU)
"torch"  plain PyTorch ops (always available; the reference)

Chosen by `use_backend(name)` (usable as a plain call or a context manager)
or the RESNET_FAST_BACKEND environment variable, read at import.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import threading

import torch

BACKENDS = ("auto", "triton", "ext", "torch")
ENV_VAR = "RESNET_FAST_BACKEND"


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown resnet_fast backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.lower()


_state = threading.local()
_default = _validate(os.environ.get(ENV_VAR, "auto"))


def get_backend() -> str:
    """The backend requested for this thread ("auto" unless changed)."""
    return getattr(_state, "name", _default)


class use_backend:
    """Select a backend. Takes effect immediately; as a context manager the
    previous choice is restored on exit.

        resnet_fast.use_backend("triton")          # from now on
        with resnet_fast.use_backend("torch"):     # only inside the block
            ...
    """

    def __init__(self, name: str):
        self._name = _validate(name)
        self._previous = get_backend()
        _state.name = self._name

    def __enter__(self):
        return self._name

    def __exit__(self, *exc):
        _state.name = self._previous
        return False


# --- availability ---------------------------------------------------------

@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; Linux only)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break resnet_fast
        return False, f"import triton failed: {exc}"
    import triton as _t
    where = []
    if torch.cuda.is_available():
        where.append("CUDA")
    if interpreter_enabled():
        where.append("CPU via TRITON_INTERPRET=1")
    if not where:
        return False, (f"triton {_t.__version__} is installed but there is no CUDA device; "
                       "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU")
    return True, f"triton {_t.__version__} on {' and '.join(where)}"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def ext_status() -> tuple[bool, str]:
    from .ops import _ext
    return _ext.status()


def torch_status() -> tuple[bool, str]:
    return True, f"torch {torch.__version__}"


def availability() -> dict[str, tuple[bool, str]]:
    return {"triton": triton_status(), "ext": ext_status(), "torch": torch_status()}


# Under torch.compile these are evaluated once while tracing, as constants:
# probing a library is not something to trace.
@torch.compiler.assume_constant_result
def triton_usable(device: torch.device) -> bool:
    if not triton_status()[0]:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


@torch.compiler.assume_constant_result
def ext_usable(device: torch.device) -> bool:
    from .ops import _ext
    return _ext.available(device)


def require(name: str, device: torch.device) -> None:
    """Raise a clear error when an explicitly requested backend cannot run here."""
    if name == "triton" and not triton_usable(device):
        ok, why = triton_status()
        raise RuntimeError(f"resnet_fast backend 'triton' cannot run on {device.type} tensors: {why}")
    if name == "ext" and not ext_usable(device):
        raise RuntimeError(f"resnet_fast backend 'ext' cannot run on {device.type} tensors: {ext_status()[1]}")
