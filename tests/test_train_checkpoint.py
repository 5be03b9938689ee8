"""Checkpoints: atomic writes, exact resumes, clear refusals, NaN stops."""
import csv
import random

import numpy as np
import pytest
import torch
from train_data import FAST, one_thread, train, write_imagefolder  # noqa: F401 (one_thread: autouse)

from resnet_fast.train import checkpoint, data
from resnet_fast.train.files import atomic_write


def _load(path):
    return torch.load(path, weights_only=True)


def _assert_same_state(a, b):
    """Bitwise-equal weights, buffers and optimizer state."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for name in sa[index]:
            assert torch.equal(torch.as_tensor(sa[index][name]), torch.as_tensor(sb[index][name])), (index, name)
    assert a["scheduler"] == b["scheduler"]
    assert a["progress"]["global_step"] == b["progress"]["global_step"]


def _metrics(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last.pt"
    atomic_write(target, lambda f: f.write(b"old"))

    def fail_halfway(f):
        f.write(b"half of the new one")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_halfway)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    saved = checkpoint.capture_rng()
    expected = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    torch.save(saved, tmp_path / "rng.pt")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_one_epoch_then_resume_to_two_equals_two_straight_epochs(capsys, tmp_path):
    flags = [*FAST, "--schedule", "none"]
    rc, _, err = train(capsys, *flags, "--epochs", "2", "--output-dir", tmp_path / "straight")
    assert rc == 0, err
    rc, _, err = train(capsys, *flags, "--epochs", "1", "--output-dir", tmp_path / "split")
    assert rc == 0, err
    rc, out, err = train(capsys, "--resume", tmp_path / "split" / "last.pt", "--epochs", "2")
    assert rc == 0, err
    assert "resuming" in out and "epoch 2/2" in out and "epoch 1/2" not in out

    _assert_same_state(_load(tmp_path / "straight" / "last.pt"), _load(tmp_path / "split" / "last.pt"))
    straight, split = _metrics(tmp_path / "straight" / "metrics.csv"), _metrics(tmp_path / "split" / "metrics.csv")
    for a, b in zip(straight, split, strict=True):
        assert (a["epoch"], a["train_loss"], a["val_loss"], a["val_top1"]) == \
               (b["epoch"], b["train_loss"], b["val_loss"], b["val_top1"])


def test_resume_mid_epoch_with_adam_and_onecycle_is_exact(capsys, tmp_path):
    """--max-steps cuts epoch 1 after 5 of 16 batches: the resumed run must pick
    up the sampler position, the OneCycle step and Adam's moments."""
    flags = [*FAST, "--optimizer", "adam", "--epochs", "2"]
    rc, _, err = train(capsys, *flags, "--output-dir", tmp_path / "straight")
    assert rc == 0, err
    rc, out, err = train(capsys, *flags, "--max-steps", "5", "--output-dir", tmp_path / "split")
    assert rc == 0, err
    assert "cut at batch 5/16" in out and "--resume" in out
    cut = _load(tmp_path / "split" / "last.pt")
    assert (cut["progress"]["epoch"], cut["progress"]["batch"], cut["scheduler"]["last_epoch"]) == (0, 5, 5)

    rc, _, err = train(capsys, "--resume", tmp_path / "split" / "last.pt")
    assert rc == 0, err
    straight, split = _load(tmp_path / "straight" / "last.pt"), _load(tmp_path / "split" / "last.pt")
    _assert_same_state(straight, split)
    assert split["scheduler"]["last_epoch"] == 32
    # the cut epoch's row is replaced by the whole epoch's, with the same mean loss
    assert _metrics(tmp_path / "straight" / "metrics.csv")[0]["train_loss"] == \
        _metrics(tmp_path / "split" / "metrics.csv")[0]["train_loss"]


def test_resume_restores_the_grad_scaler(capsys, tmp_path):
    flags = [*FAST, "--amp", "fp16", "--batch-size", "64"]
    rc, _, err = train(capsys, *flags, "--max-steps", "2", "--output-dir", tmp_path)
    assert rc == 0, err
    assert _load(tmp_path / "last.pt")["scaler"]["_growth_tracker"] == 2
    rc, _, err = train(capsys, "--resume", tmp_path / "last.pt", "--max-steps", "3")
    assert rc == 0, err
    assert _load(tmp_path / "last.pt")["scaler"]["_growth_tracker"] == 3  # a fresh scaler would say 1


def test_resumed_runs_keep_their_settings(capsys, tmp_path):
    rc, _, err = train(capsys, *FAST, "--max-steps", "1", "--output-dir", tmp_path)
    assert rc == 0, err
    for argv, message in [(["--arch", "resnet18"], "--arch resnet18 differs from cnn"),
                          (["--lr", "0.1"], "--lr 0.1 differs from 0.05"),
                          (["--epochs", "9"], "onecycle schedule laid out over 5 epochs"),
                          (["--data", "cifar10:/x"], "not the kind of data")]:
        rc, _, err = train(capsys, "--resume", tmp_path / "last.pt", *argv)
        assert rc == 2 and err.count("\n") == 1 and message in err, err


def _garbage(path, ckpt):
    path.write_bytes(b"\x00garbage" * 100)


def _truncated(path, ckpt):
    path.write_bytes(path.read_bytes()[:1000])


def _bare_state_dict(path, ckpt):
    torch.save(ckpt["model"], path)


def _pickled_module(path, ckpt):
    torch.save(torch.nn.Linear(2, 2), path)  # needs weights_only=False: refused


def _other_arch(path, ckpt):
    ckpt["arch"] = ckpt["config"]["arch"] = "cnn_nobn"  # cnn weights (with BN) under another arch
    torch.save(ckpt, path)


def _newer_version(path, ckpt):
    torch.save(dict(ckpt, version=99), path)


@pytest.mark.parametrize("spoil, message", [
    (_garbage, "not a readable checkpoint"),
    (_truncated, "not a readable checkpoint"),
    (_bare_state_dict, "a bare state_dict"),
    (_pickled_module, "not a readable checkpoint"),
    (_other_arch, "weights do not fit cnn_nobn with 10 classes: unexpected 0.1.weight"),
    (_newer_version, "checkpoint version 99"),
])
def test_spoiled_checkpoints_are_refused_in_one_line(capsys, tmp_path, spoil, message):
    rc, _, err = train(capsys, *FAST, "--max-steps", "1", "--output-dir", tmp_path)
    assert rc == 0, err
    spoil(tmp_path / "last.pt", _load(tmp_path / "last.pt"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rc, out, err = train(capsys, "--resume", tmp_path / "last.pt")
    assert rc == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert "epoch" not in out  # no silent fresh start
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_checkpoint_for_other_classes_is_refused(capsys, tmp_path):
    root = write_imagefolder(tmp_path / "data")
    rc, _, err = train(capsys, *FAST, "--data", root, "--batch-size", "4", "--max-steps", "1",
                       "--output-dir", tmp_path / "run")
    assert rc == 0, err
    write_imagefolder(tmp_path / "more", classes=("cow",))
    for split in ("train", "val"):
        (tmp_path / "more" / split / "cow").rename(root / split / "cow")
    rc, _, err = train(capsys, "--resume", tmp_path / "run" / "last.pt")
    assert rc == 2 and "checkpoint has 3 classes" in err and "the data has 4" in err, err


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    per_epoch = 512 + 128  # train + val items read by one epoch
    calls = {"n": 0}
    clean = data.SyntheticImages.__getitem__

    def poisoned(self, index):
        calls["n"] += 1
        image, label = clean(self, index)
        return (image * float("nan") if calls["n"] > per_epoch + 64 else image), label

    monkeypatch.setattr(data.SyntheticImages, "__getitem__", poisoned)
    rc, out, err = train(capsys, *FAST, "--epochs", "3", "--output-dir", tmp_path)
    assert rc == 3 and "Traceback" not in err
    error = err.splitlines()[-1]  # after the progress bar's lines
    assert error.startswith("resnet-fast train: error: the training loss became nan in epoch 2"), err
    assert f"the last good checkpoint is {tmp_path / 'last.pt'} (epochs done: 1)" in error
    last = _load(tmp_path / "last.pt")
    assert last["progress"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert len(_metrics(tmp_path / "metrics.csv")) == 1


def test_nan_in_the_first_epoch_writes_no_checkpoint(capsys, tmp_path, monkeypatch):
    clean = data.SyntheticImages.__getitem__
    monkeypatch.setattr(data.SyntheticImages, "__getitem__",
                        lambda self, index: (clean(self, index)[0] * float("inf"), 0))
    rc, _, err = train(capsys, *FAST, "--output-dir", tmp_path)
    assert rc == 3 and "by batch 1;" in err and "no checkpoint of this run was written" in err, err
    assert not (tmp_path / "last.pt").exists()
