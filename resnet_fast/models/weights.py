"""The `weights=` argument of the builders, and clear state_dict mismatch errors.

weights may be:
  - a torchvision weights enum member or its name (e.g. ResNet50_Weights.IMAGENET1K_V2, "DEFAULT"),
    loaded through torchvision (installed separately);
  - a path to a file holding a state_dict (or a resnet_fast checkpoint with a "model" entry),
    read with torch.load(weights_only=True);
  - a state_dict (a mapping of names to tensors).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def _from_torchvision_enum(arch: str, weights: Any, progress: bool, kwargs: dict) -> Mapping:
    try:
        from torchvision.models import get_model_weights
    except ImportError as exc:
        raise ImportError(f"loading torchvision weights {weights!r} needs torchvision: pip install torchvision") from exc
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"torchvision has no pretrained weights for {arch!r}; pass a state_dict or a file path") from exc
    try:
        weights = enum.verify(weights)
    except (KeyError, ValueError, TypeError) as exc:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise ValueError(f"unknown weights {weights!r} for {arch}; expected a {enum.__name__} member, one of "
                         f"{names}, a state_dict or a path to one") from exc
    n = len(weights.meta["categories"])
    if kwargs.setdefault("num_classes", n) != n:
        raise ValueError(f"The parameter 'num_classes' expected value {n} but got {kwargs['num_classes']} instead.")
    return weights.get_state_dict(progress=progress, check_hash=True)


def _from_file(path: os.PathLike | str) -> Mapping:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read a state_dict from {path}: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # a resnet_fast training checkpoint
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (found {type(obj).__name__})")
    return obj


def load_weights(arch: str, weights: Any, progress: bool, kwargs: dict) -> Mapping:
    """Resolve `weights` to a state_dict; may fix kwargs['num_classes'] like torchvision."""
    if isinstance(weights, Mapping):
        return weights
    if isinstance(weights, (str, os.PathLike)) and (os.sep in str(weights) or os.path.exists(weights)
                                                    or str(weights).endswith((".pt", ".pth", ".bin"))):
        return _from_file(weights)
    return _from_torchvision_enum(arch, weights, progress, kwargs)


def check_state_dict(model: nn.Module, state_dict: Mapping) -> None:
    """Raise one ValueError listing every missing, unexpected or wrongly shaped entry."""
    own = model.state_dict()
    # BatchNorm accepts old state_dicts without num_batches_tracked (it fills in 0).
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
              for k in own if k in state_dict and hasattr(state_dict[k], "shape")
              and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes ({len(shapes)}): {'; '.join(shapes)}")
    if problems:
        raise ValueError(f"state_dict does not match {type(model).__name__}:\n  " + "\n  ".join(problems))
