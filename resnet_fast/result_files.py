"""Result files of the command-line tools (`resnet-fast bench`, `resnet-fast tune`): checked before the work
starts, never clobbered unless asked."""
from __future__ import annotations

import json
import os
from typing import Optional


def check_writable(path: Optional[str], overwrite: bool) -> None:
    """Fail before any benchmarking or tuning if the result could not be written."""
    if path is None:
        return
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")


def open_result(path: str, overwrite: bool):
    # "x" refuses to clobber a file that appeared while the work ran.
    return open(path, "w" if overwrite else "x", encoding="utf-8", newline="")


def write_json(path: str, records: list[dict], overwrite: bool) -> None:
    with open_result(path, overwrite) as f:
        json.dump(records, f, indent=2)
        f.write("\n")
