"""One process or many: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK.

Under torchrun each process drives one device (cuda:LOCAL_RANK, or the CPU)
and joins the process group: nccl on CUDA, gloo on CPU. Rank 0 alone prints
and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _device(flag: str, local_rank: int, distributed: bool) -> torch.device:
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise ConfigError(f"--device {flag}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {flag}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {flag}: no CUDA device is available (torch.cuda.is_available() is False)")
        if distributed and device.index is not None:
            raise ConfigError(f"--device {flag}: under torchrun pass --device cuda; each process uses cuda:LOCAL_RANK")
        index = local_rank if distributed else (device.index or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {flag}: cuda:{index} does not exist ({torch.cuda.device_count()} devices)")
        device = torch.device("cuda", index)
    return device


def setup(device_flag: str) -> Context:
    if not launched_by_torchrun():
        return Context(device=_device(device_flag, 0, False))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device(device_flag, int(os.environ.get("LOCAL_RANK", 0)), True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(device=device, rank=rank, world_size=world, distributed=True)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
