"""Where a result came from: device, library versions and git commit.

Shared by `resnet-fast bench`, `train` and `info`, so every record names the
same facts the same way. Versions of triton/torchvision are read from package
metadata, not by importing them: importing triton here would freeze its
TRITON_INTERPRET setting before the caller had a chance to choose it.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

import torch

_SOURCE_DIR = Path(__file__).resolve().parent


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: Union[str, torch.device, None] = None) -> str:
    """"NVIDIA H100 80GB HBM3" for a CUDA device, the CPU model for "cpu".

    None means the best device present (CUDA if available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_model()
    return device.type


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(_SOURCE_DIR), *args], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, no commits yet
        return None
    return out.stdout.strip()


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """HEAD of the checkout resnet_fast is imported from, or "unknown" (e.g. a wheel install)."""
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> Optional[bool]:
    """Whether the package's source differs from the commit: edited or new files under
    resnet_fast/ (None when it is not a git checkout)."""
    if git_commit() == "unknown":
        return None
    status = _git("status", "--porcelain", "--", ".")
    return None if status is None else bool(status)


def collect(device: Union[str, torch.device, None] = None) -> dict:
    """Facts about this machine and software stack, JSON-serialisable.

    device selects which device's name goes under "device" (default: the best
    one present); the CPU model is always reported under "cpu"."""
    cuda = torch.cuda.is_available()
    return {
        "device": device_name(device),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        # The CUDA/cuDNN torch was built against (also reported on a machine with no GPU).
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "commit": git_commit(),
        "dirty": git_dirty(),
    }
