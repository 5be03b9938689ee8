"""Benchmark the fused Triton conv on every distinct ResNet-50 conv (GPU only).

For each conv of torchvision's resnet50 (shapes traced at the given batch and
resolution, deduplicated, with the epilogue its position needs):
  fused     resnet_fast conv_bias_act: BN folded, bias/residual/ReLU in the epilogue
  eager     cuDNN conv, then eval BatchNorm, add, ReLU as separate eager ops
  compiled  torch.compile of that eager function
plus ResNet-D's deep stem (3->32/2, 32->32, 32->64). Times are triton.testing.do_bench
medians. TFLOP/s counts the conv's 2*M*Cout*K flops; "share" divides by the bf16 matmul
rate measured here. The RGB stems (Cin < 16) run packed (resnet_fast.ops.triton.conv, "the
packed stem"): their "fused" time includes packing the input, which is also timed alone
("stem_pack_ms"), and "k_computed" vs "k_useful" is the padding's extra MMA work.
Results go to benchmarks/results/convs_<device>_<time>.json.

    python benchmarks/bench_convs.py [--batch 256] [--dtype bf16] [--no-compile]
"""
import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to compile)")
    p.add_argument("--only", default=None, help="regex over shape names, e.g. 'layer3'")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def resnet50_convs(batch, resolution):
    """Distinct (shape, epilogue) convs of torchvision resnet50, traced on the meta device."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50().eval()
        seen = {}

        def hook(name):
            def record(module, inputs):
                n, cin, h, w = inputs[0].shape
                if name.endswith("downsample.0"):
                    residual, relu = False, False
                elif name.endswith("conv3"):
                    residual, relu = True, True  # bn3 + identity, then ReLU
                else:
                    residual, relu = False, True
                key = (cin, module.out_channels, module.kernel_size[0], module.stride[0], module.padding[0],
                       h, w, residual, relu)
                entry = seen.setdefault(key, {"name": name, "count": 0})
                entry["count"] += 1
            return record

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_pre_hook(hook(name))
        model(torch.empty(batch, 3, resolution, resolution))
    specs = [dict(zip(("cin", "cout", "k", "stride", "padding", "h", "w", "residual", "relu"), key), **v)
             for key, v in seen.items()]
    stem = resolution // 2  # ResNet-D's deep stem, ahead of the same body
    specs += [dict(cin=cin, cout=cout, k=3, stride=s, padding=1, h=h, w=h, residual=False, relu=True,
                   name=f"resnet50d.conv1.{i}", count=1)
              for i, (cin, cout, s, h) in enumerate(((3, 32, 2, resolution), (32, 32, 1, stem), (32, 64, 1, stem)))]
    return specs


def measure_matmul_tflops(dtype, do_bench):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def bench_conv(spec, batch, dtype, use_compile, do_bench, warmup, rep, device="cuda"):
    from resnet_fast.ops.triton import conv as triton_conv
    conv_bias_act = triton_conv.conv_bias_act

    cin, cout, k, s, p = spec["cin"], spec["cout"], spec["k"], spec["stride"], spec["padding"]
    cl = torch.channels_last
    x = torch.randn(batch, cin, spec["h"], spec["w"], device=device, dtype=dtype).contiguous(memory_format=cl)
    weight = (torch.randn(cout, cin, k, k, device=device) * (cin * k * k) ** -0.5).to(dtype)
    weight = weight.contiguous(memory_format=cl)
    gamma, beta = torch.rand(cout, device=device) + 0.5, torch.randn(cout, device=device) * 0.1
    mean, var, eps = torch.randn(cout, device=device) * 0.1, torch.rand(cout, device=device) + 0.5, 1e-5
    scale = gamma / (var + eps).sqrt()
    folded_w = (weight.float() * scale[:, None, None, None]).to(dtype).contiguous(memory_format=cl)
    folded_b = (beta - mean * scale).float()
    ho = (spec["h"] + 2 * p - k) // s + 1
    wo = (spec["w"] + 2 * p - k) // s + 1
    residual = (torch.randn(batch, cout, ho, wo, device=device, dtype=dtype).contiguous(memory_format=cl)
                if spec["residual"] else None)
    bn_args = (mean.to(dtype), var.to(dtype), gamma.to(dtype), beta.to(dtype))

    def eager():
        y = F.conv2d(x, weight, None, s, p)
        y = F.batch_norm(y, *bn_args, False, 0.0, eps)
        if residual is not None:
            y = y + residual
        return F.relu(y) if spec["relu"] else y

    def fused():
        return conv_bias_act(x, folded_w, folded_b, residual, s, p, 1, spec["relu"])

    fns = {"fused": fused, "eager": eager}
    if use_compile:
        torch._dynamo.reset()
        fns["compiled"] = torch.compile(eager, fullgraph=True)
    expected = eager()
    result = dict(spec, ms={}, tflops={})
    for label, fn in fns.items():
        out = fn()  # tunes / compiles outside the timed region
        result.setdefault("max_abs_diff_vs_eager", {})[label] = (out.float() - expected.float()).abs().max().item()
        result["ms"][label] = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    if cin < triton_conv._STEM_CHANNELS:  # the packed stem: what packing costs
        plan = triton_conv._stem_plan(cin, k, k, (s, s), (p, p), (1, 1))
        result["stem_pack_ms"] = do_bench(lambda: triton_conv._pack_stem_input(x, plan, ho, wo), warmup=warmup,
                                          rep=rep, return_mode="median")
        result["k_useful"] = cin * k * k
        result["k_computed"] = triton_conv._STEM_CHANNELS * plan.kernel[0] * plan.kernel[1]
    flops = 2 * batch * ho * wo * cout * cin * k * k
    result["gflop"] = flops / 1e9
    result["tflops"] = {label: flops / (ms * 1e-3) / 1e12 for label, ms in result["ms"].items()}
    return result


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_convs needs a CUDA GPU (the Triton kernels are timed on the device)")
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    from triton.testing import do_bench

    from resnet_fast import envinfo

    dtype = DTYPES[args.dtype]
    specs = resnet50_convs(args.batch, args.resolution)
    for spec in specs:
        epilogue = "+res+relu" if spec["residual"] else ("+relu" if spec["relu"] else "")
        spec["shape"] = (f"{spec['cin']}->{spec['cout']} {spec['k']}x{spec['k']}/{spec['stride']} "
                         f"@{spec['h']}x{spec['w']}{epilogue}")
    if args.only:
        specs = [s for s in specs if re.search(args.only, s["name"] + " " + s["shape"])]

    peak = measure_matmul_tflops(torch.bfloat16, do_bench)
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {peak:.0f} TFLOP/s (8192^3)")
    results = []
    for spec in specs:
        r = bench_conv(spec, args.batch, dtype, not args.no_compile, do_bench, args.warmup, args.rep)
        r["share_of_bf16_matmul"] = {label: t / peak for label, t in r["tflops"].items()}
        results.append(r)
        cols = "  ".join(f"{label} {r['ms'][label]:.3f}ms {r['tflops'][label]:.0f}TF" for label in r["ms"])
        if "stem_pack_ms" in r:
            cols += f"  (packing {r['stem_pack_ms']:.3f}ms, K {r['k_computed']} for {r['k_useful']})"
        print(f"{r['name']:<22} {r['shape']:<36} x{r['count']:<2} {cols}", flush=True)

    body = [r for r in results if not r["name"].startswith("resnet50d.")]
    totals = {label: sum(r["ms"][label] * r["count"] for r in body) for label in results[0]["ms"]}
    print("all ResNet-50 convs, weighted by count: "
          + "  ".join(f"{label} {ms:.2f}ms" for label, ms in totals.items()))
    env = envinfo.collect("cuda")
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **env,
        "capability": list(torch.cuda.get_device_capability()),
        "config": {k: str(v) for k, v in vars(args).items()},
        "bf16_matmul_tflops": peak,
        "total_ms_weighted": totals,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    device = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-")
    path = args.out / f"convs_{device}_{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
