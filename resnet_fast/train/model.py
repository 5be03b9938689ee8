"""Which models `--arch` can name, and building one."""
from __future__ import annotations

from torch import nn

from ..models import ARCHS as RESNETS
from ..models.simple_cnn import simple_cnn
from .errors import ConfigError

# cnn / cnn_nobn: seed 004's plain CNN with and without BatchNorm (models/simple_cnn.py)
ARCHS = ("cnn", "cnn_nobn", *RESNETS)


def build(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    if arch in ("cnn", "cnn_nobn"):
        return simple_cnn(num_classes=num_classes, in_channels=in_channels, norm=arch == "cnn")
    if arch not in RESNETS:  # argparse checks typed names; this catches a checkpoint's
        raise ConfigError(f"arch {arch!r} is not a resnet_fast model (expected one of {', '.join(ARCHS)})")
    import resnet_fast
    return getattr(resnet_fast, arch)(num_classes=num_classes, in_channels=in_channels)
