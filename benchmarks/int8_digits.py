"""INT8 accuracy on real images: scikit-learn's handwritten digits, resnet18 trained with `resnet-fast train`.

    python benchmarks/int8_digits.py --out benchmarks/results/int8_digits.json

1. writes the 1797 8x8 digits as an ImageFolder (32x32 RGB PNGs, a seeded 80/20 train/val split);
2. trains resnet18 on it with `python -m resnet_fast train` (4 epochs, 32 px);
3. quantizes the trained model with at most 8 calibration batches of the train split: resnet_fast.quantize
   (each observer), torchvision's eager int8 (x86 engine) and torchao's PT2E (X86InductorQuantizer, inductor
   with freezing), and reports each one's val top-1, its drop from fp32 and its top-1 agreement with fp32.
Needs scikit-learn (and torchao for PT2E).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import resnet_fast  # noqa: E402
from resnet_fast import envinfo  # noqa: E402
from resnet_fast.bench import int8 as contenders  # noqa: E402
from resnet_fast.quant import isa  # noqa: E402
from resnet_fast.train.data import load_splits  # noqa: E402

IMG = 32
BATCH = 64
CALIBRATION_BATCHES = 8


def write_digits(root: Path, seed: int = 0) -> None:
    """The digits as root/{train,val}/<digit>/<index>.png, upscaled to 32x32 RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = torch.randperm(len(digits.images), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = len(order) // 5
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = root / split / str(int(digits.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).clip(0, 255).astype("uint8")
        Image.fromarray(pixels).resize((IMG, IMG), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")


def train(root: Path, out: Path, epochs: int) -> Path:
    cmd = [sys.executable, "-m", "resnet_fast", "train", "--data", str(root), "--img-size", str(IMG),
           "--arch", "resnet18", "--epochs", str(epochs), "--output-dir", str(out), "--overwrite", "--workers", "0"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out / "last.pt"


def stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


def logits(forward, x: torch.Tensor) -> torch.Tensor:
    """forward(x) in full batches of BATCH (PT2E's exported graph has a static batch size)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            chunk = x[i:i + BATCH]
            padded = torch.cat([chunk, chunk[:1].expand(BATCH - len(chunk), *chunk.shape[1:])])
            out.append(forward(padded)[:len(chunk)].float())
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/resnet_fast_int8_digits", help="data and checkpoint folder")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--reuse", action="store_true", help="reuse the checkpoint of an earlier run in --work")
    args = p.parse_args()
    work = Path(args.work)
    root = work / "digits"
    if not (root / "val").is_dir():
        write_digits(root)
    last = work / "run" / "last.pt"
    ckpt = torch.load(last if args.reuse and last.exists() else train(root, work / "run", args.epochs),
                      weights_only=True)
    model = resnet_fast.resnet18(num_classes=10)
    model.load_state_dict(ckpt["model"])
    model.eval()

    splits = load_splits(str(root), IMG, 320)
    x_val, y_val = stack(splits.val)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(splits.train), generator=g)[:CALIBRATION_BATCHES * BATCH].tolist()
    x_cal = torch.stack([splits.train[i][0] for i in order])
    calibration = list(x_cal.split(BATCH))

    fp32_logits = logits(model, x_val)
    fp32 = fp32_logits.argmax(1)
    results = {"fp32": {"top1": (fp32 == y_val).double().mean().item()}}

    def record(name, forward, seconds):
        out = logits(forward, x_val)
        pred = out.argmax(1)
        top1 = (pred == y_val).double().mean().item()
        # finer than agreement: the logits' error relative to each image's largest fp32 logit, mean over images
        rel = ((out - fp32_logits).abs().amax(1) / fp32_logits.abs().amax(1)).mean().item()
        results[name] = {"top1": top1, "drop_points": 100 * (results["fp32"]["top1"] - top1),
                         "agreement_with_fp32": (pred == fp32).double().mean().item(),
                         "mean_rel_logit_err": rel, "quantize_s": seconds}
        print(name, results[name], flush=True)

    for observer in ("mse", "percentile", "minmax"):
        start = time.perf_counter()
        q = resnet_fast.quantize(model, calibration, observer=observer)
        record(f"resnet_fast_int8_{observer}", q, time.perf_counter() - start)
    import torchvision
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(model.state_dict())
    tv.eval()
    start = time.perf_counter()
    record("torchvision_int8", contenders.torchvision_int8(tv, "resnet18", calibration), time.perf_counter() - start)
    if contenders.pt2e_available():
        start = time.perf_counter()
        pt2e, context = contenders.pt2e_int8(tv, calibration)
        with context():
            record("pt2e_int8", pt2e, time.perf_counter() - start)
    info = {"command": [sys.executable, *sys.argv], "data": f"sklearn digits: {len(splits.train)} train / "
            f"{len(y_val)} val, 32x32 RGB", "calibration": f"{len(calibration)} batches of {BATCH} train images",
            "epochs": args.epochs, "cpu": envinfo.cpu_model(), "int8_isa": isa.isa_name(),
            "load_average_1_5_15min": os.getloadavg(), "env": envinfo.collect("cpu"),
            "results": results}
    Path(args.out).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
