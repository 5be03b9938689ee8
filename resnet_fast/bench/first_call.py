"""resnet_fast's first call in a new process, with a cold and with a warm tuning cache.

Each measurement is a fresh `python -m resnet_fast tune` process (the benchmark's architecture, batch,
size, dtype, layout and device) on a private tuning-cache folder: the first process finds it empty and
tunes every shape key, the second finds what the first stored. Triton's own compiled-kernel cache is
left as it is (warm once kernels were compiled on this machine), so "cold" is the cost of tuning,
not of a first-ever compile unless that is what the machine has.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..ops import dispatch
from ..tune import DTYPES
from .contenders import Spec

FIELDS = ("first_call_cold_s", "first_call_warm_s", "first_call_cold_tuned_keys", "first_call_warm_tuned_keys")


def applies(spec: Spec) -> bool:
    """Whether resnet_fast's convs run on the tuned Triton kernels in this configuration."""
    return spec.mode == "infer" and dispatch.route("conv_bias_act", spec.device, spec.dtype, spec.backend) == "triton"


def _tune(spec: Spec, env: dict, json_path: Path) -> dict:
    dtype = next(name for name, d in DTYPES.items() if d == spec.dtype)
    command = [sys.executable, "-m", "resnet_fast", "tune", "--arch", spec.arch, "--batch-size", str(spec.batch_size),
               "--img-size", str(spec.img_size), "--dtype", dtype, "--device", str(spec.device), "--json",
               str(json_path), "--channels-last" if spec.channels_last else "--no-channels-last"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(command[1:])}` failed (exit {proc.returncode}):\n{tail}")
    return json.loads(json_path.read_text())[0]


def measure(spec: Spec) -> dict:
    """FIELDS: seconds of the first forward in a new process, and the keys it tuned, cold then warm."""
    with tempfile.TemporaryDirectory(prefix="resnet-fast-first-call.") as tmp:
        env = {**os.environ, "RESNET_FAST_CACHE_DIR": tmp}
        cold, warm = (_tune(spec, env, Path(tmp) / f"{name}.json") for name in ("cold", "warm"))
    return dict(zip(FIELDS, (cold["first_call_s"], warm["first_call_s"], cold["tuned_keys"], warm["tuned_keys"])))


def line(record: dict) -> str:
    """The table's line for a resnet_fast record that has the measurement ("" otherwise)."""
    if record.get("first_call_cold_s") is None:
        return ""
    return (f"resnet_fast first call in a new process: {record['first_call_cold_s']:.1f} s with a cold tuning cache "
            f"({record['first_call_cold_tuned_keys']} keys tuned), {record['first_call_warm_s']:.1f} s with a warm one "
            f"({record['first_call_warm_tuned_keys']} tuned)")
