"""`resnet-fast bench` through its entry function, at tiny sizes."""
import argparse
import csv
import json
import math

import sys

import pytest
import torch

import resnet_fast
from resnet_fast import bench, cli, envinfo
from resnet_fast.bench import cli as bench_cli, contenders, timing
from resnet_fast.ops import dispatch

REQUIRED = ("arch", "mode", "dtype", "batch_size", "img_size", "device", "impl", "img_per_s", "p20", "p80",
            "max_abs_err", "max_rel_err", "speedup_vs", "warmup_s", "commit", "torch", "triton", "cuda",
            "command", "timestamp")
TINY = ["--arch", "resnet18", "-b", "2", "--img-size", "32", "--iters", "3", "--warmup", "1", "--no-compile"]


@pytest.fixture
def step_counts(monkeypatch):
    """How often each contender's step ran: proves every contender was really called."""
    counts = {}
    build = contenders.build

    def counting_build(impl, *args):
        contender = build(impl, *args)
        step = contender.step

        def counted():
            counts[impl] = counts.get(impl, 0) + 1
            return step()
        contender.step = counted
        return contender
    monkeypatch.setattr(bench_cli, "build", counting_build)
    return counts


def _run(*flags):
    """Through `resnet-fast bench`'s entry function, as the console script calls it."""
    return cli.main(["bench", *TINY, *flags])


def test_tiny_run_writes_json_csv_and_table(tmp_path, capsys, step_counts, monkeypatch):
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    argv = ["resnet-fast", "bench", *TINY, "--json", str(json_path), "--csv", str(csv_path)]
    monkeypatch.setattr(sys, "argv", argv)
    calls_before = sum(dispatch.CALLS.values())
    assert cli.main() == 0

    records = json.loads(json_path.read_text())
    impls = [r["impl"] for r in records]
    assert impls == ["resnet_fast", "torchvision_eager", "torchvision_channels_last", "torchscript_frozen"]
    assert step_counts == dict.fromkeys(impls, 1 + 3)  # warm-up + timed rounds, each contender
    assert sum(dispatch.CALLS.values()) > calls_before  # the resnet_fast contender ran resnet_fast's ops
    for r in records:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
        assert (r["arch"], r["mode"], r["dtype"], r["batch_size"], r["img_size"]) == ("resnet18", "infer", "fp32", 2, 32)
        assert r["error"] is None and r["iters"] == 3 and r["max_time"] is None  # --iters given: no limit
        assert 0 < r["p20"] <= r["img_per_s"] <= r["p80"]
        assert r["warmup_s"] > 0 and r["setup_s"] > 0
        # fp32 vs the fp64 reference: tiny but (random weights, non-trivial BN) not exactly zero
        assert 0 < r["max_rel_err"] < 1e-4 and 0 < r["max_abs_err"]
        assert r["device"] == envinfo.cpu_model() and r["torch"] == torch.__version__
        assert r["command"] == argv
        others = {o["impl"]: o["img_per_s"] for o in records if o is not r}
        assert r["speedup_vs"].keys() == others.keys()
        for impl, rate in others.items():
            assert math.isclose(r["speedup_vs"][impl], r["img_per_s"] / rate)
    memory = {r["impl"]: r["memory_format"] for r in records}
    assert memory["torchvision_channels_last"] == "channels_last" and memory["torchvision_eager"] == "contiguous"

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["impl"] for row in rows] == impls
    assert set(REQUIRED) - {"speedup_vs"} <= set(rows[0])
    assert float(rows[0]["speedup_vs_torchvision_eager"]) == pytest.approx(records[0]["speedup_vs"]["torchvision_eager"])
    assert rows[0]["command"] == " ".join(argv)

    out = capsys.readouterr().out
    assert "resnet18  infer  fp32  batch 2" in out
    assert all(impl in out for impl in impls)


def test_error_column_catches_a_wrong_model(monkeypatch, tmp_path):
    # A converted model whose last BN is off must show up as a large error, eager's stays tiny.
    convert = resnet_fast.from_torchvision

    def broken(model):
        fast = convert(model)
        with torch.no_grad():
            fast.layer4[-1].bn2.bias.add_(1.0)
        return fast
    monkeypatch.setattr(resnet_fast, "from_torchvision", broken)
    path = tmp_path / "r.json"
    assert _run("--impls", "resnet_fast,torchvision_eager", "--json", str(path)) == 0
    err = {r["impl"]: r["max_rel_err"] for r in json.loads(path.read_text())}
    assert err["resnet_fast"] > 1e-2 and err["torchvision_eager"] < 1e-4


def test_train_mode_loss_matches_reference(tmp_path, step_counts):
    path = tmp_path / "r.json"
    before = sum(n for (op, _), n in dispatch.CALLS.items() if op == "bn_act")
    # 64 px, not 32: BN over 2 samples x 1x1 pixels in layer4 is so ill-conditioned that even
    # fp32 eager's loss after one SGD step drifts 0.2 from fp64's
    assert _run("--mode", "train", "--impls", "resnet_fast,torchvision_eager", "--img-size", "64",
                "--warmup", "2", "--iters", "2", "--json", str(path)) == 0
    assert sum(n for (op, _), n in dispatch.CALLS.items() if op == "bn_act") > before  # resnet_fast's fused training op ran
    assert step_counts == {"resnet_fast": 4, "torchvision_eager": 4}
    for r in json.loads(path.read_text()):
        assert r["mode"] == "train" and r["img_per_s"] > 0
        # losses of steps 1 and 2 (the 2nd after an SGD step) vs fp64
        assert 0 < r["max_abs_err"] < 1e-4 and "loss" in r["error_metric"]
        assert r["max_abs_err"] == max(r["step1_loss_err"], r["step2_loss_err"])


def test_resnet_d_compares_against_torch_backend(tmp_path):
    path = tmp_path / "r.json"
    assert cli.main(["bench", "--arch", "resnet18d", "-b", "1", "--img-size", "32", "--iters", "2",
                     "--warmup", "1", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert [r["impl"] for r in records] == ["resnet_fast", "resnet_fast_torch_backend"]
    assert all(r["max_rel_err"] < 1e-4 for r in records)


def test_refuses_to_overwrite_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_cli, "_bench", lambda *a: pytest.fail("benchmark ran despite the existing file"))
    for flag in ("--json", "--csv"):
        path = tmp_path / f"old.{flag[2:]}"
        path.write_text("keep me")
        assert _run(flag, str(path)) == 2
        assert "already exists; pass --overwrite" in capsys.readouterr().err
        assert path.read_text() == "keep me"


def test_overwrite_replaces(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    flags = [*TINY, "--impls", "resnet_fast", "--json", str(path), "--overwrite"]
    assert bench.main(flags) == 0  # the stand-alone entry point (python -m resnet_fast.bench)
    record, = json.loads(path.read_text())
    assert record["impl"] == "resnet_fast" and record["command"] == ["resnet-fast", "bench", *flags]


@pytest.mark.parametrize("flags, message", [
    (["--arch", "resnet51"], "unknown --arch 'resnet51'; expected one of resnet18"),
    (["--arch", "resnet18,bogus"], "unknown --arch 'bogus'"),
    (["--impls", "tensorrt"], "unknown impl 'tensorrt'; expected one of resnet_fast"),
    (["--mode", "train", "--impls", "torchscript_frozen"], "inference-only"),
    (["--arch", "resnet50d", "--impls", "torchvision_eager"], "torchvision has no resnet50d"),
    (["--impls", "torch_compile"], "--no-compile conflicts"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["-b", "0"], "--batch-size must be integers >= 1, got '0'"),
    (["-b", "1,x"], "--batch-size must be integers >= 1, got 'x'"),
    (["--dtype", "fp32,fp8"], "unknown --dtype 'fp8'; expected one of fp32, fp16, bf16"),
    (["--max-time", "0"], "--max-time must be > 0"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_flags_give_clear_errors(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(bench_cli, "_bench", lambda *a: pytest.fail("benchmark ran despite a bad flag"))
    assert _run(*flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_failed_contender_is_reported(tmp_path, capsys, monkeypatch):
    build = contenders.build

    def failing(impl, *args):
        if impl == "torchvision_channels_last":
            raise RuntimeError("boom")
        return build(impl, *args)
    monkeypatch.setattr(bench_cli, "build", failing)
    path = tmp_path / "r.json"
    assert _run("--impls", "resnet_fast,torchvision_channels_last", "--json", str(path)) == 1
    records = {r["impl"]: r for r in json.loads(path.read_text())}
    assert records["torchvision_channels_last"]["error"] == "RuntimeError: boom"
    assert records["torchvision_channels_last"]["img_per_s"] is None
    assert records["resnet_fast"]["img_per_s"] > 0 and records["resnet_fast"]["speedup_vs"] == {}
    assert "FAILED  RuntimeError: boom" in capsys.readouterr().out


def test_rounds_are_interleaved_with_rotating_order():
    order = []
    steps = {name: (lambda n=name: order.append(n)) for name in "abc"}
    progress = timing.Progress(9)
    times = timing.interleaved(steps, 3, timing.Timer(torch.device("cpu")), progress)
    progress.close()
    assert order == list("abc" "bca" "cab")
    assert all(len(t) == 3 and min(t) > 0 for t in times.values())


def test_time_limit_stops_after_min_rounds():
    steps = {name: (lambda: None) for name in "ab"}
    progress = timing.Progress(2 * 10)
    times = timing.interleaved(steps, 10, timing.Timer(torch.device("cpu")), progress, max_time=1e-9)
    progress.close()
    assert {len(t) for t in times.values()} == {timing.MIN_ROUNDS}


def test_cpu_default_is_time_limited_unless_iters_given():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    default = bench_cli.plan(parser.parse_args(["--device", "cpu"]))
    assert (default.max_time, default.iters, default.runs[0][0].batch_size) == (45.0, 20, 8)
    assert bench_cli.plan(parser.parse_args(["--device", "cpu", "--iters", "5"])).max_time is None
    assert bench_cli.plan(parser.parse_args(["--device", "cpu", "--iters", "5", "--max-time", "9"])).max_time == 9


def test_batch_sizes_and_dtypes_make_one_run_each():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    todo = bench_cli.plan(parser.parse_args(["--device", "cpu", "-b", "1,8", "-b", "32", "--dtype", "fp32,bf16"]))
    rows = [(spec.dtype, spec.batch_size, spec.channels_last, impls) for spec, impls in todo.runs]
    fp32 = ["resnet_fast", "torchvision_eager", "torchvision_channels_last", "torch_compile", "torchscript_frozen"]
    bf16 = ["resnet_fast", "torchvision_channels_last", "torch_compile"]  # eager's bf16 CPU path is channels_last
    assert rows == [(torch.float32, b, False, fp32) for b in (1, 8, 32)] + [(torch.bfloat16, b, True, bf16)
                                                                            for b in (1, 8, 32)]


def test_one_run_records_every_batch_size_and_dtype(tmp_path):
    path = tmp_path / "r.json"
    assert _run("-b", "1", "--dtype", "fp32,bf16", "--impls", "resnet_fast,torchvision_channels_last",
                "--json", str(path)) == 0
    records = json.loads(path.read_text())
    assert [(r["dtype"], r["batch_size"], r["impl"]) for r in records] == [
        (d, b, i) for d in ("fp32", "bf16") for b in (2, 1) for i in ("resnet_fast", "torchvision_channels_last")]
    assert all(r["img_per_s"] > 0 and r["error"] is None for r in records)


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    progress = timing.Progress(2, "x")
    progress.update()
    progress.set_description("timing")
    progress.update()
    progress.close()
    assert capsys.readouterr().err == "\rx: 1/2\rtiming: 1/2\rtiming: 2/2\n"


def test_throughput_percentiles():
    seconds = [0.5, 0.25, 1.0, 0.2, 0.4]  # img/s at batch 2: 4, 8, 2, 10, 5
    stats = timing.throughput(seconds, 2)
    rates = torch.tensor([4.0, 8, 2, 10, 5], dtype=torch.float64)
    assert stats["img_per_s"] == pytest.approx(5.0)
    assert stats["p20"] == pytest.approx(torch.quantile(rates, 0.2).item())
    assert stats["p80"] == pytest.approx(torch.quantile(rates, 0.8).item())
    assert timing.percentile([3.0], 20) == 3.0


def test_measure_warms_up_then_times_each_call():
    # the clock of benchmarks/ceilings.py and bench_ops.py
    calls = []
    stats = timing.measure(lambda: calls.append(None), torch.device("cpu"), reps=5, warmup=2)
    assert len(calls) == 2 + 5
    assert 0 < stats.min <= stats.p20 <= stats.median <= stats.p80
    assert timing.spread([4.0, 1, 3, 2, 5]) == pytest.approx((3.0, 1.8, 4.2, 1.0))


def test_envinfo_collect():
    info = envinfo.collect("cpu")
    for key in ("device", "torch", "triton", "torchvision", "cuda", "cudnn", "python", "commit", "cpu", "cores"):
        assert key in info
    assert info["device"] == info["cpu"] and info["cpu"]
    assert info["torch"] == torch.__version__
    assert info["commit"] == "unknown" or len(info["commit"]) == 40
    json.dumps(info)


@pytest.mark.gpu
def test_tiny_run_on_cuda(tmp_path):
    path = tmp_path / "r.json"
    assert cli.main(["bench", "--arch", "resnet18", "-b", "8", "--img-size", "64", "--iters", "3",
                     "--warmup", "2", "--compile-mode", "default", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert [r["impl"] for r in records] == ["resnet_fast", "torchvision_eager", "torchvision_channels_last",
                                            "torch_compile"]
    for r in records:
        assert r["device"] == torch.cuda.get_device_name() and r["dtype"] == "bf16"
        assert r["img_per_s"] > 0 and r["max_rel_err"] < 0.05
