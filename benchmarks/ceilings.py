"""Hardware ceilings for the ResNet benchmarks: img/s that no implementation can beat here.

Measured on the device:
  copy    a large device-to-device copy; GB/s counts bytes read + written
  matmul  a large bf16 matmul (8192^3 on CUDA); TFLOP/s
Derived, per architecture, bf16 at 224x224 (upper bounds on img/s):
  infer_compute        forward FLOPs at the matmul rate (ResNet-50: the usual 8.22 GFLOP/img;
                       other archs: conv + fc FLOPs counted with forward hooks)
  train_compute        ~3x the forward FLOPs per image (forward + two backward GEMMs)
  infer_memory         conv input + output activation bytes per image at the copy rate: a floor
                       on traffic (residual reads, pools and weights are not counted)
  infer_memory_batch1  the same plus every weight read once (batch 1)
Activation bytes and FLOPs come from torchvision's model on the meta device (no compute).
Writes <out>/ceilings_<device>_<time>.json with the command, device, versions and commit.

    python benchmarks/ceilings.py                  # CUDA when available
    python benchmarks/ceilings.py --device cpu --out /tmp   # smaller sizes; a smoke test
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnet_fast import envinfo  # noqa: E402
from resnet_fast.bench.timing import measure  # noqa: E402

PUBLISHED_GFLOP = {"resnet50": 8.22}  # forward, per 224x224 image
TRAIN_FLOP_FACTOR = 3.0
BF16_BYTES = 2
SIZES = {"cuda": {"copy_bytes": 1 << 30, "matmul_n": 8192}, "cpu": {"copy_bytes": 1 << 27, "matmul_n": 1024}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet18,resnet50,resnet101,resnet152",
                   help="comma-separated torchvision architectures to derive floors for")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median reported)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="directory for the JSON")
    return p.parse_args(argv)


def measure_copy(device: torch.device, nbytes: int, reps: int) -> dict:
    src = torch.empty(nbytes // BF16_BYTES, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device, reps).median
    moved = 2 * src.numel() * BF16_BYTES  # read + write
    return {"bytes_moved": moved, "ms": seconds * 1e3, "GBps": moved / seconds / 1e9}


def measure_matmul(device: torch.device, n: int, reps: int) -> dict:
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    seconds = measure(lambda: a @ b, device, reps).median
    return {"n": n, "dtype": "bf16", "ms": seconds * 1e3, "TFLOPs": 2 * n ** 3 / seconds / 1e12}


def model_costs(arch: str, size: int) -> dict:
    """Per image at batch 1: conv + fc FLOPs, conv input + output activation bytes (bf16), weight bytes."""
    import torchvision

    flops = act_bytes = 0

    def conv_hook(module, inputs, output):
        nonlocal flops, act_bytes
        x = inputs[0]
        flops += 2 * output.numel() * (x.shape[1] // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        act_bytes += (x.numel() + output.numel()) * BF16_BYTES

    def fc_hook(module, inputs, output):
        nonlocal flops
        flops += 2 * output.numel() * module.in_features

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)().eval()
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(conv_hook)
            elif isinstance(m, nn.Linear):
                m.register_forward_hook(fc_hook)
        with torch.no_grad():
            model(torch.empty(1, 3, size, size))
    weights = sum(p.numel() for p in model.parameters()) * BF16_BYTES
    return {"gflop_counted": flops / 1e9, "activation_bytes": act_bytes, "weight_bytes": weights}


def floors(costs: dict, gflop: float, copy_gbps: float, tflops: float) -> dict:
    bandwidth, rate = copy_gbps * 1e9, tflops * 1e12
    return {
        "infer_compute": rate / (gflop * 1e9),
        "train_compute": rate / (TRAIN_FLOP_FACTOR * gflop * 1e9),
        "infer_memory": bandwidth / costs["activation_bytes"],
        "infer_memory_batch1": bandwidth / (costs["activation_bytes"] + costs["weight_bytes"]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ceilings: --device cuda but CUDA is not available")
    sizes = SIZES[device.type]
    copy = measure_copy(device, sizes["copy_bytes"], args.reps)
    matmul = measure_matmul(device, sizes["matmul_n"], args.reps)
    print(f"{envinfo.device_name(device)}: copy {copy['GBps']:.0f} GB/s (read + write), "
          f"bf16 matmul {matmul['TFLOPs']:.1f} TFLOP/s (n={matmul['n']})")
    archs = {}
    for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
        costs = model_costs(arch, args.img_size)
        gflop = PUBLISHED_GFLOP.get(arch) if args.img_size == 224 else None
        source = "published" if gflop else "counted"
        gflop = gflop or costs["gflop_counted"]
        archs[arch] = {**costs, "gflop_forward": gflop, "gflop_source": source,
                       "floors_img_per_s": floors(costs, gflop, copy["GBps"], matmul["TFLOPs"])}
        f = archs[arch]["floors_img_per_s"]
        print(f"{arch:>10}: {gflop:.2f} GFLOP/img ({source}; hooks count {costs['gflop_counted']:.2f}), "
              f"{costs['activation_bytes'] / 1e6:.1f} MB conv activations/img -> img/s <= "
              f"infer {min(f['infer_compute'], f['infer_memory']):.0f} "
              f"(compute {f['infer_compute']:.0f}, memory {f['infer_memory']:.0f}, batch-1 memory "
              f"{f['infer_memory_batch1']:.0f}), train {f['train_compute']:.0f}")
    env = envinfo.collect(device)
    record = {
        "kind": "ceilings",
        "command": [sys.executable, *sys.argv],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **env,
        "dtype": "bf16",
        "img_size": args.img_size,
        "copy": copy,
        "matmul": matmul,
        "archs": archs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-")
    path = args.out / f"ceilings_{slug}_{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
