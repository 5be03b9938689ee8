"""The static report (benchmarks/static_report.py) in CI: every Triton kernel a ResNet launches, with every
candidate the tuner tries for it, specialized as the launch specializes it, compiles to sm_90 and sm_80 cubin
with no spills, and every bf16/fp16 tensor-core candidate on sm_90 uses wgmma (the report exits 1 otherwise);
the TMA candidates move their tiles with TMA.

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
CONV = "conv_bias_act_fwd_kernel"
TMA = {"conv_tma_gemm_kernel": "gemm", "conv_tma_implicit_kernel": "implicit"}


def tried(arch: str, key) -> set:
    """(kernel, config) of every Triton candidate the tuner tries for `key` on `arch`, as the report files them."""
    from resnet_fast.ops.triton import tuner
    return {(("conv_bias_act_fwd" if c.kernel == "conv" else c.kernel) + "_kernel",
             json.dumps({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}, sort_keys=True))
            for c in tuner.candidates(arch.replace("_", ""), key) if not c.is_torch}


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_static_report(arch, tmp_path):
    pytest.importorskip("triton")
    from resnet_fast.ops.triton import conv, conv_tma
    out = tmp_path / f"{arch}.json"
    # A subprocess: this one runs Triton in interpreter mode.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--arch", arch,
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    records = report["records"]
    assert not report["failures"] and all(FIELDS <= set(r) for r in records)
    assert all(r["spill_bytes"] == 0 for r in records)
    conv_records = [r for r in records if r["kernel"] in (CONV, *TMA)]
    assert {r["mode"] for r in conv_records if r["kernel"] == CONV} == {"gemm", "implicit", "stem"}

    # Exactly the tuner's candidates: ResNet-50's layer1 1x1 64 -> 256 + residual, bf16 (TMA ones on sm_90).
    key = conv.ConvKey(256, 64, 56, 56, 256, 1, 1, 1, 1, 0, 0, 1, 1, "bfloat16", "gemm", True, True, "tf32",
                       True, True, True, True)
    filed = {(r["kernel"], json.dumps(r["config"], sort_keys=True)) for r in conv_records
             if r["shape"] == "256x64x56x56 cl -> 256 k1x1 s1 p0 +res +relu" and r["dtype"] == "bf16"}
    assert filed == tried(arch, key)

    tensor_core = [r for r in conv_records if r["dtype"] == "bf16"]
    tma = [r for r in conv_records if r["kernel"] in TMA]
    if arch == "sm_90":
        assert all(r["wgmma"] and (r["tma"] if r["kernel"] in TMA else r["cp_async"]) for r in tensor_core)
        assert all(r["tma"] and r["mode"] == TMA[r["kernel"]] for r in tma)
        assert {r["kernel"] for r in tma} == (set(TMA) if conv_tma.AVAILABLE else set())
    else:
        assert all(r["mma_sync"] and r["cp_async"] and not r["wgmma"] for r in tensor_core) and not tma
    # the dense residual epilogue and the gemm mode index rows without div/mod (the tile order's 2 remain)
    assert all(r["div_rem"] <= 2 for r in conv_records if r["kernel"] == CONV and r["mode"] == "gemm")
    kernels = {r["kernel"] for r in records}
    assert {"stem_pack_kernel", "max_pool_3x3s2_fwd_kernel", "avg_pool_2x2_ceil_fwd_kernel",
            "global_avg_pool_fwd_kernel", "bn_sums_kernel", "bn_stats_finalize_kernel", "scale_bias_act_kernel",
            "bn_grad_finalize_kernel", "bn_bwd_elementwise_kernel", "bn_update_stats_kernel",
            "add_relu_fwd_kernel", "add_relu_bwd_kernel"} <= kernels
