#!/usr/bin/env python
"""Table 2 and Fig. 6 from any set of train_net.py output folders.

    python tools/compare.py output/sweep/*  --out output/compare

prints the table (AP, AP50, AP75, APs, APm, APl and the safety metrics per run, then per setting
the mean ± sd over seeds and the difference to FL at the same learning rate and other settings,
none where there is no such FL) and writes <out>.md, <out>.csv and <out>_curves.png (loss_cls,
loss_box_reg, total_loss and AP vs iteration; none for runs of --eval-only, which have no curves).

Where the runs saved their detections (detectron2's inference/coco_instances_results.json, or
.json.gz), each setting's difference to FL (or to --versus SETTING) in AP, AP50, APs and LAMR
gets a 95% interval from a paired bootstrap over the test images (--resamples, 0 for none):
<out>_intervals.md and .csv. Runs without saved detections are named and left out of them.

    python tools/compare.py output/table1/* --versus "CE alpha=0.75" --out output/table1_compare
"""

import argparse
import os
import shutil
import sys
import tempfile

from d2_focalstar.evaluation.bootstrap import MAX_RESAMPLES, BootstrapError
from d2_focalstar.fileio import atomic_write
from d2_focalstar.run.errors import error_line, warnings_on_stderr
from d2_focalstar.run.results import load_runs_counting_divergences, recipes, starting_points
from d2_focalstar.study.curves import plot_training_curves
from d2_focalstar.study.intervals import interval_rows, intervals_to_markdown
from d2_focalstar.study.tables import comparison_rows, setting_names, to_csv, to_markdown


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("folders", nargs="+", help="train_net.py OUTPUT_DIRs")
    parser.add_argument("--out", default="output/compare", help="path prefix of the .md/.csv/.png")
    parser.add_argument(
        "--versus",
        metavar="SETTING",
        help="the setting every other is compared with in the intervals, as the table "
        "names it (default: each setting's FL at the same knobs)",
    )
    parser.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples (0: no intervals)"
    )
    parser.add_argument(
        "--many-resamples",
        action="store_true",
        help=f"allow more than {MAX_RESAMPLES:,} resamples (hours to days)",
    )
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.basename(args.out) or os.path.isdir(args.out):  # "", "out/", ".": no file name
        parser.error(
            f"--out {args.out!r} is not a path prefix: give the files' name too, e.g. "
            "--out output/compare (writes output/compare.md, .csv and _curves.png)"
        )
    if args.resamples < 0:
        parser.error(f"--resamples {args.resamples}: must be 0 (no intervals) or more")
    if args.resamples > MAX_RESAMPLES and not args.many_resamples:
        parser.error(
            f"--resamples {args.resamples:,}: more than {MAX_RESAMPLES:,} would run for days; "
            "add --many-resamples to allow it"
        )
    try:  # a folder the outputs can be written to, checked before hours of resampling
        staging = tempfile.mkdtemp(
            prefix=".compare-", dir=_made_folder(os.path.dirname(args.out) or ".")
        )
    except OSError as e:
        sys.exit(
            error_line("compare.py", f"--out {args.out}: cannot write there ({e.strerror or e})")
        )
    try:
        with warnings_on_stderr():
            written = compare(args, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {', '.join(written)}")


def _made_folder(folder):
    os.makedirs(folder, exist_ok=True)
    return folder


def compare(args, staging):
    """Everything computed first, the files written last: a comparison that fails leaves the
    previous outputs as they were, one that succeeds leaves none of them behind (an
    _intervals.md of earlier runs beside the new table would not belong to it)."""
    # unfinished, cut short or not a run: named on stderr and left out; a diverged run is a
    # result with no metrics: named on stderr and in the table's file
    loaded = load_runs_counting_divergences(args.folders, lambda line: print(line, file=sys.stderr))
    diverged = [r for r in loaded if "diverged" in r]
    records = [r for r in loaded if "diverged" not in r]
    if not records:
        sys.exit(error_line("compare.py", "none of the folders holds a finished run"))

    columns, rows = comparison_rows(records)
    markdown = to_markdown(columns, rows)
    if diverged:  # a seed that diverged is a result: the table says which, not only stderr
        named = "; ".join(
            f"{os.path.basename(os.path.normpath(r['folder']))} (seed {r.get('seed')}, "
            f"iteration {r.get('iteration')})"
            for r in diverged
        )
        markdown += (
            f"\nDiverged (recorded, never retried; not in the rows, means or intervals): {named}.\n"
        )
    points = starting_points(loaded)
    if len(points) > 1:  # two trunks: the table compares proxies as well as losses
        markdown += f"\nStarted from {len(points)} different weights: {'; '.join(points)}.\n"
    kinds = recipes(loaded)
    if len(kinds) > 1:  # two warm-ups or clipping on and off: the recipe differs as well
        markdown += f"\nTrained with {len(kinds)} different recipes: {'; '.join(kinds)}.\n"
    print(markdown)
    outputs = {".md": markdown.encode(), ".csv": to_csv(columns, rows).encode()}
    intervals = []
    if args.resamples:
        try:
            intervals = interval_rows(
                records,
                args.versus,
                args.resamples,
                args.bootstrap_seed,
                warn=lambda line: print(f"intervals: {line}", file=sys.stderr),
            )
        except BootstrapError as e:
            sys.exit(error_line("compare.py", e))
    if intervals:
        text = intervals_to_markdown(intervals)
        print(text)
        outputs["_intervals.md"] = text.encode()
        outputs["_intervals.csv"] = to_csv(list(intervals[0]), intervals).encode()
    curves = plot_training_curves(
        [r["folder"] for r in records],
        os.path.join(staging, "curves.png"),
        groups=setting_names(records),
    )
    if curves is None:
        print("no training curves (no run has a metrics.json: --eval-only runs)", file=sys.stderr)
    written = [*outputs] + (["_curves.png"] if curves is not None else [])
    try:
        for suffix, data in outputs.items():
            atomic_write(args.out + suffix, lambda f, d=data: f.write(d))
        if curves is not None:
            os.replace(curves, args.out + "_curves.png")
        for suffix in ("_intervals.md", "_intervals.csv", "_curves.png"):  # stale ones
            if suffix not in written and os.path.isfile(args.out + suffix):
                os.remove(args.out + suffix)
    except OSError as e:
        sys.exit(
            error_line(
                "compare.py", f"--out {args.out}: {e.strerror or e} writing {e.filename or 'it'}"
            )
        )
    return [args.out + suffix for suffix in written]


if __name__ == "__main__":
    main()
