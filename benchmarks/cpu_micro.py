"""The CPU per-op measurements README's CPU section quotes, in one interleaved run.

  prepack   one oneDNN conv (512->512 3x3, 7x7, batch 1) on weights prepacked without the input shape
            (what resnet_fast did before) and with it (ops/onednn.py now)
  max_pool  the stem max-pool, 64x112x112 channels_last: aten vs the extension's C++ kernel (fp32), batch 1/8/32
  small     ResNet-50 forward on 1x3x32x32 (fp32): resnet_fast vs torchvision eager vs torch.compile(freezing)
  bn_train  a training BN + ReLU on ResNet-50's largest activations (batch 8, 160 px, channels_last): the
            extension's bits ops (forward; backward with and without the residual's gradient) vs aten's
            native_batch_norm + relu_ and threshold_backward + native_batch_norm_backward

    python benchmarks/cpu_micro.py --json benchmarks/results/cpu_micro_<date>.json
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
from resnet_fast.bench.timing import Timer, interleaved, spread  # noqa: E402
from resnet_fast.ops import dispatch  # noqa: E402

CL = torch.channels_last


def _ms(fns: dict, rounds: int) -> dict:
    for fn in fns.values():  # warm-up (compilation, prepacking)
        fn(), fn()
    times = interleaved(fns, rounds, Timer(torch.device("cpu")))
    return {name: {k: v * 1e3 for k, v in spread(t)._asdict().items()} for name, t in times.items()}


def prepack(rounds: int) -> dict:
    x = torch.randn(1, 512, 7, 7).contiguous(memory_format=CL)
    w, b = torch.randn(512, 512, 3, 3), torch.randn(512)
    args = ([1, 1], [1, 1], [1, 1], 1)
    shapeless = torch.ops.mkldnn._reorder_convolution_weight(w, *args, None)
    shaped = torch.ops.mkldnn._reorder_convolution_weight(w, *args, list(x.shape))
    conv = torch.ops.mkldnn._convolution_pointwise
    return _ms({"packed_without_shape": lambda: conv(x, shapeless, b, *args, "relu", [], ""),
                "packed_for_shape": lambda: conv(x, shaped, b, *args, "relu", [], "")}, rounds)


def max_pool(rounds: int) -> dict:
    if not dispatch.ext_usable(torch.device("cpu")):
        return {"skipped": "resnet_fast._C not built"}
    op = dispatch.op("ext", "max_pool_3x3s2")
    out = {}
    for batch in (1, 8, 32):
        x = torch.relu(torch.randn(batch, 64, 112, 112)).contiguous(memory_format=CL)
        assert torch.equal(op(x), F.max_pool2d(x, 3, 2, 1))
        out[f"batch{batch}"] = _ms({"aten": lambda: F.max_pool2d(x, 3, 2, 1), "ext": lambda: op(x)}, rounds)
    return out


def small_input(rounds: int) -> dict:
    import torch._inductor.config as inductor_config
    import torchvision
    eager = torchvision.models.resnet50().eval()
    ours = resnet_fast.from_torchvision(eager).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled = torch.compile(eager)
        return _ms({"resnet_fast": lambda: ours(x), "eager": lambda: eager(x), "torch_compile": lambda: compiled(x)},
                   rounds)


def bn_train(rounds: int) -> dict:
    if not dispatch.ext_usable(torch.device("cpu")):
        return {"skipped": "resnet_fast._C not built"}
    ops, aten, out = torch.ops.resnet_fast, torch.ops.aten, {}
    for shape, dtype in (((8, 256, 40, 40), torch.float32), ((8, 64, 80, 80), torch.float32),
                         ((8, 256, 40, 40), torch.bfloat16)):
        torch.manual_seed(0)
        x, g = (torch.randn(shape).to(dtype).contiguous(memory_format=CL) for _ in range(2))
        w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
        y, mean, var, bits = ops.bn_relu_bits_fwd(x, w, b, None, 1e-5)
        y_aten, save_mean, save_invstd = aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
        y_aten.relu_()

        def aten_bwd():
            dz = aten.threshold_backward(g, y_aten, 0)
            return aten.native_batch_norm_backward(dz, x, w, None, None, save_mean, save_invstd, True, 1e-5,
                                                   [True, True, True])

        name = "x".join(map(str, shape)) + ("_bf16" if dtype == torch.bfloat16 else "_fp32")
        out[name] = _ms({
            "ext_forward": lambda: ops.bn_relu_bits_fwd(x, w, b, None, 1e-5),
            "aten_forward": lambda: aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)[0].relu_(),
            "ext_backward": lambda: ops.bn_relu_bits_bwd(g, x, bits, w, mean, var, 1e-5, False),
            "ext_backward_residual_grad": lambda: ops.bn_relu_bits_bwd(g, x, bits, w, mean, var, 1e-5, True),
            "aten_backward": aten_bwd}, rounds)
    return out


SECTIONS = {"prepack": prepack, "max_pool": max_pool, "small_input_resnet50_1x3x32x32": small_input,
            "bn_train": bn_train}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--json", help="write the results here (refuses to overwrite)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = p.parse_args(argv)
    if args.json and Path(args.json).exists():
        p.error(f"{args.json} exists; choose another path")
    with torch.no_grad():
        results = {name: SECTIONS[name](args.rounds) for name in args.sections}
    record = {"command": [sys.executable, *sys.argv], "timestamp": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), **envinfo.collect("cpu"), "unit": "ms per call (median, p20, p80, min)",
              "results": results}
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
