"""`resnet-fast train --data`: CIFAR-10 pickles, Imagenette and ImageFolder trees
(PNG and JPEG), synthetic data, samplers, and the errors for missing data."""
import csv

import numpy as np
import pytest
import torch
from train_data import (FAST, one_thread, train, write_cifar10, write_imagefolder,  # noqa: F401 (autouse)
                        write_imagenette)

from resnet_fast.train import data
from resnet_fast.train.errors import DataError


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar10(root)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def imagenette_root(tmp_path_factory):
    return write_imagenette(tmp_path_factory.mktemp("imagenette"), size=160)


def _unnormalize(x):
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    return x * std + mean


def test_cifar10_pickles_decode_to_the_written_pixels(cifar_root):
    root, written = cifar_root
    transform = data._transform("cifar10", 32)
    train, val = data.Cifar10(root, True, transform), data.Cifar10(root, False, transform)
    assert len(train) == 5 * 8 and len(val) == 8
    for dataset, index, (hwc, labels), i in [(train, 0, written["data_batch_1"], 0),
                                            (train, 13, written["data_batch_2"], 5),
                                            (val, 7, written["test_batch"], 7)]:
        image, label = dataset[index]
        assert label == labels[i]
        expected = torch.from_numpy(hwc[i]).permute(2, 0, 1).float() / 255  # channel planes in RGB order
        torch.testing.assert_close(_unnormalize(image), expected, rtol=0, atol=1e-5)


def test_train_on_cifar10_resized(capsys, tmp_path, cifar_root):
    root, _ = cifar_root
    rc, out, err = train(capsys, *FAST, "--data", f"cifar10:{root}", "--batch-size", "8", "--epochs", "1",
                         "--output-dir", tmp_path)
    assert rc == 0, err
    assert "CIFAR-10 at" in out and "40 train / 8 val" in out
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["steps"]) for r in csv.DictReader(f)] == [5]


def test_train_on_imagefolder_of_png_and_jpeg(capsys, tmp_path, folder_root):
    kinds = {p.suffix for p in folder_root.rglob("*.*")}
    assert kinds == {".png", ".jpg"}
    rc, out, err = train(capsys, *FAST, "--data", folder_root, "--batch-size", "4", "--epochs", "1",
                         "--output-dir", tmp_path)
    assert rc == 0, err
    assert "12 train / 6 val, 3 classes" in out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["num_classes"] == 3


def test_train_on_imagenette_160_with_a_worker(capsys, tmp_path, imagenette_root):
    rc, out, err = train(capsys, *FAST, "--data", f"imagenette:{imagenette_root}", "--size", "160",
                         "--img-size", "32", "--batch-size", "8", "--max-steps", "2", "--workers", "1",
                         "--output-dir", tmp_path)
    assert rc == 0, err
    assert "40 train / 10 val, 10 classes" in out


def test_imagenette_center_crops_without_resizing(imagenette_root):
    splits = data.load_splits(f"imagenette:{imagenette_root}", 32, 160)
    image, _ = splits.train[0]
    assert image.shape == (3, 32, 32)
    path, _ = splits.train.samples[0]
    from PIL import Image
    full = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    top, left = (full.shape[1] - 32) // 2, (full.shape[2] - 32) // 2
    torch.testing.assert_close(_unnormalize(image), full[:, top:top + 32, left:left + 32], rtol=0, atol=1e-5)


def _break_cifar(root):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (base / name).write_bytes(b"\x80\x02garbage")


def _mismatched_classes(root):
    write_imagefolder(root)
    (root / "val" / "cat").rename(root / "val" / "cow")


@pytest.mark.parametrize("make, spec, message", [
    (lambda root: None, "cifar10:{root}", "cifar-10-batches-py/data_batch_1..5 and test_batch"),
    (_break_cifar, "cifar10:{root}", "is unreadable"),
    (lambda root: write_imagenette(root, size=160), "imagenette:{root}", "imagenette2-320/train/<wnid>"),
    (lambda root: (root / "train" / "a").mkdir(parents=True), "{root}", "PATH/train/<class>"),
    (lambda root: None, "{root}/nowhere", "an ImageFolder root"),
    (_mismatched_classes, "{root}", "class folders differ"),
])
def test_missing_or_malformed_data_is_one_clear_line(capsys, tmp_path, make, spec, message):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    rc, _, err = train(capsys, *FAST, "--data", spec.format(root=root), "--output-dir", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this calls os.system: what a crafted CIFAR-10 batch would do to plain pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


class _CodecBomb:
    def __reduce__(self):
        import codecs
        return codecs.encode, ("x" * 10, "rot13")  # _codecs.encode is admitted for latin1 bytes only


@pytest.mark.parametrize("payload", ["top", "nested", "codec"])
def test_malicious_cifar_pickle_is_refused_without_running_it(capsys, tmp_path, payload):
    import pickle

    root = tmp_path / "data"
    write_cifar10(root)
    marker = tmp_path / "PWNED"
    evil = {"top": lambda: _RunsCode(marker),
            "nested": lambda: {"data": np.zeros((8, 3072), np.uint8), "labels": [0] * 7 + [_RunsCode(marker)]},
            "codec": lambda: {"data": _CodecBomb(), "labels": [0] * 8}}[payload]()
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    rc, out, err = train(capsys, *FAST, "--data", f"cifar10:{root}", "--output-dir", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "data_batch_3 is unreadable (UnpicklingError: " in err
    assert ("refused posix.system" in err or "refused os.system" in err) if payload != "codec" else "rot13" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_synthetic_data_is_fixed_and_balanced():
    a, b = data.SyntheticImages(16, True), data.SyntheticImages(16, True)
    val = data.SyntheticImages(16, False)
    assert len(a) == 512 and len(val) == 128
    for i in (0, 7, 511):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not torch.equal(a[0][0], val[0][0])
    assert np.bincount([a[i][1] for i in range(len(a))]).tolist() == [52] * 2 + [51] * 8


def test_ddp_shards_make_the_same_global_batches_and_resume_skips_exactly():
    dataset = list(range(64))
    single = data.ResumableSampler(dataset, 1, 0, seed=3)
    shards = [data.ResumableSampler(dataset, 2, r, seed=3) for r in (0, 1)]
    for s in (single, *shards):
        s.start_epoch(2)
    order = list(single)
    per_rank = [list(s) for s in shards]
    for k in range(4):  # global batch 16 = 2 ranks x 8
        assert sorted(per_rank[0][8 * k:8 * k + 8] + per_rank[1][8 * k:8 * k + 8]) == sorted(order[16 * k:16 * k + 16])
    single.start_epoch(2, skip=16)
    assert list(single) == order[16:] and len(single) == 48
    single.start_epoch(3)
    assert list(single) != order  # a new shuffle each epoch


def test_val_shards_cover_the_data_once():
    shards = [list(data.ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_parse_spec():
    assert data.parse_spec("synthetic") == data.DataSpec("synthetic")
    assert data.parse_spec("cifar10:/d").kind == "cifar10"
    assert data.parse_spec("imagenette:~/d").root.is_absolute()
    assert data.parse_spec("relative/folder").kind == "imagefolder"
    with pytest.raises(DataError, match="expected cifar10:ROOT"):
        data.parse_spec("cifar10:")
