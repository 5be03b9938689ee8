"""`resnet-fast train`: train a resnet_fast model (or the tutorials' plain CNN).

    resnet-fast train --arch resnet18 --data synthetic --epochs 2
    resnet-fast train --recipe imagenette-resnet50d --data imagenette:~/data/imagenette --amp bf16
    resnet-fast train --resume runs/resnet18/last.pt
    torchrun --nproc_per_node 8 -m resnet_fast train --recipe imagenette-resnet50d ...

Writes last.pt and best.pt (see checkpoint.py), metrics.csv and curves.png to
--output-dir; prints a progress bar on stderr and one line per epoch on stdout.
Exit codes: 0 done, 2 bad flags / data / checkpoint (one line on stderr),
3 the loss became NaN or infinite (the last good checkpoint is kept),
143 / 130 stopped by SIGTERM / SIGINT (128 + the signal number): the first
signal finishes the current step, writes last.pt there and prints where it
stopped and how to resume (under torchrun every rank stops after the same
step); a second one kills the process at once with the same status, leaving
last.pt as the last complete save (see stop.py). A Ctrl-C before training
starts exits with 130 too.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import sys

import numpy as np
import torch
from torch import nn

from .. import envinfo
from . import checkpoint, data, distributed, model, options
from .errors import ConfigError, TrainError
from .loop import Loaders, Trainer

add_arguments = options.add_arguments

__all__ = ["add_arguments", "run", "main"]


def _check_output_dir(cfg: options.Config) -> None:
    last = cfg.output_dir / "last.pt"
    if not last.exists() or cfg.overwrite:
        return
    if cfg.resume is None:
        raise ConfigError(f"{cfg.output_dir} already holds a run (last.pt): continue it with --resume {last}, "
                          "replace it with --overwrite, or pick another --output-dir")
    if not last.samefile(cfg.resume):
        raise ConfigError(f"--output-dir {cfg.output_dir} holds a last.pt that is not {cfg.resume}; resuming "
                          "would replace it (pass --overwrite or another --output-dir)")


def _check_machine(cfg: options.Config, ctx: distributed.Context) -> None:
    if cfg.batch_size % ctx.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch; it must divide evenly over "
                          f"{ctx.world_size} processes")
    if cfg.sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices: torch's SyncBatchNorm does not run on CPU")
    if cfg.amp == "bf16" and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16: {torch.cuda.get_device_name(ctx.device)} has no bfloat16 support; "
                          "use --amp fp16")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _header(cfg: options.Config, ctx: distributed.Context, splits: data.Splits, net: nn.Module) -> list[str]:
    params = sum(p.numel() for p in net.parameters())
    lines = [
        f"resnet-fast train: {cfg.arch} ({params / 1e6:.2f}M params) on {splits.description}",
        f"  {ctx.device.type} x{ctx.world_size}, global batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}, "
        f"schedule {cfg.schedule}, wd {cfg.weight_decay:g}, amp {cfg.amp}, {cfg.img_size}px, "
        f"{cfg.epochs} epochs -> {cfg.output_dir}" + (f" (recipe {cfg.recipe})" if cfg.recipe else ""),
    ]
    info = envinfo.collect()
    lines.append("  " + ", ".join(f"{k}={v}" for k, v in info.items() if isinstance(v, (str, int, float, bool))))
    return lines


def _run(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> int:
    ckpt = checkpoint.load(args.resume) if getattr(args, "resume", None) else None
    cfg = options.resolve(args, ckpt["config"] if ckpt else None)
    ctx = distributed.setup(cfg.device)
    say = print if ctx.is_main else (lambda *a, **k: None)
    _check_output_dir(cfg)
    _check_machine(cfg, ctx)
    _seed_everything(cfg.seed)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes

    splits = data.load_splits(cfg.data, cfg.img_size, cfg.size)
    if ckpt:
        checkpoint.check_fits(ckpt, cfg.resume, splits.num_classes, splits.in_channels)
    net = model.build(cfg.arch, splits.num_classes, splits.in_channels)
    if ckpt:
        checkpoint.load_model(net, ckpt, cfg.resume)
    net = net.to(ctx.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    if cfg.sync_bn and ctx.distributed:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    train_model = net
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if cfg.compile:
        train_model = torch.compile(train_model)

    per_rank = cfg.batch_size // ctx.world_size
    train, sampler, val = data.make_loaders(splits, per_rank, ctx.world_size, ctx.rank, cfg.seed, cfg.workers,
                                            pin_memory=ctx.device.type == "cuda")
    steps = sampler.num_samples // per_rank
    if steps == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size}: the training set ({len(splits.train)} images) "
                          "is smaller than one batch")
    trainer = Trainer(cfg, ctx, net, train_model, Loaders(train, sampler, val, per_rank, steps),
                      splits.num_classes, splits.in_channels, say)
    if ckpt:
        trainer.restore(ckpt)
    if ctx.is_main:
        print("\n".join(_header(cfg, ctx, splits, net)))
    if ckpt:
        p = trainer.progress
        say(f"  resuming {cfg.resume}: epoch {p['epoch'] + 1}, batch {p['batch']}/{steps}, step {p['global_step']}")
    if cfg.sync_bn and not ctx.distributed:
        say("note: --sync-bn has no effect in a single process")
    cleanup.enter_context(trainer.stop)  # signal handlers from here until after teardown
    return trainer.fit()


def run(args: argparse.Namespace) -> int:
    """Run `resnet-fast train` with parsed flags; returns the exit code."""
    with contextlib.ExitStack() as cleanup:
        try:
            return _run(args, cleanup)
        except TrainError as exc:
            if distributed.is_main_process():
                print(f"resnet-fast train: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            if distributed.is_main_process():
                print("resnet-fast train: interrupted; last.pt in the output dir holds the last saved state",
                      file=sys.stderr)
            return 130
        finally:
            distributed.teardown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resnet-fast train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
