"""Where a CPU training step spends its time: torch.profiler's per-op self time in a step (forward,
cross-entropy, backward, SGD) of resnet_fast and torchvision, eager NCHW and channels_last. The kinds
take turns for --profiled steps each; the table gives each op's median self time per step (one step
alone moves by several ms per op on a shared machine). The unprofiled rounds also count the page faults
of each step (getrusage's minor faults): memory malloc handed back to the kernel and took again, a cost
paid inside whichever op first writes the page.

    python benchmarks/profile_train_step.py --arch resnet18 --batch-size 8 --img-size 112 --dtype fp32
"""
from __future__ import annotations

import argparse
import collections
import copy
import resource
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.profiler import ProfilerActivity, profile

import resnet_fast

KINDS = {"tv": ("torchvision", False), "tvcl": ("torchvision", True), "rf": ("resnet_fast", False),
         "rfcl": ("resnet_fast", True)}


def make_step(base, kind, x, y, dtype):
    which, cl = KINDS[kind]
    model = copy.deepcopy(base)
    if which == "resnet_fast":
        model = resnet_fast.from_torchvision(model)
    mf = torch.channels_last if cl else torch.contiguous_format
    model, x = model.to(memory_format=mf), x.contiguous(memory_format=mf)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--kinds", default="tv,tvcl,rf,rfcl", help=f"from {', '.join(KINDS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profiled", type=int, default=6, help="profiled steps per kind, interleaved")
    p.add_argument("--rows", type=int, default=20)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    base = getattr(torchvision.models, args.arch)().train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    steps = {k: make_step(base, k, x, y, dtype) for k in args.kinds.split(",")}
    for step in steps.values():
        step(), step()
    times = {k: [] for k in steps}
    faults = {k: [] for k in steps}
    for _ in range(args.rounds):  # interleaved rounds
        for k, step in steps.items():
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    for k, ts in times.items():
        print(f"{k}: median {1000 * statistics.median(ts):.1f} ms per step, "
              f"{statistics.median(faults[k]):.0f} page faults per step (median)")
    self_ms = {k: collections.defaultdict(list) for k in steps}  # op -> self ms in each profiled step
    calls = {k: {} for k in steps}
    totals = {k: [] for k in steps}
    for _ in range(args.profiled):
        for k, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            events = prof.key_averages()
            for e in events:
                self_ms[k][e.key].append(e.self_cpu_time_total / 1e3)
                calls[k][e.key] = e.count
            totals[k].append(sum(e.self_cpu_time_total for e in events) / 1e3)
    for k in steps:
        print(f"===== {k}: median self time per step over {args.profiled} profiled steps, "
              f"total {statistics.median(totals[k]):.1f} ms")
        # An op absent from a step counts 0 ms there.
        rows = sorted(((statistics.median(v + [0.0] * (args.profiled - len(v))), name)
                       for name, v in self_ms[k].items()), reverse=True)[:args.rows]
        for ms, name in rows:
            print(f"{ms:10.2f} ms  {calls[k][name]:5d} calls  {name}")


if __name__ == "__main__":
    main()
