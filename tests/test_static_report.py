"""The static report (benchmarks/static_report.py) in CI: every Triton kernel a ResNet launches, with every
candidate the tuner tries for it, specialized as the launch specializes it, compiles to sm_90 and sm_80 cubin
with no spills, and every bf16/fp16 tensor-core candidate on sm_90 uses wgmma (the report exits 1 otherwise)
except a tile too short for it, which uses mma.sync: on sm_90 only the fc below batch 64 gets one; the TMA
candidates move their tiles with TMA. The candidates of two keys are checked against lists pinned here.

CI compiles resnet18, resnet50 and resnet50d at batch 256, 224x224, in bf16 and fp32 (eval, and the training
step's BatchNorm/add_relu kernels), and resnet50's eval launches in bf16 at batch 1, 8 and 32; the full report
(also resnet101, fp16, fp32 without TF32) is committed under benchmarks/results/static_report_<arch>.json.
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


# Reviewed candidate lists, pinned so that a tuner change that adds or drops one, or a report that skips one,
# fails: (kernel, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages).
# ResNet-50's layer1 1x1 64 -> 256 + residual + ReLU, bf16, batch 256. sm_90: cp.async tiles tall enough for
# wgmma (8 warps: 128+ rows, 4 warps: 64+), then the TMA GEMM variants; sm_80: 4-warp mma.sync tiles.
LAYER1 = {
    "sm_90": [("conv", 128, 256, 64, 8, 8, 3), ("conv", 256, 128, 64, 8, 8, 3), ("conv", 128, 128, 64, 8, 8, 4),
              ("conv", 256, 64, 64, 8, 8, 4), ("conv", 128, 128, 32, 8, 4, 4), ("conv", 128, 64, 32, 8, 4, 4),
              ("conv", 64, 128, 32, 8, 4, 4), ("conv", 64, 64, 64, 8, 4, 4)],
    "sm_80": [("conv", 128, 128, 32, 8, 4, 4), ("conv", 128, 64, 32, 8, 4, 4), ("conv", 64, 128, 32, 8, 4, 4),
              ("conv", 64, 64, 64, 8, 4, 4), ("conv", 32, 64, 32, 8, 4, 4)],
}
LAYER1_TMA = [("conv_tma_gemm", 128, 256, 64, 8, 8, 3), ("conv_tma_gemm", 128, 128, 64, 8, 8, 4),
              ("conv_tma_gemm", 128, 128, 64, 8, 4, 4), ("conv_tma_gemm", 64, 128, 64, 8, 4, 4)]  # sm_90
# ResNet-50's fc at batch 1, 8 and 32 (M = batch rows): every tile is taller than M but the 32-row one, which
# the tuner keeps as the smallest; on sm_90 it is too short for wgmma (64 rows per warpgroup).
FC_SMALL_BATCH = [("conv", 32, 64, 32, 8, 4, 4)]


def as_filed(rows) -> set:
    """(kernel, config) as the report files a candidate."""
    return {(("conv_bias_act_fwd" if kernel == "conv" else kernel) + "_kernel",
             json.dumps({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": warps,
                         "num_stages": stages}, sort_keys=True))
            for kernel, bm, bn, bk, gm, warps, stages in rows}


def tried(arch: str, key) -> set:
    """(kernel, config) of every Triton candidate the tuner tries for `key` on `arch`, as the report files them."""
    from resnet_fast.ops.triton import tuner
    return {(("conv_bias_act_fwd" if c.kernel == "conv" else c.kernel) + "_kernel",
             json.dumps({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}, sort_keys=True))
            for c in tuner.candidates(arch.replace("_", ""), key) if not c.is_torch}


def static_report(arch: str, tmp_path, *flags) -> list[dict]:
    """The report's records; it exited 0 and found nothing to fail."""
    out = tmp_path / f"{arch}.json"
    # A subprocess: this one runs Triton in interpreter mode.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--arch", arch,
                           "--json", str(out), *flags], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    records = report["records"]
    assert not report["failures"] and all(FIELDS <= set(r) for r in records)
    assert all(r["spill_bytes"] == 0 for r in records)
    return records


def filed_for(records: list[dict], shape: str) -> set:
    return {(r["kernel"], json.dumps(r["config"], sort_keys=True)) for r in records
            if r["shape"] == shape and r["dtype"] == "bf16" and r["kernel"] in (CONV, *TMA)}


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_static_report(arch, tmp_path):
    pytest.importorskip("triton")
    from resnet_fast.ops.triton import conv, conv_tma
    records = static_report(arch, tmp_path)
    conv_records = [r for r in records if r["kernel"] in (CONV, *TMA)]
    assert {r["mode"] for r in conv_records if r["kernel"] == CONV} == {"gemm", "implicit", "stem"}

    # The pinned list, filed by the report and tried by the tuner.
    key = conv.ConvKey(256, 64, 56, 56, 256, 1, 1, 1, 1, 0, 0, 1, 1, "bfloat16", "gemm", True, True, "tf32",
                       True, True, True, True)
    expected = as_filed(LAYER1[arch] + (LAYER1_TMA if arch == "sm_90" and conv_tma.AVAILABLE else []))
    assert filed_for(records, "256x64x56x56 cl -> 256 k1x1 s1 p0 +res +relu") == expected
    assert tried(arch, key) == expected

    tensor_core = [r for r in conv_records if r["dtype"] == "bf16"]
    tma = [r for r in conv_records if r["kernel"] in TMA]
    if arch == "sm_90":
        assert not any(r["short_tile"] for r in tensor_core)  # at batch 256 every layer has wgmma tiles
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


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_static_report_at_small_batches(arch, tmp_path):
    """resnet50's eval launches in bf16 at batch 1, 8 and 32: the fc's M is the batch, and on sm_90 its one
    Triton candidate is a 32-row tile that uses mma.sync, the only conv record there without wgmma."""
    pytest.importorskip("triton")
    from resnet_fast.ops.triton import conv
    records = static_report(arch, tmp_path, "--models", "resnet50", "--dtypes", "bf16", "--batch", "1,8,32",
                            "--no-train")
    conv_records = [r for r in records if r["kernel"] in (CONV, *TMA)]
    for n in (1, 8, 32):
        key = conv.ConvKey(n, 2048, 1, 1, 1000, 1, 1, 1, 1, 0, 0, 1, 1, "bfloat16", "gemm", False, False, "tf32",
                           True, True, True, True)
        assert filed_for(records, f"{n}x2048x7x7 cl -> fc 1000") == as_filed(FC_SMALL_BATCH) == tried(arch, key)
    short = [r for r in conv_records if r["short_tile"]]
    if arch == "sm_90":
        assert sorted(r["shape"] for r in short) == sorted(f"{n}x2048x7x7 cl -> fc 1000" for n in (1, 8, 32))
        assert all(r["mma_sync"] and not r["wgmma"] for r in short)
        assert all(r["wgmma"] for r in conv_records if not r["short_tile"])
    else:
        assert all(r["mma_sync"] and not r["wgmma"] for r in conv_records)
