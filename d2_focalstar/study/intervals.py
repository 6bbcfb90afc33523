"""
Intervals for the difference between settings: a paired bootstrap over the test images
(d2_focalstar/evaluation/bootstrap.py) from each run's saved detections, in AP, AP50, APs and LAMR.
"""

import json
import math
import os
import sys
import time
from collections import OrderedDict

from ..data import EMBEDDED_DATASETS, ensure_shapes_dataset
from ..evaluation.bootstrap import (
    BOOTSTRAP_METRICS,
    BootstrapError,
    RunEvaluation,
    detections_file,
    load_detections,
    paired_bootstrap,
)
from ..run.results import read_run_config
from .tables import fl_baselines, group_by_setting

__all__ = ["interval_rows", "intervals_to_markdown", "resampling_progress", "run_ground_truth"]


def resampling_progress(label, stream=None, every_s=10.0):
    """A ``progress(done, total)`` for :func:`paired_bootstrap` that writes, at most every
    ``every_s`` seconds, how many resamples are done, the time so far and the ETA."""
    start = time.monotonic()
    last = [start]

    def report(done, total):
        now = time.monotonic()
        if now - last[0] < every_s and done < total:
            return
        last[0] = now
        eta = (now - start) / done * (total - done)
        print(
            f"{label}: {done:,}/{total:,} resamples, {now - start:.0f} s, ETA {eta:.0f} s",
            file=stream or sys.stderr,
            flush=True,
        )

    return report


def run_ground_truth(record):
    """The COCO ground-truth dict of a run's (first) test dataset: an embedded dataset (made
    again from its seed if absent), a detectron2 builtin, or one of the run's DATASETS.COCO_JSON
    (its config.yaml). BootstrapError naming the run if none can be found."""
    from detectron2.data import MetadataCatalog

    name = ((record.get("datasets") or {}).get("test") or [None])[0]
    if name is None:
        raise BootstrapError(f"{record['folder']}: results.json does not name its test dataset")
    base = name.rsplit("_", 1)[0]
    if base in EMBEDDED_DATASETS:
        ensure_shapes_dataset(base)
    json_file = (
        MetadataCatalog.get(name).get("json_file") if name in MetadataCatalog.list() else None
    )
    if json_file is None:
        entries = (read_run_config(record["folder"]).get("DATASETS") or {}).get("COCO_JSON") or []
        json_file = next(
            (e[1] for e in entries if isinstance(e, list) and e and e[0] == name), None
        )
    if not json_file or not os.path.isfile(json_file):
        raise BootstrapError(
            f"{record['folder']}: the ground truth of its test dataset {name!r} is "
            f"not here ({json_file or 'not registered'}): put the dataset where it "
            "was (DETECTRON2_DATASETS) to compute intervals"
        )
    with open(json_file) as f:
        return name, json.load(f)


def interval_rows(records, versus=None, num_resamples=1000, seed=0, warn=None):
    """
    The difference of each setting to a reference setting in AP, AP50, APs and LAMR, with a 95%
    interval from a paired bootstrap over the test images (d2_focalstar/evaluation/bootstrap.py),
    computed from each run's saved detections
    (OUTPUT_DIR/inference/coco_instances_results.json[.gz]).

    Args:
        records: load_run() records.
        versus: the reference setting's name (as in the table, e.g. 'CE alpha=0.75'); None: each
            setting's FL baseline, as the table's "vs FL".
        warn: called with a line for each run left out (no saved detections).
    Returns:
        rows (dicts: setting, versus, runs, images, resamples and per metric its diff, low, high),
        in the table's setting order. BootstrapError (one line) for runs of other datasets or
        image sets, and for an unknown ``versus``.
    """
    warn = warn or (lambda line: None)
    groups, suffix_of = group_by_setting(records)
    if versus is not None and versus not in groups:
        raise BootstrapError(f"--versus {versus!r} is not one of the settings: {', '.join(groups)}")
    baselines = fl_baselines(groups, suffix_of)
    gts, evaluations = {}, {}

    def evaluation(record):
        folder = record["folder"]
        if folder not in evaluations:
            test = list((record.get("datasets") or {}).get("test") or [])
            path = detections_file(folder, test[0] if len(test) > 1 else None)
            if path is None:
                warn(
                    f"{folder}: no saved detections (inference/coco_instances_results.json): left "
                    "out of the intervals"
                )
                evaluations[folder] = None
                return None
            if tuple(test) not in gts:
                try:
                    gts[tuple(test)] = run_ground_truth(record)
                except BootstrapError as e:
                    gts[tuple(test)] = e
            if isinstance(gts[tuple(test)], BootstrapError):
                warn(f"{gts[tuple(test)]}: left out of the intervals")
                evaluations[folder] = None
            else:
                dataset, gt = gts[tuple(test)]
                config = read_run_config(folder)
                safety = config.get("TEST", {}).get("SAFETY", {})
                classes = safety.get("CLASSES", []) if safety.get("ENABLED", True) else []
                evaluations[folder] = (
                    dataset,
                    RunEvaluation(
                        gt,
                        load_detections(path),
                        classes,
                        safety.get("IOU_THRESHOLD", 0.5),
                        name=folder,
                    ),
                )
        return evaluations[folder]

    rows = []
    for name, rs in groups.items():
        reference = versus or baselines.get(suffix_of[name])
        if reference is None or reference == name:
            continue
        a = [e for e in map(evaluation, rs) if e is not None]
        b = [e for e in map(evaluation, groups[reference]) if e is not None]
        if not a or not b:
            continue
        datasets = {d for d, _ in a + b}
        if len(datasets) > 1:
            raise BootstrapError(
                f"{name} and {reference} were evaluated on different datasets "
                f"({', '.join(sorted(datasets))}): their difference has no interval"
            )
        res = paired_bootstrap(
            [e for _, e in a],
            [e for _, e in b],
            num_resamples=num_resamples,
            seed=seed,
            metrics=BOOTSTRAP_METRICS,
            progress=resampling_progress(f"{name} vs {reference}"),
        )
        row = OrderedDict(
            setting=name,
            versus=reference,
            runs=f"{len(a)} vs {len(b)}",
            images=len(a[0][1].image_ids),
            resamples=num_resamples,
        )
        for m, v in res.items():
            row.update({f"{m} diff": v["diff"], f"{m} low": v["low"], f"{m} high": v["high"]})
        rows.append(row)
    return rows


def intervals_to_markdown(rows):
    """'| setting | vs | runs | ΔAP [95% interval] | ... |', differences signed, lower LAMR
    better."""
    head = (
        "| setting | vs | runs | "
        + " | ".join(f"Δ{m} [95% interval]" for m in BOOTSTRAP_METRICS)
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + len(BOOTSTRAP_METRICS))]
    for r in rows:
        cells = [r["setting"], r["versus"], r["runs"]]
        for m in BOOTSTRAP_METRICS:
            d, lo, hi = r[f"{m} diff"], r[f"{m} low"], r[f"{m} high"]
            cells.append("" if math.isnan(d) else f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    images = {r["images"] for r in rows}
    note = (
        (
            f"\nPaired bootstrap over the {', '.join(map(str, sorted(images)))} test images, "
            f"{rows[0]['resamples']} resamples; an interval that excludes 0 is a difference the "
            "test images support (seed-to-seed spread: the table's ± sd).\n"
        )
        if rows
        else ""
    )
    return "\n".join(lines) + "\n" + note
