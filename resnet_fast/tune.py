"""`resnet-fast tune`: tune a model's Triton conv and pool kernels ahead of time.

One eval forward of the model (random weights: a choice depends on shapes, never on values) runs on the
Triton backend. For every shape key not tuned yet the tuner validates each candidate against the
references, times the survivors and stores the ranking in the tuning cache (see
resnet_fast.ops.triton.tuner), where later processes and DDP ranks read it instead of tuning. Prints one
line per conv and pool call (shape, what runs it, its time, where the choice came from) and last
"tuned N keys, M from the cache": a second identical run tunes nothing.

    resnet-fast tune --arch resnet50 --batch-size 256 --img-size 224 --dtype bf16 --channels-last
    TRITON_INTERPRET=1 resnet-fast tune --device cpu --arch resnet18 --batch-size 1 --img-size 32 --dtype fp32
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    import resnet_fast
    p.add_argument("--arch", default="resnet50", choices=resnet_fast.ARCHS, metavar="ARCH",
                   help="architecture (default resnet50)")
    p.add_argument("--batch-size", "-b", type=int, default=256, help="images per forward (default 256)")
    p.add_argument("--img-size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="precision (default bf16)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last input (default on, as resnet_fast runs it)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu needs TRITON_INTERPRET=1)")
    p.add_argument("--json", metavar="PATH", help="write every choice, survivor time and discarded candidate")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def _device(name: str) -> torch.device:
    from .ops import dispatch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; expected cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine (use --device cpu with "
                             "TRITON_INTERPRET=1 to tune for the interpreter)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "cpu":
        if not dispatch.interpreter_enabled():
            raise ValueError("--device cpu runs the Triton kernels in Triton's interpreter: set TRITON_INTERPRET=1 "
                             "in the environment (before Python starts) or use --device cuda")
    else:
        raise ValueError(f"--device {name!r}: only cuda and cpu are supported")
    if not dispatch.triton_status()[0]:
        raise ValueError(f"Triton cannot run here: {dispatch.triton_status()[1]}")
    return device


def _check(args: argparse.Namespace) -> torch.device:
    for flag in ("batch_size", "img_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.json:
        from .result_files import check_writable
        check_writable(args.json, args.overwrite)
    return _device(args.device)


def first_forward(arch: str, batch_size: int, img_size: int, dtype: torch.dtype, channels_last: bool,
                  device: torch.device) -> tuple[float, list]:
    """Seconds of the model's first eval forward on the Triton backend, and the tuner's events."""
    import resnet_fast
    from .ops.triton import tuner
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = getattr(resnet_fast, arch)().eval().to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).to(dtype=dtype, memory_format=fmt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), resnet_fast.use_backend("triton"), tuner.recording() as events:
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start, events


def _rows(events: list) -> list[list[str]]:
    first: dict = {}
    rows = [["#", "op", "shape", "runs on", "ms", "from"]]
    for i, e in enumerate(events, 1):
        seen = first.setdefault((e.family, e.key), i)
        origin = e.origin if seen == i else f"as #{seen}"
        if e.origin == "tuned" and e.record.rejected:
            origin += f" ({len(e.record.rejected)} discarded)"
        ms = "-" if e.ms is None else f"{e.ms:.3f}"
        rows.append([str(i), e.family, e.description, str(e.candidate), ms, origin])
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i in (0, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def summary(events: list) -> dict:
    """Distinct keys tuned now and read from the disk cache."""
    tuned = {(e.family, e.key) for e in events if e.origin == "tuned"}
    cached = {(e.family, e.key) for e in events if e.origin == "cache"}
    return {"tuned_keys": len(tuned), "cached_keys": len(cached)}


def _record(event) -> dict:
    return {"op": event.family, "shape": event.description, "key": event.key._asdict(),
            "runs_on": event.candidate.to_json(), "ms": event.ms, "origin": event.origin,
            "timed": event.record.timed, **{k: v for k, v in event.record.to_json().items() if k != "timed"}}


def run(args: argparse.Namespace, command: Optional[list[str]] = None) -> int:
    """0: tuned; 2: bad flags (nothing was run)."""
    try:
        device = _check(args)
    except (ValueError, OSError) as exc:
        print(f"resnet-fast tune: error: {exc}", file=sys.stderr)
        return 2
    from . import envinfo
    from .ops.triton import tuner
    dtype = DTYPES[args.dtype]
    seconds, events = first_forward(args.arch, args.batch_size, args.img_size, dtype, args.channels_last, device)
    counts = summary(events)
    cache_off = tuner.disk_cache_off()
    cache = f"cache off, {cache_off}: every process tunes again" if cache_off else f"cache {tuner.cache_dir()}"
    print(f"{args.arch} batch {args.batch_size} {args.img_size}x{args.img_size} {args.dtype} "
          f"{'channels_last' if args.channels_last else 'contiguous'} on {envinfo.device_name(device)} "
          f"(target {tuner.target(device)}; {cache})")
    print(_table(_rows(events)))
    if any(e.ms is None for e in events):
        print("(interpreter: every candidate validated, none timed; the first survivor in list order runs)")
    print(f"first forward {seconds:.2f} s")
    print(f"tuned {counts['tuned_keys']} keys, {counts['cached_keys']} from the cache", flush=True)
    if args.json:
        from .result_files import write_json
        env = envinfo.collect(device)
        record = {"arch": args.arch, "batch_size": args.batch_size, "img_size": args.img_size, "dtype": args.dtype,
                  "channels_last": args.channels_last, "target": tuner.target(device),
                  "cache_dir": str(tuner.cache_dir()), "cache_off": cache_off or None, "first_call_s": seconds,
                  **counts, **env,
                  "command": list(sys.argv if command is None else command),
                  "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "calls": [_record(e) for e in events]}
        write_json(args.json, [record], args.overwrite)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="resnet-fast tune", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), None if argv is None else ["resnet-fast", "tune", *argv])
