"""Data sets and loaders for `resnet-fast train`. Nothing is ever downloaded.

--data synthetic          fixed random images (10 classes, 512 train / 128 val), no files
--data cifar10:ROOT       torchvision.datasets.CIFAR10's layout: ROOT/cifar-10-batches-py/
                          data_batch_1..5 and test_batch (the python pickles)
--data imagenette:ROOT    torchvision.datasets.Imagenette's layout: ROOT/imagenette2-160/ or
                          ROOT/imagenette2-320/ (--size) with train/ and val/ class folders
--data PATH               an ImageFolder root: PATH/train/<class>/*.png|jpg and PATH/val/<class>/...

Images become --img-size squares: Imagenette is center-cropped without resizing
(as seed 004 does: 320px -> 224, 160px -> 128), CIFAR-10 is resized (seed 000
resizes to 224), an ImageFolder is resized on the short side then
center-cropped. All are normalised with the ImageNet mean and std. There is no
random augmentation: each sample is a pure function of its index, which keeps
resumes exact whatever --workers is.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import cifar_pickle, stop
from .errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("synthetic", "cifar10", "imagenette", "imagefolder")


@dataclass(frozen=True)
class DataSpec:
    kind: str
    root: Path | None = None


def parse_spec(spec: str) -> DataSpec:
    if spec == "synthetic":
        return DataSpec("synthetic")
    for kind in ("cifar10", "imagenette"):
        if spec.startswith(kind + ":"):
            root = spec[len(kind) + 1:]
            if not root:
                raise DataError(f"--data {spec}: expected {kind}:ROOT with the data set's root folder")
            return DataSpec(kind, Path(root).expanduser())
    if re.match(r"^[A-Za-z0-9_-]+:", spec) and not Path(spec).exists():
        raise DataError(f"--data {spec}: unknown data kind; expected synthetic, cifar10:ROOT, "
                        "imagenette:ROOT or an ImageFolder path")
    return DataSpec("imagefolder", Path(spec).expanduser())


class Splits(NamedTuple):
    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    description: str


# --- synthetic -------------------------------------------------------------

class SyntheticImages(Dataset):
    """A smooth per-class pattern plus per-sample noise: learnable, and the
    same tensors on every run, process and worker (seeded by index)."""

    CLASSES, TRAIN, VAL = 10, 512, 128

    def __init__(self, img_size: int, train: bool):
        g = torch.Generator().manual_seed(20240605)
        coarse = torch.randn(self.CLASSES, 3, 4, 4, generator=g)
        # 0.2: faint enough against unit noise that learning takes a few epochs
        self.patterns = 0.2 * F.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.length = self.TRAIN if train else self.VAL
        self.offset = 0 if train else self.TRAIN

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        label = index % self.CLASSES
        g = torch.Generator().manual_seed(self.offset + index)
        noise = torch.randn(self.patterns.shape[1:], generator=g)
        return self.patterns[label] + noise, label


# --- CIFAR-10 ----------------------------------------------------------------

class Cifar10(Dataset):
    """CIFAR-10 read from the python pickles by cifar_pickle, which trusts nothing a file
    declares (torchvision's CIFAR10 runs plain pickle.load, after checking the official md5
    sums, which rejects any other copy of the layout)."""

    FOLDER = "cifar-10-batches-py"

    def __init__(self, root: Path, train: bool, transform):
        from PIL import Image  # Pillow is needed for file data sets only
        self._to_image = Image.fromarray
        base = root / self.FOLDER
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise DataError(f"CIFAR-10 not found: {base} lacks {', '.join(missing)} (expected "
                            f"ROOT/{self.FOLDER}/data_batch_1..5 and test_batch, torchvision.datasets.CIFAR10's "
                            f"layout; nothing is downloaded){_archive_hint(root / 'cifar-10-python.tar.gz')}")
        images, labels = [], []
        for name in names:
            try:
                planes, batch_labels = cifar_pickle.images_and_labels(cifar_pickle.load(base / name))
            except Exception as exc:
                reason = (str(exc).splitlines() or [""])[0]
                raise DataError(f"CIFAR-10 batch {base / name} is unreadable ({type(exc).__name__}: {reason}); "
                                "expected a pickled dict with 'data' (N x 3072 uint8) and 'labels'") from None
            images.append(planes)
            labels.extend(batch_labels)
        self.data = np.concatenate(images).transpose(0, 2, 3, 1)  # NCHW planes -> HWC images
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(self._to_image(self.data[index])), self.targets[index]


def _archive_hint(archive: Path) -> str:
    return f"; {archive} is there: extract it with tar -xzf" if archive.is_file() else ""


# --- image folders (ImageFolder, Imagenette) -----------------------------------

def _image_folders(train_dir: Path, val_dir: Path, transform, layout: str, hint: str = ""):
    from torchvision.datasets import ImageFolder  # torchvision is imported only for file data sets
    splits = []
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise DataError(f"{folder} not found; expected {layout}{hint}")
        try:
            splits.append(ImageFolder(str(folder), transform=transform))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{folder}: {str(exc).splitlines()[0]} (expected {layout})") from None
    train, val = splits
    if train.classes != val.classes:
        raise DataError(f"class folders differ between {train_dir} ({len(train.classes)}) and "
                        f"{val_dir} ({len(val.classes)}); expected {layout}")
    return train, val


def _transform(kind: str, img_size: int):
    from torchvision import transforms as T
    if kind == "imagenette":
        steps = [T.CenterCrop(img_size)]
    elif kind == "cifar10":
        steps = [] if img_size == 32 else [T.Resize((img_size, img_size))]
    else:
        steps = [T.Resize(img_size), T.CenterCrop(img_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_splits(spec_text: str, img_size: int, size: int) -> Splits:
    spec = parse_spec(spec_text)
    if spec.kind == "synthetic":
        train, val = SyntheticImages(img_size, True), SyntheticImages(img_size, False)
        return Splits(train, val, SyntheticImages.CLASSES, 3,
                      f"synthetic: {len(train)} train / {len(val)} val, {SyntheticImages.CLASSES} classes")
    transform = _transform(spec.kind, img_size)
    if spec.kind == "cifar10":
        train, val = Cifar10(spec.root, True, transform), Cifar10(spec.root, False, transform)
        return Splits(train, val, 10, 3, f"CIFAR-10 at {spec.root}: {len(train)} train / {len(val)} val")
    if spec.kind == "imagenette":
        base = spec.root / f"imagenette2-{size}"
        layout = (f"ROOT/imagenette2-{size}/train/<wnid>/*.JPEG and .../val/<wnid>/*.JPEG "
                  "(torchvision.datasets.Imagenette's layout; --size picks 160 or 320; nothing is downloaded)")
        train, val = _image_folders(base / "train", base / "val", transform, layout,
                                    _archive_hint(spec.root / f"imagenette2-{size}.tgz"))
    else:
        layout = "PATH/train/<class>/*.jpg|png and PATH/val/<class>/*.jpg|png (an ImageFolder root)"
        train, val = _image_folders(spec.root / "train", spec.root / "val", transform, layout)
    return Splits(train, val, len(train.classes), 3,
                  f"{spec.kind} at {spec.root}: {len(train)} train / {len(val)} val, {len(train.classes)} classes")


# --- samplers and loaders ----------------------------------------------------

class ResumableSampler(DistributedSampler):
    """DistributedSampler (one shuffle per epoch, seeded by seed + epoch, the
    same on every rank) that can start `skip` samples into an epoch: a resumed
    run continues with exactly the batches the interrupted one had not seen."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Every world_size-th index from rank: the shards cover the data set once,
    without DistributedSampler's padding, so summed metrics are exact."""

    def __init__(self, length: int, num_replicas: int, rank: int):
        self.indices = range(rank, length, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(splits: Splits, per_rank_batch: int, world_size: int, rank: int, seed: int,
                 workers: int, pin_memory: bool):
    sampler = ResumableSampler(splits.train, world_size, rank, seed)
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                  worker_init_fn=stop.ignore_in_worker if workers > 0 else None)
    # drop_last: every step sees a full batch (BatchNorm needs > 1 sample; DDP
    # ranks need the same number of steps).
    train = DataLoader(splits.train, batch_size=per_rank_batch, sampler=sampler, drop_last=True, **common)
    val = DataLoader(splits.val, batch_size=per_rank_batch,
                     sampler=ShardSampler(len(splits.val), world_size, rank), **common)
    return train, sampler, val
