"""Tiny data sets in the real on-disk formats, and helpers, for tests/test_train*.py.

CIFAR-10: the python pickles of torchvision.datasets.CIFAR10 (py2-style dicts
with 'data' N x 3072 uint8 planes and 'labels'). Imagenette: the
imagenette2-160 folder tree with .JPEG files and noisy_imagenette.csv. An
ImageFolder root mixing RGB PNG, grayscale PNG and JPEG files.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_fast.train import main as train_main

# Fast flags: the plain CNN on 16px images, no worker processes.
FAST = ["--arch", "cnn", "--img-size", "16", "--batch-size", "32", "--workers", "0", "--device", "cpu"]
WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
         "n03394916", "n03417042", "n03425413", "n03445777", "n03888605"]


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's 2 cores are shared: an OpenMP team of 2 that has to
    wait for a busy core makes each step ~50x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(capsys, *argv) -> tuple[int, str, str]:
    """Run `resnet-fast train ARGV` in this process: (exit code, stdout, stderr)."""
    rc = train_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _class_image(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """Noise around a per-class colour, so the classes are learnable."""
    base = np.array([(label * 73) % 256, (label * 151) % 256, (label * 37) % 256], dtype=np.float64)
    return np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def write_cifar10(root: Path, per_batch: int = 8, test: int = 8) -> dict[str, tuple[np.ndarray, list[int]]]:
    """ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; returns what each batch holds."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        labels = [int(v) for v in rng.integers(0, 10, n)]
        hwc = np.stack([_class_image(rng, label, 32, 32) for label in labels])
        data = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
        entry = {"batch_label": name, "labels": labels, "data": data,
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (hwc, labels)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f, protocol=2)
    return written


def write_image_tree(split_dir: Path, classes: list[str], per_class: int, kinds: tuple[str, ...],
                     size: tuple[int, int] = (40, 36), ext_jpeg: str = ".jpg", seed: int = 0) -> None:
    """split_dir/<class>/<i>.<ext>; kinds cycles over "png" (RGB), "gray" (L-mode PNG) and "jpeg"."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = split_dir / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            kind = kinds[(label + i) % len(kinds)]
            image = Image.fromarray(_class_image(rng, label, size[1], size[0]))
            if kind == "gray":
                image.convert("L").save(folder / f"{i}.png")
            elif kind == "png":
                image.save(folder / f"{i}.png")
            else:
                image.save(folder / f"{i}{ext_jpeg}", quality=90)


def write_imagefolder(root: Path, classes=("cat", "dog", "ship")) -> Path:
    for split, n in (("train", 4), ("val", 2)):
        write_image_tree(root / split, list(classes), n, ("png", "jpeg", "gray"), seed=len(split))
    return root


def write_imagenette(root: Path, size: int = 160) -> Path:
    """ROOT/imagenette2-SIZE/{train,val}/<wnid>/*.JPEG plus noisy_imagenette.csv (tiny images)."""
    base = root / f"imagenette2-{size}"
    rows = ["path,noisy_labels_0,noisy_labels_1,noisy_labels_5,noisy_labels_25,noisy_labels_50,is_valid"]
    for split, n in (("train", 4), ("val", 1)):
        write_image_tree(base / split, WNIDS, n, ("jpeg",), size=(44, 40), ext_jpeg=".JPEG", seed=n)
        for path in sorted((base / split).rglob("*.JPEG")):
            wnid = path.parent.name
            rows.append(f"{path.relative_to(base).as_posix()},{','.join([wnid] * 5)},{split == 'val'}")
    (base / "noisy_imagenette.csv").write_text("\n".join(rows) + "\n")
    return root
