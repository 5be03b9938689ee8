"""Plot `resnet-fast bench --json` results: img/s per implementation and batch size.

One panel per (device, arch, mode, dtype, image size, layout); in each, a group of bars per batch
size, one bar per implementation (median img/s, p20-p80 whiskers). When the same configuration
was measured more than once, the newest record wins. A ceilings JSON (benchmarks/ceilings.py) for
the same device adds the bf16 img/s ceiling to the panel title. Other JSON files are skipped.

    python benchmarks/plot_results.py                          # benchmarks/results/*.json
    python benchmarks/plot_results.py out/ a.json --out bench.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMPL_ORDER = ("resnet_fast", "resnet_fast_torch_backend", "torch_compile", "torchvision_channels_last",
              "torchvision_eager", "torchscript_frozen")
BENCH_FIELDS = {"arch", "mode", "dtype", "batch_size", "img_size", "device", "impl", "img_per_s"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, default=[RESULTS],
                   help="JSON files or directories of them (default benchmarks/results)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench.png", help="PNG to write")
    return p.parse_args(argv)


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(bench records, ceilings records) from every JSON file under paths."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.exists():
            files.append(path)
        else:
            raise SystemExit(f"plot_results: {path} does not exist")
    bench, ceilings = [], []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            print(f"skipping {f}: not readable JSON ({exc})", file=sys.stderr)
            continue
        if isinstance(data, dict) and data.get("kind") == "ceilings":
            ceilings.append(data)
        elif isinstance(data, list) and data and all(isinstance(r, dict) and BENCH_FIELDS <= r.keys()
                                                     for r in data):
            bench += data
        else:
            print(f"skipping {f}: not a resnet-fast bench or ceilings result", file=sys.stderr)
    return bench, ceilings


def label(r: dict) -> str:
    backend = r.get("backend", "auto")
    return f"{r['impl']} ({backend})" if r["impl"] == "resnet_fast" and backend != "auto" else r["impl"]


def panels(records: list[dict]) -> dict[tuple, dict[tuple[str, int], dict]]:
    """{panel key: {(label, batch): newest record}}; failed runs (no img/s) are reported and left out."""
    out: dict[tuple, dict] = defaultdict(dict)
    for r in sorted(records, key=lambda r: r.get("timestamp") or ""):
        if r.get("img_per_s") is None:
            print(f"left out (failed): {r['arch']} {r['mode']} {r['dtype']} batch {r['batch_size']} "
                  f"{r['impl']}: {r.get('error')}", file=sys.stderr)
            continue
        key = (r["device"], r["arch"], r["mode"], r["dtype"], r["img_size"], bool(r.get("channels_last")))
        out[key][(label(r), r["batch_size"])] = r  # sorted by time: the newest wins
    return dict(sorted(out.items()))


def ceiling_text(key: tuple, ceilings: list[dict]) -> str:
    device, arch, mode, dtype, size, _ = key
    for c in sorted(ceilings, key=lambda c: c.get("timestamp") or "", reverse=True):
        a = c.get("archs", {}).get(arch)
        if c.get("device") != device or a is None or dtype != c.get("dtype") or size != c.get("img_size"):
            continue
        f = a["floors_img_per_s"]
        bound = min(f["infer_compute"], f["infer_memory"]) if mode == "infer" else f["train_compute"]
        return f"\nceiling {bound:,.0f} img/s (ceilings.py)"
    return ""


def _order(labels) -> list[str]:
    def rank(name):
        base = name.split(" (")[0]
        return (IMPL_ORDER.index(base) if base in IMPL_ORDER else len(IMPL_ORDER), name)
    return sorted(labels, key=rank)


def plot(groups: dict, ceilings: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_labels = _order({lab for g in groups.values() for lab, _ in g})
    color = {lab: colors[i % len(colors)] for i, lab in enumerate(all_labels)}
    for ax, (key, cells) in zip(axes.flat, groups.items()):
        device, arch, mode, dtype, size, cl = key
        batches = sorted({b for _, b in cells})
        labels = _order({lab for lab, _ in cells})
        width = 0.8 / len(labels)
        values = []
        for i, lab in enumerate(labels):
            xs, ys, lo, hi = [], [], [], []
            for j, b in enumerate(batches):
                r = cells.get((lab, b))
                if r is None:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(r["img_per_s"])
                lo.append(r["img_per_s"] - (r.get("p20") or r["img_per_s"]))
                hi.append((r.get("p80") or r["img_per_s"]) - r["img_per_s"])
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=lab, color=color[lab])
            ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, rotation=90, padding=2)
            values += ys
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        if values and max(values) / max(min(values), 1e-9) > 30:
            ax.set_yscale("log")
        ax.margins(y=0.25)
        ax.set_ylabel("img/s (median, p20-p80)")
        layout = "channels_last" if cl else "NCHW"
        ax.set_title(f"{arch} {mode} {dtype} {size}x{size} {layout}\n{device}{ceiling_text(key, ceilings)}",
                     fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    commits = sorted({r.get("commit", "?")[:10] for cells in groups.values() for r in cells.values()})
    fig.suptitle(f"resnet-fast bench (commit {', '.join(commits)})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    records, ceilings = load(args.paths)
    groups = panels(records)
    if not groups:
        print("plot_results: no successful bench records found", file=sys.stderr)
        return 1
    try:
        plot(groups, ceilings, args.out)
    except ImportError as exc:
        print(f"plot_results: {exc}; pip install matplotlib to plot", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(groups)} panels from {len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
