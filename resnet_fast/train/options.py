"""Flags of `resnet-fast train` and how they combine into one Config.

Precedence, lowest first: built-in defaults < --recipe < the saved settings of
the checkpoint given to --resume < flags typed on the command line. Every flag
parses to None when absent, which is how "typed" is told apart from "default".

A resumed run keeps its training settings: typing one that differs from the
checkpoint is an error rather than a silently different run. Allowed to change:
--epochs (only with --schedule none: OneCycle and cosine are laid out over the
original length), the data root (not its kind), and the run-only settings
(--workers, --device, --channels-last, --compile, --max-steps, --save-every,
--output-dir).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import parse_spec
from .errors import ConfigError
from .model import ARCHS
from .recipes import RECIPES

# The settings a checkpoint carries; None means "derived" (see _derive).
DEFAULTS = dict(
    arch="resnet18", data="synthetic", size=320, img_size=None, epochs=5, batch_size=64,
    optimizer="sgd", lr=None, schedule="onecycle", weight_decay=5e-4, label_smoothing=0.0,
    amp="none", seed=0, sync_bn=False, recipe=None,
    channels_last=False, compile=False, workers=None, device="auto",
)
# Changing these would make the resumed run a different run.
LOCKED = ("arch", "size", "img_size", "batch_size", "optimizer", "lr", "schedule",
          "weight_decay", "label_smoothing", "amp", "seed", "sync_bn", "recipe")


@dataclass(frozen=True)
class Config:
    arch: str
    data: str
    size: int
    img_size: int
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    schedule: str
    weight_decay: float
    label_smoothing: float
    amp: str
    seed: int
    sync_bn: bool
    recipe: str | None
    channels_last: bool
    compile: bool
    workers: int
    device: str
    # run-only: not saved in checkpoints
    output_dir: Path
    resume: Path | None
    overwrite: bool
    max_steps: int | None
    save_every: int | None

    def saved(self) -> dict:
        """The settings stored in a checkpoint (primitives only)."""
        return {k: v for k, v in asdict(self).items() if k in DEFAULTS}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bool_flag = argparse.BooleanOptionalAction
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="synthetic (default: deterministic random images, no download) | "
                      "cifar10:ROOT (ROOT/cifar-10-batches-py/) | imagenette:ROOT (ROOT/imagenette2-160 "
                      "or -320/) | PATH (an ImageFolder root with train/ and val/)")
    data.add_argument("--size", type=int, choices=(160, 320),
                      help="Imagenette variant: imagenette2-160 or imagenette2-320 (default 320)")
    data.add_argument("--img-size", type=_positive_int,
                      help="side of the square images fed to the model (default: 32 for synthetic "
                      "and CIFAR-10, 224 for Imagenette 320 and ImageFolder, 128 for Imagenette 160)")
    data.add_argument("--workers", type=_non_negative_int,
                      help="DataLoader worker processes per process (default min(4, CPUs))")

    train = parser.add_argument_group("training")
    train.add_argument("--recipe", choices=sorted(RECIPES), metavar="NAME",
                       help=f"settings from the tutorials: {', '.join(sorted(RECIPES))} "
                       "(table in resnet_fast/train/recipes.py)")
    train.add_argument("--arch", choices=ARCHS, metavar="ARCH",
                       help=f"model, default resnet18: {', '.join(ARCHS)} (cnn, cnn_nobn: the Imagenette "
                       "tutorial's plain CNN with and without BatchNorm)")
    train.add_argument("--epochs", type=_positive_int, help="default 5")
    train.add_argument("--batch-size", type=_positive_int,
                       help="global batch size, split evenly over torchrun processes (default 64)")
    train.add_argument("--lr", type=_positive_float,
                       help="(peak) learning rate (default 0.05 for sgd, 1e-3 for adam)")
    train.add_argument("--optimizer", choices=("sgd", "adam"), help="sgd uses momentum 0.9 (default sgd)")
    train.add_argument("--schedule", choices=("onecycle", "cosine", "none"),
                       help="learning-rate schedule, stepped every batch (default onecycle)")
    train.add_argument("--weight-decay", type=_non_negative_float, help="default 5e-4")
    train.add_argument("--label-smoothing", type=_fraction, help="default 0")
    train.add_argument("--amp", choices=("bf16", "fp16", "none"),
                       help="autocast precision; fp16 adds a GradScaler (default none)")
    train.add_argument("--channels-last", action=bool_flag, help="NHWC memory format")
    train.add_argument("--compile", action=bool_flag, help="torch.compile the training model")
    train.add_argument("--sync-bn", action=bool_flag,
                       help="SyncBatchNorm across torchrun processes (CUDA only)")
    train.add_argument("--seed", type=int, help="seeds init and data order (default 0)")
    train.add_argument("--max-steps", type=_positive_int,
                       help="stop after this many optimizer steps in total (smoke tests); "
                       "the checkpoint then resumes mid-epoch")
    train.add_argument("--save-every", type=_positive_int, metavar="N",
                       help="also write last.pt every N optimizer steps, mid-epoch (resumes exactly); "
                       "a SIGTERM or SIGINT always saves the step it stops at")

    run = parser.add_argument_group("run")
    run.add_argument("--device", help="auto (default: cuda if available), cpu, cuda or cuda:N")
    run.add_argument("--output-dir", type=Path,
                     help="checkpoints, metrics.csv, curves.png (default runs/<recipe or arch>, "
                     "or the --resume file's folder)")
    run.add_argument("--resume", type=Path, metavar="CKPT", help="continue the run saved in CKPT exactly")
    run.add_argument("--overwrite", action="store_true", default=None,
                     help="allow replacing the run already in --output-dir")


def _typed(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}


def _data_kind(spec: str) -> str:
    return parse_spec(spec).kind


def _check_resume(typed: dict, saved: dict, resume: Path) -> None:
    for key in LOCKED:
        if key in typed and typed[key] != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {typed[key]} differs from {saved[key]} in {resume}; a resumed run "
                              "keeps its training settings (start a new run to change them)")
    if "data" in typed and _data_kind(typed["data"]) != _data_kind(saved["data"]):
        raise ConfigError(f"--data {typed['data']} is not the kind of data {resume} was trained on "
                          f"({saved['data']})")
    if typed.get("epochs", saved["epochs"]) != saved["epochs"] and saved["schedule"] != "none":
        raise ConfigError(f"--epochs {typed['epochs']}: {resume} uses a {saved['schedule']} schedule laid out "
                          f"over {saved['epochs']} epochs; only --schedule none runs can be extended")


def _derive(cfg: dict) -> dict:
    if cfg["lr"] is None:
        cfg["lr"] = 0.05 if cfg["optimizer"] == "sgd" else 1e-3
    if cfg["img_size"] is None:
        kind = _data_kind(cfg["data"])
        cfg["img_size"] = {"synthetic": 32, "cifar10": 32, "imagefolder": 224}.get(
            kind, 224 if cfg["size"] == 320 else 128)
    if cfg["workers"] is None:
        cfg["workers"] = min(4, os.cpu_count() or 1)
    return cfg


def resolve(args: argparse.Namespace, saved: dict | None = None) -> Config:
    """Combine defaults, recipe, the resumed checkpoint's settings (`saved`) and typed flags."""
    typed = _typed(args)
    resume = getattr(args, "resume", None)
    if saved is not None:
        _check_resume(typed, saved, resume)
        cfg = {**saved, **typed}
    else:
        recipe = RECIPES[typed["recipe"]].settings if typed.get("recipe") else {}
        cfg = _derive({**DEFAULTS, **recipe, **typed})
    if resume is not None:
        default_out = resume.parent
    else:
        default_out = Path("runs") / (cfg["recipe"] or cfg["arch"])
    return Config(**cfg, output_dir=getattr(args, "output_dir", None) or default_out, resume=resume,
                  overwrite=bool(getattr(args, "overwrite", None)), max_steps=getattr(args, "max_steps", None),
                  save_every=getattr(args, "save_every", None))
