"""Static report of the Triton kernels' GPU code, compiled without a GPU for sm_90 (H100/H200) or sm_80 (A100).

    python benchmarks/static_report.py --arch sm_90 --json FILE [--models resnet18,resnet50,resnet50d]
        [--dtypes bf16,fp32] [--batch 256 | --batch 1,8,32,256] [--resolution 224] [--no-train] [--only REGEX]
        [--jobs N]

What it compiles is what a real launch would run, found the way a launch finds it:
  1. Each model runs a forward (eval; and train, for the BatchNorm kernels) on fake CUDA tensors with the
     "triton" backend; every resnet_fast::triton_* op call is recorded with its tensors' shapes, strides
     and dtypes. (The train forward's bn_act_fwd calls also stand for the backward, add_relu and
     scale_bias_act calls at the same shapes, in channels_last and NCHW.)
  2. Each recorded call is replayed through the op's real Python implementation on meta tensors, with
     every kernel swapped for a recorder: the exact arguments and constexprs each launcher passes. Where
     the op asks the tuner (resnet_fast/ops/triton/tuner.py) for a shape key's choice, the replay is
     repeated until it has handed out every Triton candidate of tuner.candidates(target, key), the list
     the tuner tries on that GPU (cp.async tiles, and on sm_90 the TMA variants): each launch is the one
     conv.kernel_call / the pool launcher makes for that candidate.
  3. Each launch is specialized as triton's JITFunction.run specializes it (with its own binder: pointers
     16-byte aligned or not, ints divisible by 16 -> tt.divisibility, ints equal to 1 -> constants, tensor
     descriptors), and compiled to cubin for the target. Identical specializations compile once.

Dtypes: bf16, fp16, fp32 (torch's defaults: TF32 convs, IEEE fc) and fp32-ieee (TF32 off for convs too).
One record per (kernel, shape, dtype, config; config: a tuner candidate's tiles, warps and stages):
registers and spill_bytes from the cubin's resource usage
(spill_bytes: the per-thread local-memory stack frame, which the driver reports as
CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES and triton as 4 x n_spills), shared_bytes (triton's metadata), wgmma
("wgmma.mma_async" in the PTX), tma ("cp.async.bulk.tensor"), cp_async, mma_sync, div_rem (integer div/rem
instructions in the PTX), has_dot (a tl.dot in the TTIR), short_tile (a conv tile of fewer than 16 rows per
warp, too short for wgmma's 64 rows per warpgroup). Exits 1 if any record spills, or if a bf16/fp16 kernel
with a tl.dot compiles without wgmma on sm_90, except a short tile, which must use mma.sync instead: the tuner
keeps one only as the smallest tile of a problem shorter than every wgmma tile (the fc below batch 64).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: this compiles real GPU code
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import resnet_fast  # noqa: E402
from resnet_fast import models  # noqa: E402
from resnet_fast.ops import dispatch  # noqa: E402
from resnet_fast.ops.triton import add_relu, bn_act, conv, conv_tma, pool, tuner  # noqa: E402

# capability, SMs (sizes the BN kernels' grids), the tuner's target: H100/H200 SXM, A100.
ARCHS = {"sm_90": (90, 132, "sm90"), "sm_80": (80, 108, "sm80")}
# Report dtype -> (tensor dtype, whether fp32 convs may use TF32: None = torch's default, as a GPU conv
# runs unless the user changes it; the fc always follows torch's matmul setting, IEEE by default).
DTYPES = {"bf16": (torch.bfloat16, None), "fp16": (torch.float16, None), "fp32": (torch.float32, None),
          "fp32-ieee": (torch.float32, False)}
KERNEL_MODULES = (conv, conv_tma, pool, bn_act, add_relu)
# The kernels whose launch parameters are a tuner candidate's, by tuning family.
TUNED = {conv._conv_bias_act_fwd_kernel: conv.FAMILY.name, conv_tma._conv_tma_gemm_kernel: conv.FAMILY.name,
         conv_tma._conv_tma_implicit_kernel: conv.FAMILY.name, pool._max_pool_3x3s2_fwd_kernel: pool.FAMILY.name,
         pool._avg_pool_2x2_ceil_fwd_kernel: pool.FAMILY.name, pool._global_avg_pool_fwd_kernel: pool.FAMILY.name}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--json", type=Path, required=True, help="where to write the report")
    p.add_argument("--models", default="resnet18,resnet50,resnet50d")
    p.add_argument("--dtypes", default="bf16,fp32", help=f"any of {','.join(DTYPES)}")
    p.add_argument("--batch", default="256", help="batch sizes, comma-separated")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--no-train", action="store_true", help="skip the BatchNorm/add_relu (training) kernels")
    p.add_argument("--only", default=None, help="regex over 'kernel mode shape': compile just those")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    return p.parse_args(argv)


# --- 1. the op calls of a forward --------------------------------------------------------------------

class _OpCalls(TorchDispatchMode):
    """Records the resnet_fast::triton_* op calls that reach the dispatcher (then lets them run: fake)."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "resnet_fast" and func._opname.startswith("triton_"):
            self.calls.append((func._schema.name, args, kwargs))
        return func(*args, **kwargs)


def model_op_calls(name: str, dtype: torch.dtype, batch: int, resolution: int, train: bool) -> list:
    """(op name, args, kwargs) of each triton op call of one forward, on fake CUDA tensors."""
    calls: list = []
    default = torch.get_default_dtype()
    with FakeTensorMode(), torch.device("cuda"), warnings.catch_warnings(), \
            mock.patch.object(dispatch, "triton_usable", lambda device: True):
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # fold's cache key
        torch.set_default_dtype(dtype)
        try:
            model = getattr(models, name)().train(train)
        finally:
            torch.set_default_dtype(default)
        images = torch.empty(batch, 3, resolution, resolution, dtype=dtype)
        with resnet_fast.use_backend("triton"), torch.set_grad_enabled(train), _OpCalls(calls):
            model(images)
    return calls


def _meta(t):
    """A meta tensor with t's shape, strides, dtype and storage offset (so its data_ptr keeps t's alignment)."""
    if not isinstance(t, torch.Tensor):
        return t
    base = torch.empty(t.storage_offset() + max(1, _span(t)), dtype=t.dtype, device="meta")
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def _span(t):
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0


def _training_family(calls: list) -> list:
    """The BatchNorm-family op calls of a training step: the recorded bn_update_stats_ calls, and at the
    shapes of the recorded bn_act_fwd calls, bn_act_fwd and bn_act_bwd (autograd's), add_relu and its
    backward, scale_bias_act, in channels_last and NCHW."""
    out = [call for call in calls if call[0] == "resnet_fast::triton_bn_update_stats_"]
    for name, args, _ in calls:
        if name != "resnet_fast::triton_bn_act_fwd":
            continue
        x, weight, bias, residual, eps, relu = (_meta(a) for a in args)
        for layout in (torch.channels_last, torch.contiguous_format):
            x = x.contiguous(memory_format=layout)
            r = residual.contiguous(memory_format=layout) if residual is not None else None
            c = torch.empty(x.shape[1], dtype=torch.float32, device="meta")
            p = "resnet_fast::triton_"
            out += [(p + "bn_act_fwd", (x, weight, bias, r, eps, relu), {}),
                    (p + "bn_act_bwd", (x, x, x, weight, c, c, eps, relu, r is not None), {}),
                    (p + "add_relu", (x, x), {}), (p + "add_relu_backward", (x, x), {}),
                    (p + "scale_bias_act", (x, c, c, r, relu), {})]
    return out


def op_label(name: str, args) -> str:
    """The shape a record is filed under: the op's tensor shapes, and a conv's geometry and epilogue."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    x = tensors[0]
    layout = "cl" if x.dim() == 4 and not x.is_contiguous() else "nchw" if x.dim() == 4 else ""
    label = "x".join(map(str, x.shape)) + (f" {layout}" if layout else "")
    if name.endswith("triton_conv_bias_act"):
        _, w, _, r, s, p, d, relu = args
        label += (f" -> {w.shape[0]} k{w.shape[2]}x{w.shape[3]} s{s[0]} p{p[0]}" + (f" d{d[0]}" if d[0] > 1 else "")
                  + (" +res" if r is not None else "") + (" +relu" if relu else ""))
    elif name.endswith("triton_avg_pool_fc"):
        label += f" -> fc {args[1].shape[0]}"
    return label


# --- 2. the kernel launches of an op call --------------------------------------------------------------

class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _kernels(module):
    return {n: k for n, k in vars(module).items() if isinstance(k, JITFunction) and n.endswith("_kernel")}


@contextlib.contextmanager
def recording(sm_count: int, launches: list):
    """Kernels swapped for recorders; meta tensors accepted; BN grids sized for a GPU with sm_count SMs."""
    gpu_splits = bn_act._splits

    def splits(device, c_blocks, units):
        return gpu_splits(torch.device("cuda", 0), c_blocks, units)

    with contextlib.ExitStack() as stack:
        for module in KERNEL_MODULES:
            for name, kernel in _kernels(module).items():
                stack.enter_context(mock.patch.object(module, name, _Recorder(kernel, launches)))
        stack.enter_context(mock.patch.object(dispatch, "triton_usable", lambda device: True))
        stack.enter_context(mock.patch.dict(bn_act._SM_COUNT, {torch.device("cuda", 0): sm_count}))
        stack.enter_context(mock.patch.object(bn_act, "_splits", splits))
        yield


def _layout(args) -> str:
    x = next(t for t in args if isinstance(t, torch.Tensor))
    return "cl" if x.dim() == 4 and not x.is_contiguous() else "nchw" if x.dim() == 4 else "-"


def replay(name: str, args, kwargs, sm_count: int, target: str, conv_tf32=None) -> list[tuple]:
    """[(kernel, args, kwargs, mode, candidate)]: the launches the op's real implementation makes for these
    (meta) arguments, once with each Triton candidate the tuner tries on `target` for each shape key the op
    asks about (candidate: None for a kernel the tuner does not pick)."""
    options: dict = {}  # shape key -> the tuner's Triton candidates for it
    out, step = [], 0
    while True:
        launches: list = []

        def choose(family, key, device):
            listed = options.setdefault(key, [c for c in tuner.candidates(target, key) if not c.is_torch])
            candidate = listed[min(step, len(listed) - 1)]
            launches.append((family.name, key, candidate))  # the choice, before the launches it makes
            return candidate

        with recording(sm_count, launches), contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(tuner, "choose", choose))
            if conv_tf32 is not None:
                stack.enter_context(mock.patch.object(conv, "fp32_allows_tf32", lambda op="conv": conv_tf32))
            OPDEFS[name]._init_fn(*[_meta(a) for a in args], **kwargs)
        chosen: dict = {}  # family -> (key, candidate) of its latest choice
        for entry in launches:
            if isinstance(entry[0], str):
                chosen[entry[0]] = entry[1:]
                continue
            kernel, a, kw = entry
            family = TUNED.get(kernel)
            if family is None:
                out.append((kernel, a, kw, _layout(a), None))
                continue
            key, candidate = chosen[family]
            out.append((kernel, a, kw, key.mode if family == conv.FAMILY.name else _layout(a), candidate))
        step += 1
        if step >= max(map(len, options.values()), default=0):
            return out


# --- 3. specialize and compile ---------------------------------------------------------------------------

def specialize(fn: JITFunction, backend, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them for this launch."""
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug)
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _compile_key(fn, signature, constexprs, attrs, options):
    return json.dumps([fn.__module__, fn.__name__, signature, sorted(map(repr, constexprs.items())),
                       sorted(map(repr, attrs.items())), sorted(map(repr, options.__dict__.items()))])


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes) of the cubin's one function."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return int(m.group(1)), int(m.group(2))


def compile_one(job) -> dict:
    """Compile one specialization (in a worker process) and read what the report needs from it."""
    module, name, signature, constexprs, attrs, options, capability = job
    fn = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                            options=options)
    seconds = time.perf_counter() - start
    ptx = kernel.asm["ptx"]
    registers, stack = _resource_usage(kernel.asm["cubin"])
    return {"registers": registers, "spill_bytes": stack, "shared_bytes": kernel.metadata.shared,
            "wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
            "cp_async": "cp.async.cg" in ptx or "cp.async.ca" in ptx, "mma_sync": "mma.sync" in ptx,
            "div_rem": len(re.findall(r"\b(?:div|rem)\.[su]\d+", ptx)),
            "has_dot": "tt.dot" in kernel.asm["ttir"], "compile_s": round(seconds, 2)}


def _module_attr(fn: JITFunction) -> tuple[str, str]:
    for module in KERNEL_MODULES:
        for name, k in vars(module).items():
            if k is fn or getattr(k, "fn", None) is fn:
                return module.__name__, name
    raise LookupError(fn)


# --- the report -------------------------------------------------------------------------------------------

def collect_launches(args) -> list[dict]:
    """Every distinct (kernel, shape, dtype, candidate) with its compile job."""
    capability, sm_count, target = ARCHS[args.arch]
    backend = make_backend(GPUTarget("cuda", capability, 32))
    entries, seen = [], set()
    for dtype_name in args.dtypes.split(","):
        dtype, conv_tf32 = DTYPES[dtype_name]
        for model, batch in [(m, int(b)) for m in args.models.split(",") for b in args.batch.split(",")]:
            calls = model_op_calls(model, dtype, batch, args.resolution, train=False)
            if not args.no_train:
                calls += _training_family(model_op_calls(model, dtype, batch, args.resolution, train=True))
            for name, call_args, call_kwargs in calls:
                label = op_label(name, call_args)
                if (name, label, dtype_name) in seen:
                    continue
                seen.add((name, label, dtype_name))
                for fn, a, kw, mode, candidate in replay(name, call_args, call_kwargs, sm_count, target, conv_tf32):
                    if args.only and not re.search(args.only, f"{fn.__name__.lstrip('_')} {mode} {label}"):
                        continue
                    spec = specialize(fn, backend, a, kw)
                    tiles = candidate.kwargs if candidate is not None else {}
                    warps = spec[3].num_warps
                    entries.append({
                        "kernel": fn.__name__.lstrip("_"), "mode": mode, "shape": label, "dtype": dtype_name,
                        "arch": args.arch, "config": {**tiles, "num_warps": warps, "num_stages": spec[3].num_stages},
                        "short_tile": "BLOCK_M" in tiles and tiles["BLOCK_M"] < 16 * warps,
                        "models": [model], "_key": _compile_key(fn, *spec),
                        "_job": (*_module_attr(fn), spec[0], spec[1], spec[2], spec[3].__dict__, capability)})
    return _merge_models(entries)


def _merge_models(entries: list[dict]) -> list[dict]:
    merged: dict = {}
    for e in entries:
        key = (e["kernel"], e["mode"], e["shape"], e["dtype"], json.dumps(e["config"], sort_keys=True))
        if key in merged:
            merged[key]["models"] = sorted(set(merged[key]["models"]) | set(e["models"]))
        else:
            merged[key] = e
    return list(merged.values())


def failures(records: list[dict]) -> list[str]:
    bad = []
    for r in records:
        what = f"{r['kernel']} [{r['mode']}] {r['shape']} {r['dtype']} {r['config']}"
        if r["spill_bytes"]:
            bad.append(f"spills {r['spill_bytes']} B: {what}")
        if r["arch"] == "sm_90" and r["dtype"] in ("bf16", "fp16") and r["has_dot"] and not r["wgmma"]:
            if not r["short_tile"]:
                bad.append(f"no wgmma.mma_async: {what}")
            elif not r["mma_sync"]:
                bad.append(f"a short tile without wgmma or mma.sync: {what}")
    return bad


def summary(records: list[dict]) -> list[dict]:
    """Per (kernel, mode, dtype): candidates, max registers, spilling records, wgmma / tma counts."""
    rows: dict = {}
    for r in records:
        row = rows.setdefault((r["kernel"], r["mode"], r["dtype"]), {
            "kernel": r["kernel"], "mode": r["mode"], "dtype": r["dtype"], "records": 0, "max_registers": 0,
            "spilling": 0, "wgmma": 0, "tma": 0, "configs": set()})
        row["records"] += 1
        row["configs"].add(json.dumps(r["config"], sort_keys=True))
        row["max_registers"] = max(row["max_registers"], r["registers"])
        row["spilling"] += bool(r["spill_bytes"])
        row["wgmma"] += r["wgmma"]
        row["tma"] += r["tma"]
    return [dict(row, configs=len(row["configs"])) for row in rows.values()]


def main(argv=None) -> int:
    args = parse_args(argv)
    from resnet_fast import envinfo

    start = time.perf_counter()
    entries = collect_launches(args)
    jobs = {}
    for e in entries:
        jobs.setdefault(e["_key"], e["_job"])
    print(f"{args.arch}: {len(entries)} (kernel, shape, dtype, config) records, {len(jobs)} distinct compiles",
          flush=True)
    keys = list(jobs)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool_:
        results = dict(zip(keys, pool_.map(compile_one, [jobs[k] for k in keys])))
    records = []
    for e in entries:
        r = {k: v for k, v in e.items() if not k.startswith("_")}
        r.update(results[e["_key"]])
        records.append(r)
    seconds = time.perf_counter() - start
    bad = failures(records)
    report = {
        "command": " ".join([sys.executable, *sys.argv]), **envinfo.collect("cpu"),
        "arch": args.arch, "models": args.models.split(","), "dtypes": args.dtypes.split(","),
        "batch": [int(b) for b in args.batch.split(",")], "resolution": args.resolution, "distinct_compiles": len(jobs),
        "seconds": round(seconds, 1), "failures": bad, "summary": summary(records), "records": records,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    head = json.dumps({k: v for k, v in report.items() if k != "records"}, indent=1)
    args.json.write_text(head[:-2] + ',\n "records": [\n  ' + ",\n  ".join(map(json.dumps, records)) + "\n ]\n}\n")
    for row in report["summary"]:
        print(f"  {row['kernel']:<28} {row['mode']:<9} {row['dtype']:<5} records {row['records']:>4}  configs "
              f"{row['configs']:>2}  max regs {row['max_registers']:>3}  spilling {row['spilling']:>3}  "
              f"wgmma {row['wgmma']:>4}  tma {row['tma']:>3}")
    print(f"{args.arch}: {len(records)} records, {len(jobs)} compiles in {seconds:.0f} s -> {args.json}")
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
