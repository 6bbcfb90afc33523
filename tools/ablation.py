#!/usr/bin/env python
"""Which lever moves the FL-vs-CE gap: a chain of steps from one proxy to another, each changing
one thing, with FL g=2's AP difference from the best CE and its 95% paired-bootstrap interval at
every step (each loss at its best rate among the step's runs, as tools/table1.py picks it).

    python tools/ablation.py \\
      --step "round-2 proxy" docs/results/proxy_shapes/{ce_a0.75,fl_g2}_s*/ \\
      --step "+ 80 classes" \\
      --step "round-3 proxy" docs/results/proxy80/*/ --out docs/results/proxy80_ablation

A --step with a label only was not run: its row says so. Give each step the CE and FL runs of one
setting (runs of other losses are ignored; CE at several alphas: the best is the comparison's).
Diverged runs count in their row.
"""

import argparse
import os
import sys

from d2_focalstar.evaluation.bootstrap import MAX_RESAMPLES, BootstrapError
from d2_focalstar.fileio import atomic_write
from d2_focalstar.run.errors import error_line
from d2_focalstar.run.results import load_runs_counting_divergences
from d2_focalstar.study.ablation import ablation


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--step",
        nargs="+",
        action="append",
        required=True,
        metavar=("LABEL", "FOLDER"),
        help="a step's label, then its runs' train_net.py OUTPUT_DIRs (none: not run)",
    )
    parser.add_argument("--out", default="output/ablation", help="path prefix of the .md")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.basename(args.out) or os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is not a path prefix: give the file's name too")
    if not 1 <= args.resamples <= MAX_RESAMPLES:
        parser.error(f"--resamples {args.resamples}: allowed 1 to {MAX_RESAMPLES:,}")
    labels = [label for label, *_ in args.step]
    if len(set(labels)) != len(labels):
        parser.error(f"--step labels repeat: {labels}; give each step its own")
    steps = []
    for label, *folders in args.step:
        # a diverged seed is counted in its row
        records = load_runs_counting_divergences(folders, lambda line: print(line, file=sys.stderr))
        if folders and not records:
            sys.exit(error_line("ablation.py", f"step {label!r}: none of its folders is a run"))
        steps.append((label, records))
    try:
        text, _ = ablation(
            steps,
            args.resamples,
            args.bootstrap_seed,
            warn=lambda line: print(f"intervals: {line}", file=sys.stderr),
        )
    except (ValueError, BootstrapError) as e:
        sys.exit(error_line("ablation.py", e))
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out + ".md", lambda f: f.write(text.encode()))
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
