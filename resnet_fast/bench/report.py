"""Output of `resnet-fast bench`: the stdout table, --json and --csv files."""
from __future__ import annotations

import csv
import shlex
from typing import Iterable

from ..result_files import open_result
from . import first_call
from .contenders import COMPILE, EAGER, EAGER_CL, PT2E_INT8, RESNET_FAST, RF_TORCH, TORCHSCRIPT, TORCHVISION_INT8

# Required record fields first, in this order, in the CSV too.
FIELDS = ("arch", "mode", "dtype", "batch_size", "img_size", "device", "impl", "img_per_s", "p20", "p80",
          "max_abs_err", "max_rel_err", "speedup_vs", "warmup_s", "commit", "torch", "triton", "cuda",
          "command", "timestamp")
_SHORT = {RESNET_FAST: "resnet_fast", EAGER: "eager", EAGER_CL: "eager_cl", COMPILE: "compile",
          TORCHSCRIPT: "jit_frozen", RF_TORCH: "rf_torch", TORCHVISION_INT8: "tv_int8", PT2E_INT8: "pt2e_int8"}


def _flat(record: dict) -> dict:
    row = {k: v for k, v in record.items() if k != "speedup_vs"}
    for impl, x in (record.get("speedup_vs") or {}).items():
        row[f"speedup_vs_{impl}"] = x
    row["command"] = shlex.join(record["command"])
    return row


def write_csv(path: str, records: list[dict], overwrite: bool) -> None:
    rows = [_flat(r) for r in records]
    columns = [f for f in FIELDS if f != "speedup_vs"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open_result(path, overwrite) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _speedup(record: dict, other: str) -> str:
    if other == record["impl"]:
        return "1.00x"
    x = record["speedup_vs"].get(other)  # absent when the other contender failed
    return "-" if x is None else f"{x:.2f}x"


def table(records: list[dict]) -> str:
    """One block per configuration: a row per contender, a speedup column per other contender."""
    blocks = []
    for group in _groups(records):
        r0 = group[0]
        title = (f"{r0['arch']}  {r0['mode']}  {r0['dtype']}  batch {r0['batch_size']}  "
                 f"{r0['img_size']}x{r0['img_size']}  on {r0['device']}  {max(r['iters'] for r in group)} rounds  "
                 f"(resnet_fast backend {r0['backend']}; error: {r0['error_metric']})")
        others = [r["impl"] for r in group if r["impl"] != RESNET_FAST]
        train = r0["mode"] == "train"
        int8 = r0["dtype"] == "int8"  # int8 rows add the top-1 agreement with the reference
        header = ["impl", "layout", "img/s", "p20-p80", *(f"vs {_SHORT.get(o, o)}" for o in others),
                  "setup s", "warm-up s", "max abs err", "max rel err", *(["step1 err", "step2 err"] if train else []),
                  *(["top1 agree"] if int8 else [])]
        rows = [header]
        for r in group:
            if r.get("error"):
                rows.append([r["impl"], "-", "FAILED", r["error"].splitlines()[0]])
                continue
            speedups = [_speedup(r, o) for o in others]
            rows.append([r["impl"], r["memory_format"], f"{r['img_per_s']:.1f}", f"{r['p20']:.1f}-{r['p80']:.1f}",
                         *speedups, f"{r['setup_s']:.1f}", f"{r['warmup_s']:.1f}",
                         f"{r['max_abs_err']:.2e}", f"{r['max_rel_err']:.2e}",
                         *([f"{r['step1_loss_err']:.2e}", f"{r['step2_loss_err']:.2e}"] if train else []),
                         *([f"{r['top1_agree']:.3f}"] if int8 else [])])
        first = "".join(first_call.line(r) for r in group if r["impl"] == RESNET_FAST)
        blocks.append(title + "\n" + _align(rows) + (f"\n{first}" if first else ""))
    return "\n\n".join(blocks)


def _groups(records: list[dict]) -> Iterable[list[dict]]:
    keys: dict[tuple, list[dict]] = {}
    for r in records:
        keys.setdefault((r["arch"], r["mode"], r["dtype"], r["batch_size"], r["img_size"]), []).append(r)
    return keys.values()


def _align(rows: list[list[str]]) -> str:
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        if len(r) != len(widths):  # a failed contender: name, layout, then the message
            lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), *r[2:]]))
            continue
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
