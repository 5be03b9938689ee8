"""metrics.csv and curves.png in the output folder, rewritten after every epoch
from the run's whole history (which the checkpoint carries across resumes)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .files import atomic_write

COLUMNS = ("epoch", "steps", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "time_s", "img_per_s")


def write_metrics(path: Path, history: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def plot_curves(path: Path, history: list[dict]) -> str | None:
    """Loss and accuracy per epoch. Returns why it was skipped, or None."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.plot(epochs, [r["val_top1"] for r in history], "o-", label="val top-1")
    acc_ax.plot(epochs, [r["val_top5"] for r in history], "o-", label="val top-5")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy", ylim=(0, 100))
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return None
