"""Packaging: the sdist holds everything a build from it needs, and the version has one source.

The sdist is built (setup.py sdist, ~2 s) from a copy of this checkout, so a header missing from
MANIFEST.in fails here rather than in a user's `pip install resnet_fast-*.tar.gz`. .ci/sdist_check then
builds and installs that sdist in a fresh venv for real.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import resnet_fast
from resnet_fast import cli

ROOT = Path(__file__).resolve().parents[1]
GENERATED_HEADER = "resnet_fast_build_info.h"  # setup.py writes it at build time, into build/generated
LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".venv*",
                                    ".pytest_cache", "runs")


def load_setup():
    spec = importlib.util.spec_from_file_location("rf_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[str, str, set[str]]:
    """(the sdist's file name, its PKG-INFO version, the paths it holds relative to its top folder)."""
    work = tmp_path_factory.mktemp("sdist")
    shutil.copytree(ROOT, work / "src", ignore=NOT_SOURCE)
    env = {**os.environ, "RESNET_FAST_SKIP_CUDA_BUILD": "1"}  # an sdist compiles nothing: skip the nvcc probe
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(work / "dist")],
                          cwd=work / "src", env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (archive,) = (work / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        pkg_info = tar.extractfile(next(n for n in names if n.count("/") == 1 and n.endswith("/PKG-INFO")))
        version = re.search(r"^Version: (.+)$", pkg_info.read().decode(), re.M).group(1)
    return archive.name, version, {n.split("/", 1)[1] for n in names}


def compiled_closure(sources: list[str]) -> set[str]:
    """The sources and every header they #include "..." transitively, resolved as the compiler does
    (the includer's folder, then csrc/), as paths relative to the checkout."""
    seen: set[str] = set()
    todo = [ROOT / s for s in sources]
    while todo:
        path = todo.pop()
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        for name in LOCAL_INCLUDE.findall(path.read_text()):
            found = [p for p in (path.parent / name, ROOT / "csrc" / name) if p.is_file()]
            if not found:
                assert name == GENERATED_HEADER, f'{rel} includes "{name}", which is in neither {path.parent} nor csrc/'
                continue
            todo.append(found[0].resolve())
    return seen


def test_sdist_holds_every_file_the_build_compiles(sdist):
    _, _, files = sdist
    setup = load_setup()
    needed = compiled_closure(setup.CPU_SOURCES + setup.CUDA_SOURCES)
    assert {"csrc/ops_impl.h", "csrc/tiling.h", "csrc/cpu/vec.h", "csrc/cpu/kernels.h"} <= needed
    assert not needed - files, f"missing from the sdist: {sorted(needed - files)}"
    in_csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
               if p.suffix in (".cpp", ".h", ".cu", ".cuh")}
    assert not in_csrc - files, f"csrc/ files missing from the sdist: {sorted(in_csrc - files)}"


def test_sdist_holds_license_readme_tests_and_benchmark_scripts(sdist):
    _, _, files = sdist
    # The tests run benchmarks/ scripts (test_static_report.py): the sdist's tests must find them.
    tests = {p.relative_to(ROOT).as_posix()
             for folder in ("tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")}
    assert {"LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in"} <= files
    assert not tests - files, f"tests missing from the sdist: {sorted(tests - files)}"
    assert not [f for f in files if f.endswith(".so") or f.startswith("build/")], "build outputs in the sdist"


def test_version_has_one_source(sdist, capsys):
    name, version, _ = sdist
    assert version == resnet_fast.__version__ and name == f"resnet_fast-{version}.tar.gz"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"resnet-fast {resnet_fast.__version__}"
