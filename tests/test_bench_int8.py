"""`resnet-fast bench --dtype int8` (CPU): its plan, its refusals and a tiny run of the int8 contenders."""
import argparse
import json

import pytest
import torch

from resnet_fast import bench, cli
from resnet_fast.bench import cli as bench_cli, int8

TINY = ["--arch", "resnet18", "-b", "2", "--img-size", "32", "--iters", "3", "--warmup", "1", "--device", "cpu"]


def _plan(*flags):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench_cli.plan(parser.parse_args(list(flags)))


def test_int8_in_a_dtype_list_races_the_int8_contenders():
    todo = _plan("--device", "cpu", "--dtype", "fp32,int8", "-b", "8")
    (fp32, fp32_impls), (q, q_impls) = todo.runs
    assert fp32.dtype == torch.float32 and "torchvision_int8" not in fp32_impls
    want = ["resnet_fast", "torchvision_int8", *(["pt2e_int8"] if int8.pt2e_available() else []), "torch_compile"]
    assert q.int8 and q.model_dtype == torch.float32 and q_impls == want


def test_resnet_d_int8_has_no_torchvision_contenders():
    (spec, impls), = _plan("--device", "cpu", "--dtype", "int8", "--arch", "resnet18d").runs
    assert impls == ["resnet_fast"]


@pytest.mark.parametrize("flags, message", [
    (["--mode", "train"], "--dtype int8 is CPU inference only"),
    (["--impls", "torchvision_eager"], "has no int8 path"),
    (["--arch", "resnet34", "--impls", "torchvision_int8"], "torchvision has no quantized resnet34"),
])
def test_bad_int8_flags_give_clear_errors(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(bench_cli, "_bench", lambda *a: pytest.fail("benchmark ran despite a bad flag"))
    assert cli.main(["bench", *TINY, "--dtype", "int8", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_int8_contenders_need_dtype_int8(capsys):
    assert cli.main(["bench", *TINY, "--impls", "torchvision_int8"]) == 2
    assert "use --dtype int8" in capsys.readouterr().err


def test_tiny_int8_run_reports_errors_and_top1_agreement(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["bench", *TINY, "--dtype", "int8", "--impls", "resnet_fast,torchvision_int8",
                     "--json", str(path)]) == 0
    records = {r["impl"]: r for r in json.loads(path.read_text())}
    for r in records.values():
        assert r["dtype"] == "int8" and r["error"] is None and r["img_per_s"] > 0
        assert 0 < r["max_rel_err"] < 0.3 and 0 <= r["top1_agree"] <= 1
    assert "top1 agree" in capsys.readouterr().out
