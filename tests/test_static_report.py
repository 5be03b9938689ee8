"""The static report (benchmarks/static_report.py) in CI: every Triton kernel a ResNet launches, specialized as
the launch specializes it, compiles to sm_90 and sm_80 cubin with no spills, and every bf16/fp16 tensor-core
candidate on sm_90 uses wgmma (the report exits 1 otherwise).

CI compiles resnet18, resnet50 and resnet50d at batch 256, 224x224, in bf16 and fp32 (eval, and the training
step's BatchNorm/add_relu kernels); the full report (also resnet101, fp16, fp32 without TF32) is committed
under benchmarks/results/static_report_<arch>.json.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"kernel", "mode", "shape", "dtype", "arch", "config", "registers", "spill_bytes", "shared_bytes",
          "wgmma", "tma"}


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_static_report(arch, tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / f"{arch}.json"
    # A subprocess: this one runs Triton in interpreter mode.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--arch", arch,
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    records = report["records"]
    assert not report["failures"] and all(FIELDS <= set(r) for r in records)
    conv = [r for r in records if r["kernel"] == "conv_bias_act_fwd_kernel"]
    assert {r["mode"] for r in conv} == {"gemm", "implicit", "stem"}
    assert all(r["spill_bytes"] == 0 for r in records)
    tensor_core = [r for r in conv if r["dtype"] == "bf16"]
    if arch == "sm_90":
        assert all(r["wgmma"] and r["cp_async"] for r in tensor_core)
    else:
        assert all(r["mma_sync"] and r["cp_async"] and not r["wgmma"] for r in tensor_core)
    # the dense residual epilogue and the gemm mode index rows without div/mod (the tile order's 2 remain)
    assert all(r["div_rem"] <= 2 for r in conv if r["mode"] == "gemm")
    kernels = {r["kernel"] for r in records}
    assert {"stem_pack_kernel", "max_pool_3x3s2_fwd_kernel", "avg_pool_2x2_ceil_fwd_kernel",
            "global_avg_pool_fwd_kernel", "bn_sums_kernel", "bn_stats_finalize_kernel", "scale_bias_act_kernel",
            "bn_grad_finalize_kernel", "bn_bwd_elementwise_kernel", "bn_update_stats_kernel",
            "add_relu_fwd_kernel", "add_relu_bwd_kernel"} <= kernels
