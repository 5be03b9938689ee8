"""`resnet-fast tune` through its entry function (the interpreter on CPU, at a tiny size), and the
first-call measurement `resnet-fast bench` makes with it."""
import json

import pytest
import torch

from resnet_fast import cli
from resnet_fast.ops import dispatch

TINY = ["--arch", "resnet18", "--batch-size", "1", "--img-size", "16", "--dtype", "fp32"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One tuning cache for this module: the first test tunes it cold, later ones find it warm."""
    if not dispatch.triton_status()[0]:
        pytest.skip(dispatch.triton_status()[1])
    from resnet_fast.ops.triton import tuner
    path = tmp_path_factory.mktemp("tuning")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tuner.CACHE_ENV, str(path))
        tuner.clear()
        yield path
    tuner.clear()


def test_tune_twice_tunes_nothing_the_second_time(module_cache, tmp_path, capsys):
    from resnet_fast.ops.triton import tuner
    first = tmp_path / "first.json"
    assert cli.main(["tune", *TINY, "--device", DEVICE, "--json", str(first)]) == 0
    out = capsys.readouterr().out.splitlines()
    record = json.loads(first.read_text())[0]
    keys = record["tuned_keys"]
    assert keys >= 10 and record["cached_keys"] == 0 and record["first_call_s"] > 0
    assert out[-1] == f"tuned {keys} keys, 0 from the cache"
    calls = record["calls"]
    assert len(calls) == 23  # resnet18: 20 convs + fc, the stem max-pool, the global average pool
    assert {c["op"] for c in calls} == {"conv_bias_act", "pool"}
    assert all(c["ranking"] and c["runs_on"] == c["ranking"][0]["candidate"] for c in calls)
    assert any("7x7/2 3->64 16x16 n1 fp32+relu (stem)" in line for line in out)  # the stem's line
    tuner.clear()  # a new process: nothing in memory, everything on disk
    assert cli.main(["tune", *TINY, "--device", DEVICE]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"tuned 0 keys, {keys} from the cache"


def test_tune_says_when_the_disk_cache_is_off(module_cache, monkeypatch, capsys, tmp_path):
    from resnet_fast import tune
    from resnet_fast.ops.triton import tuner
    monkeypatch.setattr(tune, "first_forward", lambda *args: (0.5, []))  # the header is what is checked
    monkeypatch.setattr(tuner, "_CACHE_OFF", {"conv_bias_act": "cannot read /x/numerics.py (Permission denied)"})
    out = tmp_path / "t.json"
    assert cli.main(["tune", *TINY, "--device", DEVICE, "--json", str(out)]) == 0
    assert "; cache off, conv_bias_act: cannot read /x/numerics.py (Permission denied): every process tunes " \
           "again)" in capsys.readouterr().out.splitlines()[0]
    assert json.loads(out.read_text())[0]["cache_off"].startswith("conv_bias_act: cannot read /x/numerics.py")


def test_tune_on_cpu_needs_the_interpreter(monkeypatch, capsys):
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    assert cli.main(["tune", *TINY, "--device", "cpu"]) == 2
    assert "--device cpu runs the Triton kernels in Triton's interpreter: set TRITON_INTERPRET=1" \
        in capsys.readouterr().err


@pytest.mark.parametrize("flags,match", [(["--batch-size", "0"], "--batch-size must be >= 1"),
                                         (["--device", "tpu"], "expected cuda, cuda:N or cpu")])
def test_tune_rejects_bad_flags(flags, match, capsys):
    assert cli.main(["tune", *TINY, *flags]) == 2
    assert match in capsys.readouterr().err


def test_bench_reports_the_first_call_cold_and_warm(module_cache, tmp_path, capsys):
    """Two new processes on a fresh tuning cache of their own: the first tunes every key, the second none.
    (This process finds the module's cache warm.)"""
    path = tmp_path / "bench.json"
    flags = ["--arch", "resnet18", "-b", "1", "--img-size", "16", "--iters", "1", "--warmup", "0", "--dtype", "fp32",
             "--backend", "triton", "--impls", "resnet_fast", "--device", DEVICE, "--json", str(path)]
    assert cli.main(["bench", *flags]) == 0
    (record,) = json.loads(path.read_text())
    assert record["first_call_cold_tuned_keys"] >= 10 and record["first_call_warm_tuned_keys"] == 0
    assert record["first_call_cold_s"] > 0 and record["first_call_warm_s"] > 0
    out = capsys.readouterr().out
    assert (f"resnet_fast first call in a new process: {record['first_call_cold_s']:.1f} s with a cold tuning cache "
            f"({record['first_call_cold_tuned_keys']} keys tuned), {record['first_call_warm_s']:.1f} s with a warm "
            "one (0 tuned)") in out
