"""compute-sanitizer memcheck and racecheck over every CUDA kernel resnet_fast launches.

    python benchmarks/sanitize.py [--tools memcheck,racecheck] [--out DIR]   # the driver (GPU machine)
    python benchmarks/sanitize.py --workload ext|triton [--device cpu]       # what runs under the tools

Workloads, small shapes with ragged tails, NCHW and channels_last, fp32 and bf16:
  ext     every op of the extension (torch.ops.resnet_fast.*: add_relu and its out/in-place forms and
          backward, scale_bias_act and its forms, bn_act_fwd/bwd, bn_update_stats_)
  triton  the Triton conv (gemm, implicit and stem modes, with residual; one shape large enough that the
          Hopper list keeps most configs), the pools, avg_pool_fc, and the bn_act / add_relu kernels; the
          tuner runs every candidate of each shape (a fresh tuning cache per run)
Each checks its results against PyTorch (so a kernel that silently did not run fails) and ends by
printing WORKLOAD OK. The driver runs each workload once plainly (it must pass, and it fills the
Triton cache so nothing compiles under the tools), then under each tool with
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so memcheck sees every allocation's real bounds rather than the
caching allocator's blocks. A (tool, workload) passes when the workload prints WORKLOAD OK and the
tool reports no errors. Results: <out>/sanitize_<device>_<time>.json; exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("ext", "triton")
TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
DEFAULT_TOOLS = ("memcheck", "racecheck")
SANITIZER = "/usr/local/cuda/bin/compute-sanitizer"
ERROR_EXIT = 86  # --error-exitcode: the tool found errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=WORKLOADS, help="run one workload in this process (no sanitizer)")
    p.add_argument("--device", default="cuda", help="workload device: cuda, or cpu for a smoke test "
                   "(Triton under TRITON_INTERPRET=1)")
    p.add_argument("--tools", default=",".join(DEFAULT_TOOLS), help="driver: comma-separated compute-sanitizer tools")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="driver: comma-separated workloads")
    p.add_argument("--timeout", type=float, default=300, help="driver: seconds per run")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="driver: JSON directory")
    return p.parse_args(argv)


# --- workloads -------------------------------------------------------------------

def _close(got, want, what: str, tol: float) -> None:
    """got matches want within tol relative to max(1, max |want|); NaN or inf in got fails."""
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    if not err <= tol * scale:
        raise AssertionError(f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}")


def _tol(dtype, conv: bool = False) -> float:
    import torch
    if conv and dtype == torch.float32:
        return 1e-2  # fp32 convs use TF32 by default, as cuDNN does
    return {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]


def _cases():
    """(dtype, memory format, shape) grid of the extension workload."""
    import torch
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for shape in ((3, 24, 7, 5), (2, 64, 8, 8)):  # ragged tails; vector-width-friendly
                yield dtype, fmt, shape


def _bn_reference(x, w, b, r, eps, relu):
    import torch.nn.functional as F
    y = F.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.0, eps)
    if r is not None:
        y = y + r.double()
    return y.relu() if relu else y


def run_ext(device) -> list[str]:
    import torch

    from resnet_fast.ops import ext
    ok, why = ext.status()
    if not ok or not ext.available(device):
        raise SystemExit(f"sanitize: the extension cannot run on {device}: {why}")
    ops = torch.ops.resnet_fast
    ran = set()
    for dtype, fmt, shape in _cases():
        tol = _tol(dtype)
        C = shape[1]

        def t():
            return torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)

        x, r, g = t(), t(), t()
        scale, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
        want = (x.double() + r.double()).relu()
        _close(ops.add_relu(x, r), want, "add_relu", tol)
        out = torch.empty_like(x)
        ops.add_relu_out(x, r, out)
        _close(out, want, "add_relu_out", tol)
        y = x.clone()
        ops.add_relu_(y, r)
        _close(y, want, "add_relu_", tol)
        _close(ops.add_relu_backward(g, out), g.double() * (out.double() > 0), "add_relu_backward", tol)
        view = (1, -1, 1, 1)
        want = (x.double() * scale.double().view(view) + bias.double().view(view) + r.double()).relu()
        _close(ops.scale_bias_act(x, scale, bias, r, True), want, "scale_bias_act", tol)
        out = torch.empty_like(x)
        ops.scale_bias_act_out(x, scale, bias, r, True, out)
        _close(out, want, "scale_bias_act_out", tol)
        y = x.clone()
        ops.scale_bias_act_(y, scale, bias, r, True)
        _close(y, want, "scale_bias_act_", tol)
        w, b = scale.clone(), bias.clone()
        out, mean, var = ops.bn_act_fwd(x, w, b, r, 1e-5, True)
        _close(out, _bn_reference(x, w, b, r, 1e-5, True), "bn_act_fwd", tol)
        gx, gw, gb, gr = ops.bn_act_bwd(g, x, out, w, mean, var, 1e-5, True, True)
        xd = x.double().requires_grad_()
        wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
        rd = r.double().requires_grad_()
        _bn_reference(xd, wd, bd, rd, 1e-5, True).backward(g.double())
        for got, ref, name in ((gx, xd.grad, "grad_x"), (gw, wd.grad, "grad_w"), (gb, bd.grad, "grad_b"),
                               (gr, rd.grad, "grad_r")):
            _close(got, ref, f"bn_act_bwd {name}", 2 * tol)
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
        count = x.numel() // C
        ops.bn_update_stats_(rm, rv, mean, var, 0.1, count)
        _close(rm, 0.1 * mean.double(), "bn_update_stats_ mean", 1e-5)
        _close(rv, 0.9 + 0.1 * var.double() * count / (count - 1), "bn_update_stats_ var", 1e-5)
        ran.update(["add_relu", "add_relu_out", "add_relu_", "add_relu_backward", "scale_bias_act",
                    "scale_bias_act_out", "scale_bias_act_", "bn_act_fwd", "bn_act_bwd", "bn_update_stats_"])
    return sorted(ran)


def _conv_cases():
    # (name, N, Cin, H, W, Cout, k, stride, padding, residual): M = N*Ho*Wo <= 32 and Cout <= 64 keep few
    # candidates; "all_configs" (M = 256, Cout = 256, K = 64) keeps most, the TMA GEMM ones on sm_90 included.
    return [
        ("gemm", 2, 24, 3, 5, 40, 1, 1, 0, True),
        ("implicit", 1, 24, 9, 7, 40, 3, 2, 1, True),
        ("strided_1x1", 2, 24, 7, 5, 40, 1, 2, 0, False),
        ("stem", 1, 3, 11, 9, 16, 7, 2, 3, False),
        ("all_configs", 1, 64, 16, 16, 256, 1, 1, 0, True),
    ]


def run_triton(device) -> list[str]:
    import torch
    import torch.nn.functional as F

    from resnet_fast.ops import triton  # noqa: F401  registers the Triton ops
    from resnet_fast.ops.triton._common import LAUNCHES
    ops = torch.ops.resnet_fast  # the registered ops: stable names, whatever the Python helpers are called
    cl = torch.channels_last
    for dtype in (torch.float32, torch.bfloat16):
        tol = _tol(dtype)
        for name, n, cin, h, w, cout, k, s, p, res in _conv_cases():
            x = torch.randn(n, cin, h, w, device=device).to(dtype=dtype, memory_format=cl)
            wt = (torch.randn(cout, cin, k, k, device=device) * (cin * k * k) ** -0.5).to(dtype)
            b = torch.randn(cout, device=device)
            ref = F.conv2d(x.double(), wt.double(), b.double(), s, p)
            r = torch.randn(ref.shape, device=device).to(dtype=dtype, memory_format=cl) if res else None
            if r is not None:
                ref = ref + r.double()
            got = ops.triton_conv_bias_act(x, wt, b, r, [s, s], [p, p], [1, 1], True)
            _close(got, ref.relu(), f"conv_bias_act {name} {dtype}", _tol(dtype, conv=True))
        x = torch.randn(3, 24, 9, 7, device=device).to(dtype=dtype, memory_format=cl)
        _close(ops.triton_max_pool_3x3s2(x), F.max_pool2d(x.double(), 3, 2, 1), "max_pool_3x3s2", tol)
        _close(ops.triton_avg_pool_2x2_ceil(x),
               F.avg_pool2d(x.double(), 2, 2, ceil_mode=True, count_include_pad=False), "avg_pool_2x2_ceil", tol)
        fc_w, fc_b = torch.randn(10, 24, device=device).to(dtype), torch.randn(10, device=device)
        _close(ops.triton_avg_pool_fc(x, fc_w, fc_b),
               x.double().mean((2, 3)) @ fc_w.double().t() + fc_b.double(), "avg_pool_fc", tol)
        for fmt in (torch.contiguous_format, cl):
            x, r, g = (torch.randn(3, 24, 7, 5, device=device).to(dtype=dtype, memory_format=fmt) for _ in range(3))
            wb, bb = torch.rand(24, device=device) + 0.5, torch.randn(24, device=device)
            out, mean, var = ops.triton_bn_act_fwd(x, wb, bb, r, 1e-5, True)
            _close(out, _bn_reference(x, wb, bb, r, 1e-5, True), "triton bn_act_fwd", tol)
            gx, gw, gb, gr = ops.triton_bn_act_bwd(g, x, out, wb, mean, var, 1e-5, True, True)
            xd, rd = x.double().requires_grad_(), r.double().requires_grad_()
            wd, bd = wb.double().requires_grad_(), bb.double().requires_grad_()
            _bn_reference(xd, wd, bd, rd, 1e-5, True).backward(g.double())
            for got, ref, what in ((gx, xd.grad, "grad_x"), (gw, wd.grad, "grad_w"), (gb, bd.grad, "grad_b"),
                                   (gr, rd.grad, "grad_r")):
                _close(got, ref, f"triton bn_act_bwd {what}", 2 * tol)
            rm, rv = torch.zeros(24, device=device), torch.ones(24, device=device)
            ops.triton_bn_update_stats_(rm, rv, mean, var, 0.1, x.numel() // 24)
            _close(rm, 0.1 * mean.double(), "triton bn_update_stats_", 1e-5)
            view = (1, -1, 1, 1)
            want = (x.double() * wb.double().view(view) + bb.double().view(view) + r.double()).relu()
            _close(ops.triton_scale_bias_act(x, wb, bb, r, True), want, "triton scale_bias_act", tol)
            added = ops.triton_add_relu(x, r)
            _close(added, (x.double() + r.double()).relu(), "triton add_relu", tol)
            _close(ops.triton_add_relu_backward(g, added), g.double() * (added.double() > 0),
                   "triton add_relu_backward", tol)
    launched = dict(LAUNCHES)
    for kernel in ("conv_bias_act.gemm", "conv_bias_act.implicit", "conv_bias_act.stem", "conv_stem_pack",
                   "max_pool_3x3s2", "avg_pool_2x2_ceil", "global_avg_pool", "bn_sums", "bn_stats_finalize",
                   "scale_bias_act", "bn_grad_finalize", "bn_bwd_elementwise", "bn_update_stats", "add_relu_fwd",
                   "add_relu_bwd"):
        if not launched.get(kernel):
            raise AssertionError(f"Triton kernel {kernel} never launched: {launched}")
    return sorted(f"{k} x{v}" for k, v in launched.items())


def workload(name: str, device_name: str) -> int:
    if device_name == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.path.insert(0, str(ROOT))
    import torch
    device = torch.device(device_name)
    # A fresh tuning cache: every run tunes, so every candidate of every conv and pool runs under the tool.
    with tempfile.TemporaryDirectory(prefix="resnet-fast-sanitize.") as cache:
        os.environ["RESNET_FAST_CACHE_DIR"] = cache
        if name == "ext":
            ran = run_ext(device)
        else:
            from resnet_fast.ops.triton import tuner
            with tuner.triton_only():  # Triton kernels even where cuDNN is faster: they are what is checked
                ran = run_triton(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(f"kernels: {', '.join(ran)}")
    print("WORKLOAD OK", flush=True)
    return 0


# --- driver ------------------------------------------------------------------------

def find_sanitizer() -> str | None:
    """/usr/local/cuda's, else $CUDA_HOME's, else PATH's, else the newest /usr/local/cuda-*'s."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates = [SANITIZER] + [os.path.join(h, "bin", "compute-sanitizer") for h in homes if h]
    candidates += [shutil.which("compute-sanitizer") or ""]
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/compute-sanitizer"), key=_version_key, reverse=True)
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.split("/")[3]))


def _summary(tool: str, text: str) -> tuple[int | None, str]:
    """(error count, summary lines) from the tool's output; None if it printed no summary.
    racecheck's own summary (hazards as errors and warnings) wins over the generic one."""
    lines = re.findall(r"^=+ ((?:RACECHECK|ERROR) SUMMARY: .*)$", text, re.M)
    race = [ln for ln in lines if ln.startswith("RACECHECK") and re.search(r"\((\d+) errors?", ln)]
    generic = [ln for ln in lines if ln.startswith("ERROR")]
    if tool == "racecheck" and race:
        return int(re.search(r"\((\d+) errors?", race[-1]).group(1)), "; ".join(lines)
    if generic:
        return int(re.search(r"ERROR SUMMARY: (\d+)", generic[-1]).group(1)), "; ".join(lines)
    return None, ""


def run_one(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code, text = None, out + f"\n[timed out after {timeout:.0f} s]"
    return code, text, time.perf_counter() - start


def driver(args) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from resnet_fast import envinfo
    tools = [t for t in args.tools.split(",") if t]
    workloads = [w for w in args.workloads.split(",") if w]
    for name, value, allowed in (("tool", tools, TOOLS), ("workload", workloads, WORKLOADS)):
        bad = [v for v in value if v not in allowed]
        if bad:
            raise SystemExit(f"sanitize: unknown {name} {bad}; expected from {', '.join(allowed)}")
    if not torch.cuda.is_available():
        raise SystemExit("sanitize: the driver needs a CUDA device (use --workload NAME --device cpu for a "
                         "CPU smoke test of the workloads)")
    sanitizer = find_sanitizer()
    if sanitizer is None:
        raise SystemExit("sanitize: compute-sanitizer not found (looked in /usr/local/cuda/bin, $CUDA_HOME/bin, "
                         "PATH, /usr/local/cuda-*/bin)")
    version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"using {sanitizer} ({version.splitlines()[-1] if version else 'unknown version'})")
    env = envinfo.collect("cuda")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-")
    path = args.out / f"sanitize_{slug}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"kind": "sanitize", "command": [sys.executable, *sys.argv],
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **env, "sanitizer": sanitizer, "sanitizer_version": version, "results": [], "passed": False}
    for wl in workloads:
        base = [sys.executable, str(Path(__file__).resolve()), "--workload", wl, "--device", "cuda"]
        runs = [("plain", base, dict(os.environ))]
        for tool in tools:
            tool_env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
            cmd = [sanitizer, "--tool", tool, "--error-exitcode", str(ERROR_EXIT), "--print-limit", "20", *base]
            runs.append((tool, cmd, tool_env))
        for tool, cmd, run_env in runs:
            code, text, seconds = run_one(cmd, run_env, args.timeout)
            completed = "WORKLOAD OK" in text
            errors, summary = _summary(tool, text) if tool != "plain" else (0, "")
            passed = code == 0 and completed and errors == 0
            record["results"].append({"tool": tool, "workload": wl, "passed": passed, "returncode": code,
                                      "workload_completed": completed, "errors": errors, "summary": summary,
                                      "seconds": round(seconds, 1), "command": cmd, "output_tail": text[-4000:]})
            print(f"{tool:>9} {wl:<7} {'PASS' if passed else 'FAIL'}  rc={code} errors={errors} "
                  f"{seconds:.0f}s  {summary}", flush=True)
            if not passed:
                print(text[-3000:], flush=True)
            if tool == "plain" and not passed:  # the tools would only repeat the workload's own failure
                record["results"] += [{"tool": t, "workload": wl, "passed": False, "skipped": "the workload "
                                       "fails without the sanitizer"} for t in tools]
            record["passed"] = all(r["passed"] for r in record["results"])
            path.write_text(json.dumps(record, indent=1) + "\n")  # after every run: a timeout keeps the rest
            if tool == "plain" and not passed:
                break
    print(f"wrote {path}")
    return 0 if record["passed"] else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workload:
        return workload(args.workload, args.device)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
