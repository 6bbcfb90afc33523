#!/usr/bin/env python
"""The COCO-imbalance proxy's two set-up tables in docs/RESULTS.md, rebuilt from committed files:
the imbalance as the loss counts it (tools/anchor_stats.py's records) and the cost of a run under
each speed lever (tools/benchmark_proxy.py's JSON). Prints Markdown and writes it to --out.

    python tools/proxy80_tables.py --anchor-stats docs/results/anchor_stats/*.txt \\
        --cost docs/benchmarks/benchmark_proxy_cpu_2026-12-05.json \\
        --out docs/results/proxy80_setup.md
"""

import argparse
import json
import os
import sys

from d2_focalstar.fileio import atomic_write


def anchor_record(path):
    """The JSON record that tools/anchor_stats.py prints last."""
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError(f"{path}: no tools/anchor_stats.py record (a JSON line) in it")
    record = json.loads(lines[-1])
    if "binary_negatives_per_positive" not in record:
        raise ValueError(
            f"{path}: a record without binary_negatives_per_positive (made before issue 23): "
            "run tools/anchor_stats.py again"
        )
    return record


def imbalance_table(paths):
    rows = sorted(
        (anchor_record(p) for p in paths), key=lambda r: r["binary_negatives_per_positive"]
    )
    coco = [r for r in rows if r["source"].startswith("coco-like")]
    out = [
        "| data (config) | objects / image | anchors / image | foreground / image "
        "| background per foreground | classes K | binary negatives per positive "
        "| vs the COCO-like estimate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = (
            f"{r['binary_negatives_per_positive'] / coco[0]['binary_negatives_per_positive']:.2f}x"
            if coco
            else ""
        )
        out.append(
            f"| {r['source']} ({r['config']}) | {r['objects_per_image']:.2f} "
            f"| {r['anchors_per_image']:,.0f} | {r['foreground_per_image']:.1f} "
            f"| {r['background_per_foreground']:.0f} | {r['num_classes']} "
            f"| {r['binary_negatives_per_positive']:,.0f} | {ratio} |"
        )
    return "\n".join(out)


def cost_table(path):
    with open(path) as f:
        report = json.load(f)
    meta = report["meta"]
    out = [
        f"| lever | threads | s / iteration (batch {meta['ims_per_batch']}) | speed-up "
        f"| throughput speed-up (2 cores) | minutes per run ({meta['max_iter']} it) "
        "| hours for one setting x 5 seeds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        out.append(
            f"| {r['lever']} | {r['threads']} | {r['seconds_per_iter']:.2f} "
            f"| {r['speedup']:.2f}x | {r['throughput_speedup']:.2f}x "
            f"| {r['minutes_per_run']:.0f} | {r['hours_for_5_seeds']:.1f} |"
        )
    out.append(
        f"\n({meta['date']}, {meta['cpus']} CPUs, torch {meta['torch']}, "
        f"median of {meta.get('rounds', 1)} rounds of {meta['iters']} iterations per lever)"
    )
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--anchor-stats", nargs="+", required=True, help="tools/anchor_stats.py outputs")
    p.add_argument("--cost", required=True, help="tools/benchmark_proxy.py JSON")
    p.add_argument("--out", required=True, help="the Markdown file to write")
    args = p.parse_args(argv)
    try:
        text = (
            "### The imbalance as the loss counts it\n\n"
            + imbalance_table(args.anchor_stats)
            + "\n\n### The cost of a run, lever by lever\n\n"
            + cost_table(args.cost)
            + "\n"
        )
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"proxy80_tables.py: error: {e}")
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
