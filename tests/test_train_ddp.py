"""`torchrun -m resnet_fast.train`: DistributedDataParallel on CPU (gloo).

What makes the comparison true: with --batch-size as the global batch, the two
ranks' DistributedSampler shards of each step together hold exactly the
samples one process gets (tests/test_train_data.py checks this), and DDP
averages the ranks' mean-loss gradients, which is the gradient of the global
mean. The only batch-coupled layer in a ResNet, BatchNorm, would normalise
each rank's half-batch with its own statistics; SyncBatchNorm fixes that but
runs on CUDA only. So this test trains `cnn_nobn` (seed 004's CNN without
BatchNorm), for which DDP and one process compute the same function and the
remaining differences are float summation order.
"""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from train_data import FAST, one_thread, train  # noqa: F401 (one_thread: autouse)

REPO = Path(__file__).resolve().parents[1]
FLAGS = [*FAST, "--arch", "cnn_nobn", "--epochs", "1"]


def _metrics(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(capsys, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "resnet_fast.train", *map(str, FLAGS), "--output-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("resnet-fast train: cnn_nobn") == 1  # only rank 0 prints
    assert "cpu x2, global batch 32" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.suffix != ".png") == \
        ["best.pt", "last.pt", "metrics.csv"]

    rc, _, err = train(capsys, *FLAGS, "--output-dir", tmp_path / "one")
    assert rc == 0, err

    ddp, one = _metrics(tmp_path / "ddp" / "metrics.csv"), _metrics(tmp_path / "one" / "metrics.csv")
    assert ddp[0]["steps"] == one[0]["steps"] == 16
    for key in ("train_loss", "val_loss"):
        assert abs(ddp[0][key] - one[0][key]) <= 1e-5 * abs(one[0][key]), key
    assert abs(ddp[0]["val_top1"] - one[0]["val_top1"]) <= 100 / 128  # at most one near-tie flips

    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)

    # The tolerance can tell runs apart: one process on half the batch (what a
    # rank would do without DDP's gradient averaging) lands far outside it.
    rc, _, err = train(capsys, *FLAGS, "--batch-size", "16", "--output-dir", tmp_path / "half")
    assert rc == 0, err
    half = torch.load(tmp_path / "half" / "last.pt", weights_only=True)["model"]
    assert all(not torch.allclose(half[k], b[k], rtol=1e-5, atol=1e-6) for k in b)


def test_sync_bn_on_cpu_processes_is_refused(capsys, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    rc, _, err = train(capsys, *FAST, "--sync-bn", "--output-dir", tmp_path)
    assert rc == 2 and "--sync-bn needs CUDA devices" in err
    assert not torch.distributed.is_initialized()  # run() tore the process group down
