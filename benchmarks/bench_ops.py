"""Benchmark the fused BatchNorm/epilogue ops against eager PyTorch and torch.compile.

Ops (per activation shape, dtype and layout):
  bn_act_fwd       training BN (batch stats) + residual + ReLU, forward, running-stats update included
  bn_act_fwd_bwd   the same, forward + backward (grads of x, residual, weight, bias)
  add_relu         relu(x + residual)
  scale_bias_act   inference BN epilogue: x * scale + shift + residual, ReLU
Contenders:
  eager     F.batch_norm + add + relu (or the matching eager ops)
  compile   torch.compile of the eager function (inductor; --no-compile skips it)
  ext       resnet_fast's C++/CUDA extension (torch.ops.resnet_fast.*)
  triton    resnet_fast's Triton kernels (CUDA only: the CPU interpreter is not a contender)
GB/s counts the bytes the fused algorithm must move (bn_act fwd reads x twice:
statistics then normalize; its backward reads grad, out and x twice), and
"of_copy" divides by this device's measured copy bandwidth (a large copy_, read +
write): the fraction of a memory-bound op's ceiling each contender reaches. Both
are printed per contender and recorded per result. Times are medians over rounds in which the contenders
take turns (the minimum is recorded too: on a shared machine it is the
steadier number). Results: benchmarks/results/ops_<device>_<date>.json.

    python benchmarks/bench_ops.py --device cpu
    python benchmarks/bench_ops.py --device cuda        # then retune resnet_fast/ops/dispatch.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import resnet_fast  # noqa: E402
from resnet_fast import envinfo  # noqa: E402
from resnet_fast.bench.timing import Spread, Timer, interleaved, spread  # noqa: E402
from resnet_fast.ops import dispatch  # noqa: E402
from resnet_fast.ops.bn_act import add_relu, bn_act, scale_bias_act  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}
DEFAULT_SHAPES = {
    "cpu": ["8x64x56x56", "8x256x14x14"],
    "cuda": ["128x64x56x56", "128x256x56x56", "128x512x28x28", "128x1024x14x14", "128x2048x7x7"],
}
DEFAULT_DTYPES = {"cpu": ["fp32", "bf16"], "cuda": ["bf16", "fp16", "fp32"]}
# Elements moved per activation element by the fused algorithm.
TRAFFIC = {"bn_act_fwd": 4, "bn_act_fwd_bwd": 4 + 8, "add_relu": 3, "scale_bias_act": 3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", help="NxCxHxW activation shapes (default per device)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["nhwc", "nchw"])
    p.add_argument("--ops", nargs="+", choices=sorted(TRAFFIC), default=list(TRAFFIC))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per timed sample")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix for the result file name")
    return p.parse_args(argv)


def time_calls(fns: dict, device, rounds: int, min_time: float) -> dict[str, Spread]:
    """Seconds per call of each fn; contenders interleaved round by round. One op call is too short
    to time alone, so a sample is n back-to-back calls, n doubled until a sample lasts min_time."""
    timer = Timer(device)
    samples, calls = {}, {}
    for name, fn in fns.items():
        fn()  # warm-up
        n = 1
        while n < 1 << 14 and timer(_repeat(fn, n)) < min_time:
            n *= 2
        samples[name], calls[name] = _repeat(fn, n), n
    times = interleaved(samples, rounds, timer)
    return {name: spread([t / calls[name] for t in ts]) for name, ts in times.items()}


def _repeat(fn, n: int):
    def run():
        for _ in range(n):
            fn()
    return run


def copy_bandwidth(device, rounds, min_time) -> float:
    """GB/s of a large copy into a preallocated tensor (bytes read + written)."""
    n = (256 if device.type == "cuda" else 64) * 2**20 // 4
    x = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    t = time_calls({"copy": lambda: y.copy_(x)}, device, rounds, min_time)["copy"].min
    return 2 * x.numel() * 4 / t / 1e9


def contenders(op, backend_names, x, r, compile_ok):
    """{name: zero-arg callable} for one op on inputs x, r."""
    C = x.shape[1]
    dev = x.device
    w = torch.rand(C, device=dev) + 0.5
    b = torch.randn(C, device=dev)
    rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
    scale, shift = torch.rand(C, device=dev) + 0.5, torch.randn(C, device=dev)
    grad = torch.randn_like(x)
    shape = (1, -1, 1, 1)
    bn = torch.nn.BatchNorm2d(C).to(dev)

    if op == "scale_bias_act":
        def eager():
            return F.relu(x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype) + r)
        fused = {name: (lambda name=name: _run(name, scale_bias_act, x, scale, shift, r)) for name in backend_names}
    elif op == "add_relu":
        def eager():
            return F.relu(x + r)
        fused = {name: (lambda name=name: _run(name, add_relu, x, r)) for name in backend_names}
    else:
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        xg, rg = x.detach().requires_grad_(), r.detach().requires_grad_()
        leaves = (xg, rg, bn.weight, bn.bias)

        def eager_fn(x, r):
            return F.relu(F.batch_norm(x, rm, rv, bn.weight, bn.bias, True, 0.1, 1e-5) + r)

        def fused_fn(name):
            def fn(x, r):
                with resnet_fast.use_backend(name):
                    return bn_act(x, bn, r)
            return fn

        def run(fn):
            if op == "bn_act_fwd_bwd":
                return lambda: torch.autograd.grad(fn(xg, rg), leaves, grad)
            return torch.no_grad()(lambda: fn(x, r))

        out = {"eager": run(eager_fn)}
        if compile_ok:
            out["compile"] = run(torch.compile(eager_fn))
        out.update({name: run(fused_fn(name)) for name in backend_names})
        return out
    out = {"eager": eager}
    if compile_ok:
        out["compile"] = torch.compile(eager)
    out.update(fused)
    return out


def _run(backend, fn, *args):
    with resnet_fast.use_backend(backend):
        return fn(*args)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or DEFAULT_SHAPES[device.type])]
    dtypes = args.dtypes or DEFAULT_DTYPES[device.type]
    backends = [b for b in ("ext", "triton") if dispatch.usable(b, device, torch.float32)
                and (b != "triton" or device.type == "cuda")]
    copy_gbps = copy_bandwidth(device, args.rounds, args.min_time)
    print(f"{envinfo.device_name(device)}: copy bandwidth {copy_gbps:.1f} GB/s; contenders: eager"
          f"{'' if args.no_compile else ', compile'}, {', '.join(backends)}", file=sys.stderr)
    results = []
    for op in args.ops:
        for shape in shapes:
            for dname in dtypes:
                for lname in args.layouts:
                    dtype, fmt = DTYPES[dname], LAYOUTS[lname]
                    x = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
                    r = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
                    torch._dynamo.reset()
                    fns = contenders(op, backends, x, r, not args.no_compile)
                    times = time_calls(fns, device, args.rounds, args.min_time)
                    nbytes = TRAFFIC[op] * x.numel() * x.element_size()
                    row = {"op": op, "shape": list(shape), "dtype": dname, "layout": lname}
                    for name, t in times.items():
                        gbps = nbytes / t.median / 1e9
                        results.append({**row, "contender": name, "ms": t.median * 1e3, "ms_min": t.min * 1e3,
                                        "GBps": gbps, "of_copy": gbps / copy_gbps})
                    best = min(times, key=lambda n: times[n].median)
                    print(f"{op:15s} {'x'.join(map(str, shape)):>15s} {dname} {lname}  " +
                          "  ".join(f"{n} {t.median * 1e3:.3f}ms {nbytes / t.median / 1e9:.0f}GB/s "
                                    f"({nbytes / t.median / 1e9 / copy_gbps:.0%} of copy)" for n, t in times.items())
                          + f"  best: {best}", file=sys.stderr)
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "env": envinfo.collect(device),
        "copy_GBps": copy_gbps,
        "traffic_elements_per_op": TRAFFIC,
        "auto_preference": {op: routes["auto"].get(device.type) for op, routes in dispatch.ROUTES.items()},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    path = args.out / f"ops_{device.type}_{datetime.date.today().isoformat()}{tag}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
