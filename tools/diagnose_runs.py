#!/usr/bin/env python
"""Where each run's AP goes: finding objects or naming them (d2_focalstar/evaluation/
diagnostics.py). For every train_net.py output folder with saved detections: AP and AR@100 by
category and class-agnostic, the share of objects found by a box of any category at IoU 0.5, the
share whose highest-scoring such box names the right category, detections per image, and score
quantiles; with --name-parts, which part of a category's name the misnamed objects get wrong.
Writes <out>.md and <out>.csv.

    python tools/diagnose_runs.py docs/results/proxy80/*/ --name-parts colour fill shape \
        --out docs/results/proxy80_diagnostics
"""

import argparse
import os
import sys

from d2_focalstar.evaluation.bootstrap import BootstrapError, detections_file, load_detections
from d2_focalstar.evaluation.diagnostics import DIAGNOSTIC_COLUMNS, detection_diagnostics
from d2_focalstar.fileio import atomic_write
from d2_focalstar.run.errors import error_line
from d2_focalstar.run.results import RunDiverged, RunRecordError, load_run
from d2_focalstar.study.intervals import run_ground_truth
from d2_focalstar.study.tables import setting_names, to_csv, to_markdown


def diagnose(folders, name_parts=()):
    """(columns, rows): one row per run, in the order given."""
    records = []
    for folder in folders:
        try:
            records.append(load_run(folder))
        except RunDiverged as e:  # nothing to diagnose: no detections
            print(f"skipped {e}", file=sys.stderr)
    if not records:
        raise BootstrapError("none of the folders holds a finished run: nothing to diagnose")
    rows, truths = [], {}
    for record, name in zip(records, setting_names(records)):
        folder = record["folder"]
        path = detections_file(folder)
        if path is None:
            raise BootstrapError(f"{folder}: no saved detections (inference/coco_instances_*)")
        test = tuple((record.get("datasets") or {}).get("test") or ())
        if test not in truths:
            truths[test] = run_ground_truth(record)[1]
        detections = load_detections(path)
        if not detections:
            raise BootstrapError(f"{path}: no detections to diagnose")
        row = {"run": os.path.basename(os.path.normpath(folder)), "setting": name}
        try:
            row.update(detection_diagnostics(truths[test], detections, name_parts=name_parts))
        except ValueError as e:
            raise BootstrapError(f"--name-parts: {folder}: {e}") from None
        rows.append(row)
    return ["run", "setting", *DIAGNOSTIC_COLUMNS, *(f"wrong {p}" for p in name_parts)], rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+", help="train_net.py OUTPUT_DIRs with saved detections")
    p.add_argument(
        "--name-parts",
        nargs="+",
        default=(),
        help="labels of the words of every category name (the proxy80 data: colour fill shape)",
    )
    p.add_argument("--out", help="path prefix of the .md and .csv to write")
    args = p.parse_args(argv)
    try:
        columns, rows = diagnose(args.folders, args.name_parts)
    except (FileNotFoundError, RunRecordError, BootstrapError) as e:
        sys.exit(error_line("diagnose_runs.py", e))
    text = to_markdown(columns, rows)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        atomic_write(args.out + ".md", lambda f: f.write(text.encode()))
        atomic_write(args.out + ".csv", lambda f: f.write(to_csv(columns, rows).encode()))
    return rows


if __name__ == "__main__":
    main()
