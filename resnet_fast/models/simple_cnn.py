"""The plain 5-conv CNN baseline of the Imagenette tutorial (seed 004).

Five stride-2 3x3 convolutions (16, 32, 64, 128, 256 channels), each followed
by BatchNorm and ReLU, then global average pooling and one linear layer. The
tutorial's numbers for it (160px images center-cropped to 128, SGD 0.05 with
OneCycle, batch 128, 5 epochs): train loss 0.83, validation loss 0.98.

`norm=False` is the tutorial's first version, without BatchNorm, which it shows
stalling at loss 2.30. It has no batch-coupled layer, so a data-parallel run
computes exactly what one process with the same global batch does: that makes
it the reference model for the CPU DDP equivalence test, where SyncBatchNorm
is not available.
"""
from __future__ import annotations

from torch import nn

WIDTHS = (16, 32, 64, 128, 256)


def _conv(ni: int, nf: int, norm: bool) -> nn.Sequential:
    layers = [nn.Conv2d(ni, nf, kernel_size=3, stride=2, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(nf))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SimpleCNN(nn.Sequential):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: bool = True):
        chans = (in_channels, *WIDTHS)
        super().__init__(
            *[_conv(a, b, norm) for a, b in zip(chans, chans[1:])],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(WIDTHS[-1], num_classes),
        )


def simple_cnn(num_classes: int = 10, in_channels: int = 3, norm: bool = True) -> SimpleCNN:
    return SimpleCNN(num_classes=num_classes, in_channels=in_channels, norm=norm)
