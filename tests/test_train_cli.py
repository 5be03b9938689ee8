"""`resnet-fast train`: flags, recipes, outputs, refusals (tiny synthetic runs on CPU)."""
import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_data import FAST, one_thread, train  # noqa: F401  (one_thread: autouse fixture)

from resnet_fast.models.simple_cnn import simple_cnn
from resnet_fast.train import add_arguments, options
from resnet_fast.train.plots import COLUMNS
from resnet_fast.train.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]


def _resolve(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options.resolve(parser.parse_args(list(argv)))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_recipes_hold_the_tutorials_settings_and_flags_override_them():
    cfg = _resolve("--recipe", "imagenette-resnet50d")
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule) == ("resnet50d", "sgd", 0.05, 5e-4,
                                                                                "onecycle")
    assert (cfg.batch_size, cfg.epochs, cfg.size, cfg.img_size) == (128, 20, 320, 224)
    assert cfg.data.startswith("imagenette:") and cfg.output_dir == Path("runs/imagenette-resnet50d")
    assert "83.13%" in RECIPES["imagenette-resnet50d"].expected

    cfg = _resolve("--recipe", "imagenette-resnet50d", "--epochs", "3", "--lr", "0.1", "--data", "synthetic")
    assert (cfg.epochs, cfg.lr, cfg.data, cfg.batch_size) == (3, 0.1, "synthetic", 128)

    cfg = _resolve("--recipe", "imagenette-resnet18")
    assert (cfg.arch, cfg.size, cfg.img_size, cfg.epochs, cfg.batch_size) == ("resnet18", 160, 128, 5, 128)

    cfg = _resolve("--recipe", "cifar10-resnet18")
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.schedule) == ("resnet18", "adam", 1e-3, 64, "none")
    assert cfg.data.startswith("cifar10:")


def test_defaults_derive_from_optimizer_and_data():
    assert _resolve().lr == 0.05 and _resolve("--optimizer", "adam").lr == 1e-3
    assert _resolve().img_size == 32  # synthetic
    assert _resolve("--data", "imagenette:/x", "--size", "160").img_size == 128
    assert _resolve("--data", "imagenette:/x").img_size == 224
    assert _resolve("--data", "/some/folder").img_size == 224


def test_synthetic_run_writes_checkpoints_metrics_and_curves(capsys, tmp_path):
    out = tmp_path / "run"
    rc, stdout, stderr = train(capsys, *FAST, "--epochs", "2", "--output-dir", out)
    assert rc == 0, stderr
    assert {"last.pt", "best.pt", "metrics.csv"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    rows = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and tuple(rows[0]) == COLUMNS
    for row in rows:
        assert float(row["train_loss"]) > 0 and 0 <= float(row["val_top1"]) <= float(row["val_top5"]) <= 100
        assert int(row["steps"]) == 512 // 32
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns

    epoch_lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("val top-1" in line and "top-5" in line for line in epoch_lines)
    assert "img/s" in stderr and " loss " in stderr  # the progress bar

    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["arch"] == "cnn" and ckpt["num_classes"] == 10 and ckpt["progress"]["epoch"] == 2
    assert ckpt["model"].keys() == simple_cnn(10).state_dict().keys()

    pytest.importorskip("matplotlib")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_are_skipped_with_a_note_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rc, stdout, stderr = train(capsys, *FAST, "--max-steps", "1", "--output-dir", tmp_path)
    assert rc == 0, stderr
    assert "curves.png not written: matplotlib is not installed" in stdout
    assert (tmp_path / "metrics.csv").exists() and not (tmp_path / "curves.png").exists()


def test_refuses_to_overwrite_an_existing_run(capsys, tmp_path):
    rc, _, err = train(capsys, *FAST, "--max-steps", "1", "--output-dir", tmp_path)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    rc, _, err = train(capsys, *FAST, "--max-steps", "1", "--output-dir", tmp_path)
    assert rc == 2
    assert err.count("\n") == 1 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    rc, _, err = train(capsys, *FAST, "--max-steps", "1", "--seed", "1", "--output-dir", tmp_path, "--overwrite")
    assert rc == 0, err
    assert (tmp_path / "last.pt").read_bytes() != before["last.pt"]


@pytest.mark.parametrize("argv, message", [
    (["--data", "mnist:/nowhere"], "unknown data kind"),
    (["--batch-size", "1024"], "smaller than one batch"),
    (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
    (["--max-steps", "1", "--sync-bn"], None),  # one process: a note, not an error
])
def test_bad_settings_get_one_line_errors(capsys, tmp_path, argv, message):
    rc, stdout, err = train(capsys, *FAST, *argv, "--output-dir", tmp_path)  # the last of a repeated flag wins
    if message is None:
        assert rc == 0 and "--sync-bn has no effect in a single process" in stdout
        return
    assert rc == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(capsys, tmp_path):
    rc, _, err = train(capsys, *FAST, "--device", "cuda", "--output-dir", tmp_path)
    assert rc == 2 and "no CUDA device is available" in err


def test_command_line_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "resnet_fast.train", "--resume", str(bad)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not a readable checkpoint" in proc.stderr, proc.stderr


def test_resnet18_checkpoint_loads_into_torchvision(capsys, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    import resnet_fast

    rc, _, err = train(capsys, "--arch", "resnet18", "--img-size", "32", "--batch-size", "8", "--max-steps", "2",
                       "--workers", "0", "--device", "cpu", "--output-dir", tmp_path)
    assert rc == 0, err
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(ckpt["model"])  # strict: same keys and shapes
    ours = resnet_fast.resnet18(num_classes=10)
    ours.load_state_dict(ckpt["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), resnet_fast.use_backend("torch"):
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv, saved", [
    (["--schedule", "cosine", "--label-smoothing", "0.1", "--weight-decay", "0"],
     dict(schedule="cosine", label_smoothing=0.1, weight_decay=0.0)),
    (["--amp", "bf16", "--optimizer", "adam"], dict(amp="bf16", optimizer="adam", lr=1e-3)),
    (["--channels-last", "--compile"], dict(channels_last=True, compile=True)),
])
def test_training_flags_reach_the_run(capsys, tmp_path, monkeypatch, argv, saved):
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):  # Dynamo without inductor's C++ build: seconds, not minutes
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    rc, _, err = train(capsys, *FAST, *argv, "--max-steps", "2", "--output-dir", tmp_path)
    assert rc == 0, err
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {k: ckpt["config"][k] for k in saved} == saved
    assert ckpt["model"].keys() == simple_cnn(10).state_dict().keys()  # no _orig_mod. prefixes
    assert len(compiled) == int("--compile" in argv)
    if "--channels-last" in argv:
        assert ckpt["model"]["0.0.weight"].is_contiguous(memory_format=torch.channels_last)
    if "cosine" in argv:
        assert ckpt["scheduler"]["T_max"] == 5 * 16 and ckpt["scheduler"]["last_epoch"] == 2


def test_progress_bar_redraws_in_place_on_a_terminal():
    import io

    from resnet_fast.train.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = Progress("epoch 1/2", total=4, enabled=True, stream=stream)
    for done in range(1, 5):
        bar.update(done, loss=2.5 / done, img_per_s=1234.0)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "4/4 loss 0.6250 1,234 img/s" in text
