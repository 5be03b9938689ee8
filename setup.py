"""Build resnet_fast and, when torch is importable, its extension resnet_fast._C.

    pip install --no-build-isolation -e .     # editable, builds _C in place
    pip wheel --no-build-isolation --no-deps .  # a wheel holding _C (an sdist builds the same way)
    pip install .                            # build isolation hides torch: pure-Python package

The CPU kernels are always built; the CUDA kernels when nvcc and a CUDA build
of torch are found. Environment:
    RESNET_FAST_SKIP_CUDA_BUILD=1   CPU kernels only
    TORCH_CUDA_ARCH_LIST            e.g. "9.0"; default: the visible GPUs, else "8.0;9.0+PTX"
    CUDA_HOME / CUDA_PATH           toolkit root (else the real nvcc's, else /usr/local/cuda)
    MAX_JOBS                        parallel compile jobs (ninja)
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCHS = "8.0;9.0+PTX"
# avx512.cpp recompiles the BN/elementwise kernels for AVX-512 and must stay last (see its header).
CPU_SOURCES = ["csrc/ops.cpp", "csrc/cpu/elementwise.cpp", "csrc/cpu/batch_norm.cpp", "csrc/cpu/pool.cpp",
               "csrc/cpu/isa.cpp", "csrc/cpu/output_pool.cpp", "csrc/cpu/avx512.cpp"]
CUDA_SOURCES = ["csrc/cuda/ops.cu"]
GENERATED = ROOT / "build" / "generated"


def say(msg: str) -> None:
    print(f"resnet_fast setup: {msg}", file=sys.stderr, flush=True)


# --- locating the CUDA toolkit ------------------------------------------------

def follow_wrapper(path: str) -> str:
    """The real nvcc behind symlinks and `exec /x/bin/nvcc "$@"` wrapper scripts."""
    seen = set()
    path = os.path.realpath(path)
    while path not in seen:
        seen.add(path)
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            break
        if not head.startswith(b"#!"):
            break
        match = re.search(rb"(/[^\s\"'$]*/bin/nvcc)(?![\w.])", head)
        if match is None:
            break
        path = os.path.realpath(match.group(1).decode())
    return path


def is_cuda_home(home: Path) -> bool:
    has_lib = (home / "lib64").is_dir() or any(home.glob("targets/*/lib"))
    return (home / "bin" / "nvcc").is_file() and has_lib


def find_cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            home = Path(value)
            if not is_cuda_home(home):
                raise SystemExit(f"resnet_fast setup: {var}={value} is not a CUDA toolkit "
                                 "(expected bin/nvcc and lib64/ or targets/*/lib/)")
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = Path(follow_wrapper(nvcc)).parent.parent
        if is_cuda_home(home):
            return home
    home = Path("/usr/local/cuda")
    return home.resolve() if is_cuda_home(home) else None


def nvcc_version(home: Path) -> str:
    out = subprocess.check_output([str(home / "bin" / "nvcc"), "--version"], text=True)
    match = re.search(r"release (\d+\.\d+)", out)
    if match is None:
        raise SystemExit(f"resnet_fast setup: cannot read the CUDA version from {home}/bin/nvcc --version")
    return match.group(1)


def default_arch_list(torch) -> str:
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return DEFAULT_ARCHS


def cuda_plan(torch) -> tuple[Path | None, str]:
    """(toolkit root or None, why the CUDA kernels are or are not built)."""
    if os.environ.get("RESNET_FAST_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return None, "RESNET_FAST_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    home = find_cuda_home()
    if home is None:
        return None, "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    found = nvcc_version(home)
    if found.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise SystemExit(
            f"resnet_fast setup: nvcc in {home} is CUDA {found} but torch {torch.__version__} was "
            f"built with CUDA {torch.version.cuda}; their major versions must match. Point CUDA_HOME "
            f"at a CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or set "
            "RESNET_FAST_SKIP_CUDA_BUILD=1 to build the CPU kernels only.")
    return home, f"nvcc {found} at {home}"


# --- the extension --------------------------------------------------------------

def write_build_info(lines: dict[str, str]) -> None:
    """A header ops.cpp compiles in, one key=value a line; resnet_fast.ops.ext reads it back via _build_info()."""
    text = "\n".join(f"{k}={' '.join(str(v).split())}" for k, v in lines.items())
    literal = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    GENERATED.mkdir(parents=True, exist_ok=True)
    header = GENERATED / "resnet_fast_build_info.h"
    content = f'#pragma once\n#define RESNET_FAST_BUILD_INFO "{literal}"\n'
    if not header.exists() or header.read_text() != content:  # unchanged: no rebuild
        header.write_text(content)


def compiler_version() -> str:
    """The first line of `$CXX --version`: torch.utils.cpp_extension compiles with $CXX (default c++)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cxx} (--version failed: {exc})"
    return out.splitlines()[0] if out.strip() else f"{cxx} (--version printed nothing)"


def built_with(torch, cxx_flags: list[str]) -> dict[str, str]:
    """What `resnet-fast info` reports about every build: torch, compiler, CPU ISA flags."""
    isa = [f for f in cxx_flags if f.startswith(("-m", "-DCPU_CAPABILITY")) or f == "-fopenmp"]
    return {"torch": torch.__version__, "compiler": compiler_version(), "cpu_flags": " ".join(isa) or "none"}


def cpu_simd_flags() -> list[str]:
    """x86-64: AVX2/FMA/F16C, and at::vec's AVX2 implementation (without CPU_CAPABILITY_AVX2
    at::vec::Vectorized is a plain array, several times slower). resnet_fast.ops._ext
    refuses to load the library on an x86 CPU without AVX2."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def openmp_flags(torch) -> list[str]:
    """-fopenmp where torch's own CPU ops run on OpenMP (its Linux builds). at::parallel_for is inline
    in ATen's headers: a file compiled without OpenMP runs every parallel_for on one thread. Linking
    with -fopenmp names libgomp.so.1, the library torch has already loaded."""
    if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def extension_setup() -> dict:
    try:
        import torch
    except ImportError as exc:
        say(f"torch is not importable ({exc}): building the pure-Python package without "
            "resnet_fast._C. To build the C++/CUDA kernels, install torch first and run "
            "pip install --no-build-isolation .")
        return {}

    home, why = cuda_plan(torch)
    if home is not None:
        os.environ["CUDA_HOME"] = str(home)  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(torch))
    from torch.utils import cpp_extension

    include_dirs = [str(ROOT / "csrc"), str(GENERATED)]
    # -g0: Python's CFLAGS carry -g, which only slows the build and bloats the library.
    openmp = openmp_flags(torch)
    cxx_flags = ["-O3", "-g0", "-Wno-unknown-pragmas", *openmp, *cpu_simd_flags()]
    cpu_label = "avx2" if cpu_simd_flags() else "baseline"
    if home is None:
        say(f"building CPU kernels only: {why}")
        write_build_info({"cuda": "none", "why": why, "cpu": cpu_label, **built_with(torch, cxx_flags)})
        ext = cpp_extension.CppExtension(
            "resnet_fast._C", CPU_SOURCES, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)
    else:
        cpp_extension.CUDA_HOME = str(home)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        say(f"building CPU and CUDA kernels: {why}, TORCH_CUDA_ARCH_LIST={archs}")
        write_build_info({"cuda": torch.version.cuda, "archs": archs.replace(";", " "),
                          "why": why, "cpu": cpu_label, **built_with(torch, cxx_flags)})
        ext = cpp_extension.CUDAExtension(
            "resnet_fast._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]}, extra_link_args=openmp)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


if __name__ == "__main__":  # setuptools runs setup.py as __main__; tests import its helpers
    setup(**extension_setup())
