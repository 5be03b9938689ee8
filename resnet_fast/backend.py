"""Backend selection: which implementation runs the fused ops.

"auto"   the fastest correct choice for the tensor's device and dtype
"triton" Triton kernels (CUDA; on CPU tensors under TRITON_INTERPRET=1)
"ext"    the compiled extension resnet_fast._C (C++ on CPU, CUDA on GPU)
"torch"  plain PyTorch ops (always available; the reference)

Chosen by `use_backend(name)` (usable as a plain call or a context manager)
or the RESNET_FAST_BACKEND environment variable, read at import. Which
implementation then runs each op: resnet_fast.ops.dispatch.
"""
from __future__ import annotations

import os
import threading

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

