"""Checkpoints of `resnet-fast train` (last.pt, best.pt).

A checkpoint is a dict of tensors and primitives only, so it loads with
torch.load(weights_only=True):

    format, version      "resnet_fast.train.checkpoint", 1
    arch, num_classes, in_channels
    model                plain state_dict with torchvision's keys: for the resnets,
                         torchvision.models.<arch>(num_classes=...).load_state_dict(ckpt["model"])
    optimizer, scheduler, scaler   their state_dicts (scheduler None for --schedule none)
    rng                  torch / cuda / numpy / python generator states, as tensors
    config               the run's settings (see options.Config.saved)
    progress             epoch, batch (position inside it), global_step, partial-epoch
                         loss sum, best_top1, history (one metrics row per epoch)
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError
from .files import atomic_write
from .options import DEFAULTS

FORMAT = "resnet_fast.train.checkpoint"
VERSION = 1
KEYS = ("arch", "num_classes", "in_channels", "model", "optimizer", "scheduler", "scaler", "rng",
        "config", "progress")


def capture_rng() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        for index, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


def save(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def load(path: Path) -> dict:
    """Read and sanity-check a checkpoint; every failure is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"--resume {path}: not a readable checkpoint, corrupt or not written by "
                              f"torch.save ({_first_line(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        bare = isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        what = "a bare state_dict (weights only)" if bare else f"a {type(ckpt).__name__} without format {FORMAT!r}"
        raise CheckpointError(f"--resume {path}: not a resnet-fast train checkpoint ({what}); expected the "
                              "last.pt or best.pt of a resnet-fast train run")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"--resume {path}: checkpoint version {ckpt.get('version')!r}, this resnet_fast "
                              f"reads version {VERSION}")
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume {path}: incomplete checkpoint, missing {', '.join(missing)}")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["config"], dict) \
            or ckpt["config"].keys() != DEFAULTS.keys():
        raise CheckpointError(f"--resume {path}: malformed checkpoint ('model' must be a state_dict, "
                              f"'config' must hold {', '.join(DEFAULTS)})")
    return ckpt


def check_fits(ckpt: dict, path: Path, num_classes: int, in_channels: int) -> None:
    if ckpt["num_classes"] != num_classes or ckpt["in_channels"] != in_channels:
        raise CheckpointError(f"--resume {path}: checkpoint has {ckpt['num_classes']} classes and "
                              f"{ckpt['in_channels']} input channels, the data has {num_classes} and {in_channels}")


def load_model(net: nn.Module, ckpt: dict, path: Path) -> None:
    """Strict load with a one-line account of what does not fit."""
    own, theirs = net.state_dict(), ckpt["model"]
    problems = [f"missing {k}" for k in own if k not in theirs]
    problems += [f"unexpected {k}" for k in theirs if k not in own]
    problems += [f"{k} is {tuple(theirs[k].shape)} not {tuple(own[k].shape)}"
                 for k in own if k in theirs and theirs[k].shape != own[k].shape]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"--resume {path}: its weights do not fit {ckpt['arch']} with "
                              f"{ckpt['num_classes']} classes: {'; '.join(problems[:3])}{more}")
    net.load_state_dict(theirs)
