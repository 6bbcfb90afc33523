#!/usr/bin/env python
"""Table 2 and Fig. 6 from any set of train_net.py output folders.

    python tools/compare.py output/sweep/*  --out output/compare

prints the table (AP, AP50, AP75, APs, APm, APl and the safety metrics per run, then per setting
the mean ± sd over seeds and the difference to FL at the same learning rate and other settings,
none where there is no such FL) and writes <out>.md, <out>.csv and <out>_curves.png (loss_cls,
loss_box_reg, total_loss and AP vs iteration).

Where the runs saved their detections (detectron2's inference/coco_instances_results.json, or
.json.gz), each setting's difference to FL (or to --versus SETTING) in AP, AP50, APs and LAMR
gets a 95% interval from a paired bootstrap over the test images (--resamples, 0 for none):
<out>_intervals.md and .csv. Runs without saved detections are named and left out of them.

    python tools/compare.py output/table1/* --versus "CE alpha=0.75" --out output/table1_compare
"""
import argparse
import os
import sys

from d2_focalstar.fileio import atomic_write
from d2_focalstar.evaluation.bootstrap import BootstrapError
from d2_focalstar.run.results import RunRecordError
from d2_focalstar.study.tables import comparison_rows, setting_names, to_csv, to_markdown
from d2_focalstar.study.intervals import interval_rows, intervals_to_markdown
from d2_focalstar.run.results import load_run
from d2_focalstar.study.curves import plot_training_curves
from d2_focalstar.run.errors import error_line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folders", nargs="+", help="train_net.py OUTPUT_DIRs")
    parser.add_argument("--out", default="output/compare", help="path prefix of the .md/.csv/.png")
    parser.add_argument("--versus", metavar="SETTING",
                        help="the setting every other is compared with in the intervals, as the table "
                             "names it (default: each setting's FL at the same knobs)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.basename(args.out) or os.path.isdir(args.out):  # "", "out/", ".": no file name
        parser.error(f"--out {args.out!r} is not a path prefix: give the files' name too, e.g. "
                     "--out output/compare (writes output/compare.md, .csv and _curves.png)")
    if args.resamples < 0:
        parser.error(f"--resamples {args.resamples}: must be 0 (no intervals) or more")

    records, skipped = [], []
    for folder in args.folders:
        try:
            records.append(load_run(folder))
        except (FileNotFoundError, RunRecordError) as e:  # unfinished, cut short or not a run
            skipped.append(str(e))
    for msg in skipped:
        print(f"skipped {msg}", file=sys.stderr)
    if not records:
        sys.exit(error_line("compare.py", "none of the folders holds a finished run"))

    columns, rows = comparison_rows(records)
    markdown = to_markdown(columns, rows)
    print(markdown)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out + ".md", lambda f: f.write(markdown.encode()))
    atomic_write(args.out + ".csv", lambda f: f.write(to_csv(columns, rows).encode()))
    intervals = []
    if args.resamples:
        try:
            intervals = interval_rows(records, args.versus, args.resamples, args.bootstrap_seed,
                                      warn=lambda line: print(f"intervals: {line}", file=sys.stderr))
        except BootstrapError as e:
            sys.exit(error_line("compare.py", e))
    if intervals:
        text = intervals_to_markdown(intervals)
        print(text)
        atomic_write(args.out + "_intervals.md", lambda f: f.write(text.encode()))
        atomic_write(args.out + "_intervals.csv", lambda f: f.write(to_csv(list(intervals[0]), intervals).encode()))
    curves = plot_training_curves([r["folder"] for r in records], args.out + "_curves.png",
                                  groups=setting_names(records))
    print(f"wrote {args.out}.md, {args.out}.csv, {curves}"
          + (f", {args.out}_intervals.md, {args.out}_intervals.csv" if intervals else ""))


if __name__ == "__main__":
    main()
