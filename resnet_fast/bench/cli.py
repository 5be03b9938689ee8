"""`resnet-fast bench`: resnet_fast against torchvision eager, torch.compile and TorchScript.

Every contender gets the same weights (a torchvision model with randomized
BatchNorm, converted with resnet_fast.from_torchvision), the same input and the
same precision, and they are timed interleaved, one call at a time. Reported
per contender: median img/s with p20/p80, speedup over every other contender,
setup and warm-up (compile) time, error against an fp32/fp64 reference, and
the device, versions and commit that produced it.

    resnet-fast bench                                    # ResNet-50, defaults for the best device
    resnet-fast bench --arch resnet18,resnet50 --dtype fp16 --json out.json
    resnet-fast bench --device cpu --batch-size 1,8,32 --dtype fp32,bf16    # one interleaved run per row
    resnet-fast bench --mode train --impls resnet_fast,torchvision_eager
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import NamedTuple, Optional

import torch

import resnet_fast

from .. import envinfo
from ..ops import dispatch
from ..result_files import check_writable, write_json
from . import first_call
from .contenders import (COMPILE, ERROR_CALLS, IMPLS, RESNET_FAST, Spec, base_model, build, default_impls,
                         describe_reference, errors, inputs, reference, unsupported)
from .report import table, write_csv
from .timing import MIN_ROUNDS, Progress, Timer, interleaved, throughput

# int8: CPU inference of the fp32 model quantized by each int8 contender (bench/int8.py)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
MODES = ("infer", "train")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

DEVICE_DEFAULTS = {
    "cpu": {"dtype": "fp32", "batch_size": 8, "img_size": 224},
    "cuda": {"dtype": "bf16", "batch_size": 256, "img_size": 224},
}


def default_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    # CUDA: always (tensor cores want NHWC). CPU: for bf16, where eager's own fast path is channels_last;
    # fp32 contiguous is what a CPU user runs by default.
    return device.type == "cuda" or dtype != torch.float32
# (device type, mode) -> (warm-up calls, timed rounds, time limit for the timed rounds in s).
# The CPU limit keeps the default run (5 contenders, a 30-60 s torch.compile and an fp64 reference
# included) under 3 minutes on 2 cores even when they are shared; an idle machine gets more rounds.
ITERATIONS = {
    ("cpu", "infer"): (1, 20, 45.0),
    ("cpu", "train"): (2, 10, 45.0),
    ("cuda", "infer"): (10, 50, None),
    ("cuda", "train"): (5, 30, None),
}


def _comma_list(values: Optional[list[str]]) -> Optional[list[str]]:
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench` flags (timm's benchmark.py names where they exist)."""
    p = parser
    p.add_argument("--arch", "--model", action="append", metavar="NAME[,NAME...]",
                   help="architecture(s), comma-separated or repeated (default resnet50)")
    p.add_argument("--batch-size", "-b", action="append", metavar="N[,N...]",
                   help="images per iteration, comma-separated or repeated: one table each (default: CPU 8, CUDA 256)")
    p.add_argument("--img-size", type=int, help="input height and width (default 224)")
    p.add_argument("--dtype", action="append", metavar="DTYPE[,DTYPE...]",
                   help=f"precision(s) from {', '.join(DTYPES)}, comma-separated or repeated (default: CPU fp32, CUDA bf16)")
    p.add_argument("--mode", choices=MODES, default="infer",
                   help="infer: forward under no_grad; train: forward, cross-entropy, backward, SGD step")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last layout for the resnet_fast and torch_compile contenders "
                        "(default: on for CUDA and for CPU bf16/fp16, off for CPU fp32)")
    p.add_argument("--iters", type=int, help="timed rounds; each runs every contender once "
                   f"(default: {', '.join(f'{d} {m} {n[1]}' for (d, m), n in ITERATIONS.items())}, "
                   "on CPU cut short by --max-time)")
    p.add_argument("--max-time", type=float, metavar="SECONDS",
                   help="start no timed round after this many seconds of timing; at least "
                        f"{MIN_ROUNDS} rounds run (default: CPU {ITERATIONS[('cpu', 'infer')][2]:.0f} "
                        "unless --iters is given, CUDA no limit)")
    p.add_argument("--warmup", type=int, help="untimed calls per contender before timing "
                   f"(default: {', '.join(f'{d} {m} {n[0]}' for (d, m), n in ITERATIONS.items())})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--impls", action="append", metavar="IMPL[,IMPL...]",
                   help=f"contenders to run, from {', '.join(IMPLS)} (default: all that apply)")
    p.add_argument("--backend", choices=resnet_fast.BACKENDS,
                   help="resnet_fast backend for the resnet_fast contender (default: the current one, "
                        "RESNET_FAST_BACKEND or auto)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--no-first-call", action="store_true",
                   help="skip timing resnet_fast's first call in new processes with a cold and a warm tuning cache "
                        "(measured where its convs run on the tuned Triton kernels)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode (default: max-autotune for CUDA inference, else default); "
                        "inference also turns on inductor's freezing")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--csv", metavar="PATH", help="write the records as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--csv files")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; expected cpu, cuda, cuda:N or auto") from None
    if device.type not in DEVICE_DEFAULTS:
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _batch_sizes(values: Optional[list[str]], default: int, minimum: int) -> list[int]:
    sizes = []
    for v in _comma_list(values) or [str(default)]:
        if not v.isdigit() or int(v) < minimum:
            raise ValueError(f"--batch-size must be integers >= {minimum}, got {v!r}")
        sizes.append(int(v))
    return list(dict.fromkeys(sizes))


def _dtypes(values: Optional[list[str]], default: str) -> list[torch.dtype]:
    names = _comma_list(values) or [default]
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"unknown --dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return [DTYPES[n] for n in dict.fromkeys(names)]


def _or(value, default):
    return default if value is None else value


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")
    return value


class Plan(NamedTuple):
    runs: list[tuple[Spec, list[str]]]  # (configuration, contenders) per architecture
    warmup: int
    iters: int
    max_time: Optional[float]
    first_call: bool = True


def plan(args: argparse.Namespace) -> Plan:
    """What to run, with every flag checked and defaults filled in; ValueError names a bad flag."""
    device = _device(args.device)
    defaults = DEVICE_DEFAULTS[device.type]
    warmup, iters, max_time = ITERATIONS[(device.type, args.mode)]
    if args.max_time is not None:
        if args.max_time <= 0:
            raise ValueError(f"--max-time must be > 0 seconds, got {args.max_time}")
        max_time = args.max_time
    elif args.iters is not None:
        max_time = None  # an explicit round count is honoured
    warmup = _positive("warmup", _or(args.warmup, warmup), minimum=0)
    iters = _positive("iters", _or(args.iters, iters))
    backend = args.backend or resnet_fast.get_backend()
    if backend != "auto":
        try:
            dispatch.require(backend, device)
        except RuntimeError as exc:
            raise ValueError(f"--backend {backend}: {exc}") from None
    archs = _comma_list(args.arch) or ["resnet50"]
    for arch in archs:
        if arch not in resnet_fast.ARCHS:
            raise ValueError(f"unknown --arch {arch!r}; expected one of {', '.join(resnet_fast.ARCHS)}")
    requested = _comma_list(args.impls)
    if requested is not None and not requested:
        raise ValueError("--impls is empty")
    if requested and args.no_compile and COMPILE in requested:
        raise ValueError(f"--no-compile conflicts with --impls {COMPILE}")
    compile_mode = args.compile_mode or ("max-autotune" if device.type == "cuda" and args.mode == "infer"
                                         else "default")
    runs = []
    # train mode: BatchNorm needs more than one value per channel
    batch_sizes = _batch_sizes(args.batch_size, defaults["batch_size"], minimum=2 if args.mode == "train" else 1)
    img_size = _positive("img-size", _or(args.img_size, defaults["img_size"]))
    for arch in dict.fromkeys(archs):
        for dtype in _dtypes(args.dtype, defaults["dtype"]):
            for batch_size in batch_sizes:
                spec = Spec(
                    arch=arch, mode=args.mode, dtype=dtype, batch_size=batch_size, img_size=img_size,
                    device=device, channels_last=_or(args.channels_last, default_channels_last(device, dtype)),
                    backend=backend, compile_mode=compile_mode, seed=args.seed)
                impls = list(dict.fromkeys(requested)) if requested else default_impls(spec)
                if args.no_compile and COMPILE in impls:
                    impls.remove(COMPILE)
                for impl in impls:
                    why = unsupported(impl, spec)
                    if why:
                        raise ValueError(f"--impls: {why}")
                runs.append((spec, impls))
    return Plan(runs, warmup, iters, max_time, not args.no_first_call)


def _warm_up(step, calls: int, checked: int, timer: Timer, progress: Progress) -> tuple[list, float]:
    """calls untimed calls (the first includes any compilation); the outputs of the first `checked`."""
    outputs = []
    timer.sync()
    start = time.perf_counter()
    for i in range(calls):
        out = step()
        if i < checked:  # copy now: a CUDA-graph output is overwritten by the next call
            outputs.append(out.detach().to("cpu", copy=True))
        progress.update()
    timer.sync()
    return outputs, time.perf_counter() - start


def _bench(spec: Spec, impls: list[str], todo: Plan, progress: Progress) -> list[dict]:
    """One configuration: records (without run-wide fields) in impls order."""
    first = {}
    if todo.first_call and RESNET_FAST in impls and not spec.int8 and first_call.applies(spec):
        progress.set_description(f"{spec.arch} first call, cold and warm tuning cache")
        try:
            first = first_call.measure(spec)
        except RuntimeError as exc:  # reported; the benchmark itself goes on
            progress.write(f"resnet-fast bench: first-call measurement failed on {spec.arch}: {exc}")
    progress.set_description(f"{spec.arch} reference")
    base = base_model(spec)
    x, y = inputs(spec)
    ref = reference(base, spec, x, y)
    timer = Timer(spec.device)
    checked = ERROR_CALLS[spec.mode]
    calls = max(todo.warmup, checked)
    done: dict[str, dict] = {}
    steps = {}
    for impl in impls:
        progress.set_description(f"{spec.arch} warm-up {impl}")
        try:
            contender = build(impl, base, spec, x, y)
            outputs, warmup_s = _warm_up(contender.step, calls, checked, timer, progress)
        except Exception as exc:  # reported in the table, the records and the exit status
            progress.write(f"resnet-fast bench: {impl} failed on {spec.arch}:\n{traceback.format_exc()}")
            progress.shrink(calls + todo.iters)
            done[impl] = {"impl": impl, "memory_format": None, "setup_s": None, "warmup_s": None,
                          "max_abs_err": None, "max_rel_err": None, "error": f"{type(exc).__name__}: {exc}"}
            continue
        steps[impl] = contender.step
        done[impl] = {"impl": impl, "memory_format": contender.memory_format, "setup_s": contender.setup_s,
                      "warmup_s": warmup_s, **errors(outputs, ref), "error": None}
    del base
    progress.set_description(f"{spec.arch} timing")
    times = interleaved(steps, todo.iters, timer, progress, todo.max_time) if steps else {}
    stats = {impl: throughput(t, spec.batch_size) for impl, t in times.items()}
    missing = dict.fromkeys(("img_per_s", "p20", "p80", "ms_per_iter"))
    for impl in impls:
        mine = stats.get(impl)
        done[impl].update(mine or missing)
        done[impl]["iters"] = len(times.get(impl, ()))  # rounds actually timed
        done[impl]["speedup_vs"] = {other: mine["img_per_s"] / s["img_per_s"]
                                    for other, s in stats.items() if other != impl} if mine else {}
    if RESNET_FAST in done and todo.first_call:
        done[RESNET_FAST].update({**dict.fromkeys(first_call.FIELDS), **first})
    return [done[impl] for impl in impls]


def _config_fields(spec: Spec, todo: Plan) -> dict:
    return {"arch": spec.arch, "mode": spec.mode,
            "dtype": next(k for k, v in DTYPES.items() if v == spec.dtype),
            "batch_size": spec.batch_size, "img_size": spec.img_size, "channels_last": spec.channels_last,
            "backend": spec.backend, "compile_mode": spec.compile_mode, "warmup": todo.warmup,
            "max_time": todo.max_time, "error_metric": describe_reference(spec)}


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device):
    """cuDNN autotuning on, as any CUDA benchmark of eager PyTorch should have it."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda" or saved
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def run(args: argparse.Namespace, command: Optional[list[str]] = None) -> int:
    """Run the benchmark described by parsed `add_arguments` flags. 0: done; 1: a contender failed;
    2: bad flags or an output file in the way (nothing was run).

    command: the argv recorded in the results (default sys.argv)."""
    try:
        todo = plan(args)
        check_writable(args.json, args.overwrite)
        check_writable(args.csv, args.overwrite)
    except (ValueError, OSError) as exc:
        print(f"resnet-fast bench: error: {exc}", file=sys.stderr)
        return 2
    command = list(sys.argv if command is None else command)
    timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    device = todo.runs[0][0].device
    env = envinfo.collect(device)
    env.pop("gpus")  # "device" names the one benchmarked
    total = sum(len(impls) * (max(todo.warmup, ERROR_CALLS[spec.mode]) + todo.iters) for spec, impls in todo.runs)
    progress = Progress(total)
    records = []
    try:
        with _cudnn_benchmark(device):
            for spec, impls in todo.runs:
                config = _config_fields(spec, todo)
                for record in _bench(spec, impls, todo, progress):
                    records.append({**config, **env, **record, "command": command, "timestamp": timestamp})
    finally:
        progress.close()
    print(table(records), flush=True)
    if args.json:
        write_json(args.json, records, args.overwrite)
    if args.csv:
        write_csv(args.csv, records, args.overwrite)
    return 1 if any(r.get("error") for r in records) else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Stand-alone entry point: `python -m resnet_fast.bench [flags]`."""
    parser = argparse.ArgumentParser(prog="resnet-fast bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, None if argv is None else ["resnet-fast", "bench", *argv])
