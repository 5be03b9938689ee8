"""The training loop: steps, validation, checkpoints and metrics, epoch by epoch.

Where a run stands is `self.progress` (a dict of primitives saved in every
checkpoint): the epoch, how many of its batches are done, the global step, the
partial epoch's loss sum, the best top-1 so far and the metrics history. With
the model, optimizer, scheduler, GradScaler and RNG states that is everything
a resumed run needs to continue as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, plots, stop
from .distributed import Context
from .errors import ConfigError, DivergedError
from .options import Config
from .progress import Progress

# Steps between host syncs (progress bar, NaN check and, under DDP, the stop
# signal). Under DDP the sync is a collective, so it happens at the same step
# on every rank.
SYNC_EVERY = 10
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader
    sampler: object  # data.ResumableSampler
    val: torch.utils.data.DataLoader
    per_rank_batch: int
    steps_per_epoch: int


class Trainer:
    def __init__(self, cfg: Config, ctx: Context, net: nn.Module, train_model: nn.Module, loaders: Loaders,
                 num_classes: int, in_channels: int, say: Callable[..., None]):
        self.cfg, self.ctx, self.net, self.model, self.loaders = cfg, ctx, net, train_model, loaders
        self.num_classes, self.in_channels, self.say = num_classes, in_channels, say
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.optimizer = build_optimizer(cfg, net.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer, loaders.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
        self.progress = {"epoch": 0, "batch": 0, "global_step": 0, "loss_sum": 0.0,
                         "best_top1": -1.0, "history": []}
        self.out: Path = cfg.output_dir
        self.last_saved: str | None = None  # where this run's last.pt stands, for the divergence message
        self.curves_note_shown = False
        self.stop = stop.StopRequest(announce=ctx.is_main, hold=ctx.distributed)

    # --- state ---------------------------------------------------------------

    def restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = dict(ckpt["progress"], history=list(ckpt["progress"]["history"]))
        self.last_saved = self._position()
        checkpoint.restore_rng(ckpt["rng"])

    def _position(self) -> str:
        p = self.progress
        return f"epochs done: {p['epoch']}" + (f", plus {p['batch']} batches" if p["batch"] else "")

    def _payload(self, rng: dict) -> dict:
        return {
            "arch": self.cfg.arch, "num_classes": self.num_classes, "in_channels": self.in_channels,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng, "config": self.cfg.saved(), "progress": self.progress,
        }

    # --- steps ---------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def _to_device(self, x, y):
        x = x.to(self.ctx.device, non_blocking=True, memory_format=self.memory_format)
        return x, y.to(self.ctx.device, non_blocking=True)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            loss = self.criterion(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach().float()

    def _global_loss_sum(self, local_sum: torch.Tensor, where: str) -> float:
        """Sum over steps of the global-batch mean loss; stops the run if not finite."""
        total = self.ctx.all_reduce_sum(local_sum.clone()).item() / self.ctx.world_size
        if not math.isfinite(total):
            self._diverged(f"the training loss became {total} {where}")
        return total

    def _diverged(self, what: str):
        last = self.out / "last.pt"
        kept = (f"the last good checkpoint is {last} ({self.last_saved})" if self.last_saved
                else "no checkpoint of this run was written")
        raise DivergedError(f"{what}; stopping: {kept}. Try a lower --lr or --amp none")

    def _stop_signal(self, sync: bool) -> int | None:
        """The signal to stop on, or None. One process: checked after every step.
        Under DDP the ranks agree at sync points (the largest signal number wins),
        so they all stop after the same step."""
        if not self.ctx.distributed:
            return self.stop.signum
        if not sync:
            return None
        flag = torch.tensor(float(self.stop.signum or 0), device=self.ctx.device)
        return int(self.ctx.all_reduce_max(flag).item()) or None

    def _save_position(self, local_sum: torch.Tensor) -> None:
        """last.pt at the current step, mid-epoch (--save-every, a stop signal): the
        epoch's loss so far moves into progress, which the checkpoint carries."""
        p = self.progress
        p["loss_sum"] += self._global_loss_sum(local_sum, f"in epoch {p['epoch'] + 1} by batch {p['batch']}")
        local_sum.zero_()
        if self.ctx.is_main:
            self._save_last(self._payload(checkpoint.capture_rng()))

    def _train_epoch(self) -> tuple[str | int, float, int]:
        """Train to the end of the epoch, to --max-steps or to a stop signal.
        Returns (why it ended: "end", "max_steps" or the signal's number, seconds, images trained)."""
        cfg, p, loaders = self.cfg, self.progress, self.loaders
        loaders.sampler.start_epoch(p["epoch"], skip=p["batch"] * loaders.per_rank_batch)
        bar = Progress(f"epoch {p['epoch'] + 1}/{cfg.epochs}", loaders.steps_per_epoch, self.ctx.is_main)
        self.model.train()
        local_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        start, steps, ended = time.perf_counter(), 0, "end"
        for x, y in loaders.train:
            local_sum += self._step(*self._to_device(x, y))
            steps += 1
            p["batch"] += 1
            p["global_step"] += 1
            sync = steps == 1 or steps % SYNC_EVERY == 0
            signum = self._stop_signal(sync)
            if cfg.max_steps is not None and p["global_step"] >= cfg.max_steps \
                    and p["batch"] < loaders.steps_per_epoch:
                ended = "max_steps"
            if signum is not None:
                ended = signum
            if (sync or signum is not None) and ended != "max_steps":
                where = f"in epoch {p['epoch'] + 1} by batch {p['batch']}"
                loss = (p["loss_sum"] + self._global_loss_sum(local_sum, where)) / p["batch"]
                bar.update(p["batch"], loss, steps * cfg.batch_size / (time.perf_counter() - start))
            save_due = cfg.save_every is not None and p["global_step"] % cfg.save_every == 0 \
                and p["batch"] < loaders.steps_per_epoch and ended == "end"  # else the epoch's end saves
            if signum is not None or save_due:
                self._save_position(local_sum)
            if ended != "end":
                break
        else:  # the epoch's last batch: the ranks' last chance to agree on a stop before validation
            signum = self._stop_signal(sync=True)
            if signum is not None:
                ended = signum
                self._save_position(local_sum)
        p["loss_sum"] += self._global_loss_sum(local_sum, f"in epoch {p['epoch'] + 1} by batch {p['batch']}")
        elapsed, images = time.perf_counter() - start, steps * cfg.batch_size
        bar.update(p["batch"], p["loss_sum"] / max(p["batch"], 1), images / max(elapsed, 1e-9))
        bar.close()
        return ended, elapsed, images

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float, float]:
        """(mean loss, top-1 %, top-5 %) over the whole validation set, all ranks together."""
        self.net.eval()
        k = min(5, self.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)
        for x, y in self.loaders.val:
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.net(x)
            logits = logits.float()
            hits = logits.topk(k, dim=1).indices == y[:, None]
            sums[0] += F.cross_entropy(logits, y, reduction="sum")
            sums[1] += hits[:, 0].sum()
            sums[2] += hits.any(dim=1).sum()
            sums[3] += len(y)
        self.ctx.all_reduce_sum(sums)
        self.net.train()
        loss, top1, top5, n = sums.tolist()
        return loss / n, 100.0 * top1 / n, 100.0 * top5 / n

    # --- epochs --------------------------------------------------------------

    def _record(self, row: dict) -> None:
        history = [r for r in self.progress["history"] if r["epoch"] != row["epoch"]]
        self.progress["history"] = history + [row]

    def _save_last(self, payload: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self.out / "last.pt", payload)
        self.last_saved = self._position()

    def _write(self, rng: dict, improved: bool) -> None:
        payload = self._payload(rng)
        self._save_last(payload)
        if improved:
            checkpoint.save(self.out / "best.pt", payload)
        plots.write_metrics(self.out / "metrics.csv", self.progress["history"])
        skipped = plots.plot_curves(self.out / "curves.png", self.progress["history"])
        if skipped and not self.curves_note_shown:
            self.say(f"note: curves.png not written: {skipped}")
            self.curves_note_shown = True

    def _stopped(self, signum: int) -> int:
        """The one line that says where a signal stopped the run; returns the exit code.
        No rank leaves before rank 0 has written last.pt: torchrun signals the others
        as soon as one exits."""
        self.ctx.barrier()
        self.stop.done = True
        p, last = self.progress, self.out / "last.pt"
        where = (f"after step {p['global_step']} (epoch {p['epoch'] + 1}, batch {p['batch']}/"
                 f"{self.loaders.steps_per_epoch})" if p["batch"] else
                 f"at the end of epoch {p['epoch']} (step {p['global_step']})")
        flags = f"--resume {last}" + (f" --save-every {self.cfg.save_every}" if self.cfg.save_every else "")
        command = (f"torchrun <your launch flags> -m resnet_fast train {flags}" if self.ctx.distributed
                   else f"resnet-fast train {flags}")
        self.say(f"stopped by {stop.name(signum)} {where}; {last} holds this position. Resume with: {command}",
                 flush=True)
        return stop.exit_code(signum)

    def fit(self) -> int:
        """Train to the end, to --max-steps or to a stop signal (install self.stop
        first); returns the exit code."""
        cfg, p = self.cfg, self.progress
        if cfg.max_steps is not None and p["global_step"] >= cfg.max_steps:
            raise ConfigError(f"--max-steps {cfg.max_steps}: the run is already at step {p['global_step']}")
        if p["epoch"] >= cfg.epochs:
            self.say(f"nothing to do: the run has finished its {cfg.epochs} epochs")
            return 0
        while p["epoch"] < cfg.epochs:
            ended, elapsed, images = self._train_epoch()
            if isinstance(ended, int):
                return self._stopped(ended)
            cut_short = ended == "max_steps"
            # The RNG state to continue from: mid-epoch that is now, before the
            # extra validation; at an epoch end it is after validation.
            rng = checkpoint.capture_rng() if cut_short else None
            val_loss, top1, top5 = self._evaluate()
            if not math.isfinite(val_loss):
                self._diverged(f"the validation loss became {val_loss} after epoch {p['epoch'] + 1}")
            row = {"epoch": p["epoch"] + 1, "steps": p["batch"], "train_loss": p["loss_sum"] / p["batch"],
                   "val_loss": val_loss, "val_top1": top1, "val_top5": top5,
                   "lr": self.optimizer.param_groups[0]["lr"], "time_s": round(elapsed, 3),
                   "img_per_s": round(images / max(elapsed, 1e-9), 1)}
            self._record(row)
            if not cut_short:
                p.update(epoch=p["epoch"] + 1, batch=0, loss_sum=0.0)
            improved = top1 > p["best_top1"]
            p["best_top1"] = max(top1, p["best_top1"])
            if self.ctx.is_main:
                self._write(rng or checkpoint.capture_rng(), improved)
            partial = f" (cut at batch {row['steps']}/{self.loaders.steps_per_epoch})" if cut_short else ""
            self.say(f"epoch {row['epoch']}/{cfg.epochs}{partial}: train loss {row['train_loss']:.4f}  "
                     f"val loss {val_loss:.4f}  val top-1 {top1:.2f}%  top-5 {top5:.2f}%  "
                     f"lr {row['lr']:.3g}  {row['img_per_s']:,.0f} img/s  {row['time_s']:.1f}s", flush=True)
            if cfg.max_steps is not None and p["global_step"] >= cfg.max_steps:
                if p["epoch"] < cfg.epochs:
                    self.say(f"stopped at --max-steps {cfg.max_steps}; continue with --resume {self.out / 'last.pt'}")
                return 0
            signum = self._stop_signal(sync=True) if p["epoch"] < cfg.epochs else None
            if signum is not None:  # it came during validation or the epoch's checkpoint
                return self._stopped(signum)
        return 0
