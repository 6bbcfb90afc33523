#!/usr/bin/env python
"""RetinaNet's Table 1 (Lin et al. 2017) beside a proxy study's runs, and whether the proxy counts
as calibrated: CE at alpha 0.75 above CE at 0.25, FL's gamma profile peaking at 1-2, and FL g=2
above the best CE with a 95% paired-bootstrap interval over the test images that excludes 0.

    python tools/table1.py docs/results/proxy_shapes/*/ --out docs/results/proxy_shapes_table1

prints the table and the three checks and writes <out>.md. Runs other than CE and FL (FL*, ...)
are ignored; runs without saved detections get no interval (named on stderr). Runs of one row at
several learning rates (tools/sweep.py --base-lrs): the row takes its best rate. Runs that
diverged count in their row ('+ k diverged'). After a rate grid on one seed, --sweep-args prints
the sweep.py arguments of each row at its rate (tools/gpu_checks.sh proxy80-table1 runs seeds 1-4
with them).
"""

import argparse
import os
import sys

from d2_focalstar.evaluation.bootstrap import MAX_RESAMPLES, BootstrapError
from d2_focalstar.fileio import atomic_write
from d2_focalstar.run.errors import error_line
from d2_focalstar.run.results import load_runs_counting_divergences
from d2_focalstar.study.table1 import sweep_args, table1, table1_rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("folders", nargs="+", help="train_net.py OUTPUT_DIRs of one study")
    parser.add_argument("--out", default="output/table1", help="path prefix of the .md")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument(
        "--many-resamples",
        action="store_true",
        help=f"allow more than {MAX_RESAMPLES:,} resamples (hours to days)",
    )
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument(
        "--sweep-args",
        action="store_true",
        help="print, one line per row that was run, the tools/sweep.py arguments that run it at "
        "its rate (add --seeds), and stop: seeds 1-4 at each row's rate after a rate grid",
    )
    args = parser.parse_args(argv)
    if not os.path.basename(args.out) or os.path.isdir(args.out):
        parser.error(
            f"--out {args.out!r} is not a path prefix: give the file's name too, "
            "e.g. --out output/table1"
        )
    if args.resamples < 1:
        parser.error(f"--resamples {args.resamples}: must be 1 or more")
    if args.resamples > MAX_RESAMPLES and not args.many_resamples:
        parser.error(
            f"--resamples {args.resamples:,}: more than {MAX_RESAMPLES:,} would run for days; "
            "add --many-resamples to allow it"
        )
    # a diverged seed is counted in its row
    records = load_runs_counting_divergences(
        args.folders, lambda line: print(line, file=sys.stderr)
    )
    if args.sweep_args:
        try:
            rows, _ = table1_rows(records)
        except ValueError as e:
            sys.exit(error_line("table1.py", e))
        for line in sweep_args(rows):
            print(" ".join(line))
        return
    try:
        table, checks = table1(
            records,
            args.resamples,
            args.bootstrap_seed,
            warn=lambda line: print(f"intervals: {line}", file=sys.stderr),
        )
    except (ValueError, BootstrapError) as e:
        sys.exit(error_line("table1.py", e))
    text = (
        table
        + "\n"
        + "\n".join(
            f"- {name}: **{verdict}**" + (f" ({detail})" if detail else "")
            for name, verdict, detail in checks
        )
    )
    calibrated = all(v == "met" for _, v, _ in checks)
    text += (
        f"\n\nCalibrated: **{'yes' if calibrated else 'no'}** "
        "(paired bootstrap over the test images, "
        f"{args.resamples} resamples, seed {args.bootstrap_seed}; seed-to-seed spread: the ± sd).\n"
    )
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out + ".md", lambda f: f.write(text.encode()))
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
