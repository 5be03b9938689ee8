"""The compiled extension resnet_fast._C: what it was built with, where it runs, and how setup.py
finds the CUDA toolkit. (Its ops are tested with the other backends', one file per op in tests/ops.)

Without resnet_fast._C these tests skip, unless RESNET_FAST_REQUIRE_EXT=1 (CI builds the extension
and sets it), where they fail.
"""
from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import pytest
import torch

from resnet_fast.ops import dispatch, ext

OK, WHY = ext.status()
if not OK:
    if os.environ.get("RESNET_FAST_REQUIRE_EXT") == "1":
        raise RuntimeError(f"RESNET_FAST_REQUIRE_EXT=1 but resnet_fast._C is unavailable: {WHY}")
    pytest.skip(f"resnet_fast._C unavailable: {WHY}", allow_module_level=True)


def test_status_describes_build():
    info = ext.build_info()
    assert "cuda" in info
    text = ext.status()[1]
    assert text.startswith("built with CUDA kernels") if info["cuda"] != "none" else "only: built without" in text
    assert ext.available(torch.device("cpu"))


def test_info_names_how_C_was_built():
    info = ext.build_info()
    assert info["torch"] == torch.__version__  # _C links against torch's C++ ABI: the build's own torch
    assert info["compiler"] and info["cpu_flags"]
    assert ("-mavx2" in info["cpu_flags"]) == (platform.machine().lower() in ("x86_64", "amd64"))
    assert (info["cuda"] == "none") == ("archs" not in info)
    summary = ext.build_summary()
    assert f"torch {torch.__version__}" in summary and info["compiler"] in summary
    assert f"{'_C build':>12}: {summary}" in dispatch.explain()


@pytest.mark.skipif("parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's CPU ops do not run on OpenMP here")
def test_cpu_kernels_run_on_torchs_threads():
    # at::parallel_for is inline in ATen's headers: a _C compiled without -fopenmp runs it on one thread
    # (every CPU kernel did, up to 2026-12-03), whatever torch.set_num_threads says.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.resnet_fast._cpu_parallel_threads(64) == 2
        assert "-fopenmp" in ext.build_info()["cpu_flags"]
    finally:
        torch.set_num_threads(before)


def test_arch_compatibility_rule():
    assert ext._arch_runs("8.0", (8, 6)) and not ext._arch_runs("8.0", (9, 0))
    assert ext._arch_runs("9.0+PTX", (10, 0)) and not ext._arch_runs("9.0+PTX", (8, 0))
    assert ext._arch_runs("9.0a", (9, 0)) and not ext._arch_runs("9.0a", (10, 0))


# ---- setup.py: locating the toolkit ------------------------------------------------------

def load_setup():
    spec = importlib.util.spec_from_file_location("rf_setup", Path(__file__).resolve().parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


def fake_toolkit(root: Path, release: str) -> Path:
    home = root / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    (home / "lib64").mkdir()
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return home


def test_setup_follows_nvcc_wrapper_and_checks_versions(tmp_path, monkeypatch):
    setup = load_setup()
    home = fake_toolkit(tmp_path, "12.4")
    wrapper = tmp_path / "bin" / "nvcc"  # like /usr/local/bin/nvcc here: a script, not a symlink
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("RESNET_FAST_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    assert setup.find_cuda_home() == home
    assert setup.nvcc_version(home) == "12.4"

    class FakeTorch:  # torch built with CUDA 13.0 vs a 12.4 toolkit
        __version__ = "2.14.1"

        class version:
            cuda = "13.0"

    with pytest.raises(SystemExit, match="major versions must match"):
        setup.cuda_plan(FakeTorch)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="is not a CUDA toolkit"):
        setup.find_cuda_home()
    monkeypatch.setenv("RESNET_FAST_SKIP_CUDA_BUILD", "1")
    assert setup.cuda_plan(FakeTorch) == (None, "RESNET_FAST_SKIP_CUDA_BUILD is set")
