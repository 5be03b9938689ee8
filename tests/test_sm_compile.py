"""Every Triton kernel variant compiles to sm_80 and sm_90 cubin; the TMA candidates use TMA (no GPU needed)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_compile_for_sm80_and_sm90():
    """Full Triton -> PTX -> cubin compile of every kernel variant, in a subprocess: this process runs
    Triton in interpreter mode."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm_compile.py"), "80", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sm_90: compiled" in proc.stdout


def test_tma_candidates_compile_to_tma_and_wgmma_on_sm90():
    """The TMA conv candidates, specialized as a launch specializes them (Triton's own binder on real
    tensors), emit cp.async.bulk.tensor loads and wgmma on sm_90."""
    pytest.importorskip("triton")
    from resnet_fast.ops.triton import conv_tma
    if not conv_tma.AVAILABLE:
        pytest.skip("this triton has no tensor descriptors")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "tma_sm90_compile.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in results} == {conv_tma.GEMM, conv_tma.IMPLICIT}
    for r in results:
        assert r["tma"] and r["wgmma"], r
