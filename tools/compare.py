#!/usr/bin/env python
"""Table 2 and Fig. 6 from any set of train_net.py output folders.

    python tools/compare.py output/sweep/*  --out output/compare

prints the table (AP, AP50, AP75, APs, APm, APl and the safety metrics per run, then per setting
the mean ± sd over seeds and the difference to FL at the same learning rate and other settings,
none where there is no such FL) and writes <out>.md, <out>.csv and <out>_curves.png (loss_cls,
loss_box_reg, total_loss and AP vs iteration).
"""
import argparse
import os
import sys

from d2_focalstar.fileio import atomic_write
from d2_focalstar.study import (comparison_rows, load_run, plot_training_curves, setting_names, to_csv,
                                to_markdown)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folders", nargs="+", help="train_net.py OUTPUT_DIRs")
    parser.add_argument("--out", default="output/compare", help="path prefix of the .md/.csv/.png")
    args = parser.parse_args()

    records, skipped = [], []
    for folder in args.folders:
        try:
            records.append(load_run(folder))
        except FileNotFoundError as e:
            skipped.append(str(e))
    for msg in skipped:
        print(f"skipped {msg}", file=sys.stderr)
    if not records:
        sys.exit("compare.py: error: none of the folders holds a finished run")

    columns, rows = comparison_rows(records)
    markdown = to_markdown(columns, rows)
    print(markdown)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out + ".md", lambda f: f.write(markdown.encode()))
    atomic_write(args.out + ".csv", lambda f: f.write(to_csv(columns, rows).encode()))
    curves = plot_training_curves([r["folder"] for r in records], args.out + "_curves.png",
                                  groups=setting_names(records))
    print(f"wrote {args.out}.md, {args.out}.csv, {curves}")
