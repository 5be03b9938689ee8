"""The `resnet-fast` command: bench (the default), train, tune, info."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__


def _info(args: argparse.Namespace) -> int:
    from . import __file__ as package_file
    from .envinfo import collect
    from .ops import dispatch

    print(f"{'resnet_fast':>12}: {__version__} ({Path(package_file).parent})")
    for key, value in collect().items():
        print(f"{key:>12}: {value}")
    print("\n".join(dispatch.explain()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import bench, train, tune

    parser = argparse.ArgumentParser(prog="resnet-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"resnet-fast {__version__}")
    sub = parser.add_subparsers(dest="command")
    bench.add_arguments(sub.add_parser("bench", help="benchmark resnet_fast against torchvision and torch.compile"))
    train.add_arguments(sub.add_parser("train", help="train a model (tutorial recipes, ImageFolder, CIFAR-10)"))
    tune.add_arguments(sub.add_parser("tune", help="tune a model's Triton kernels ahead of time (cached on disk)"))
    sub.add_parser("info", help="versions, devices and which backends are available (and why not)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["bench", *argv]  # `resnet-fast` alone runs the default benchmark
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "train":
        from . import train
        return train.run(args)
    if args.command == "tune":
        from . import tune
        return tune.run(args)
    from . import bench
    return bench.run(args)
