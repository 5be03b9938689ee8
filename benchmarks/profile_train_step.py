"""Where a CPU training step spends its time: torch.profiler's per-op table for one step (forward,
cross-entropy, backward, SGD) of resnet_fast and torchvision, eager NCHW and channels_last.

    python benchmarks/profile_train_step.py --arch resnet18 --batch-size 8 --img-size 112 --dtype fp32
"""
from __future__ import annotations

import argparse
import copy
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
    for _ in range(args.rounds):  # interleaved rounds
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        print(f"{k}: median {1000 * sorted(ts)[len(ts) // 2]:.1f} ms per step")
    for k, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"===== {k}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
