#!/usr/bin/env python
"""Evaluation-side benchmark on a synthetic COCO-val-sized set (5,000 images, ~36,000 boxes, 100
detections per image by default; d2_focalstar/data/synthetic_coco.py): the paired bootstrap of
tools/compare.py (per-image matching once per run, then N resamples of a pair of runs, one at a
time and batched, side by side), and
COCO evaluation (the 12 numbers, as COCOEvaluator computes them) with pycocotools and with
faster-coco-eval (d2_focalstar/evaluation/coco.py). Prints Markdown tables and writes them as JSON.

    python tools/benchmark_eval.py --out output/benchmark_eval.json
    python tools/benchmark_eval.py --sections cocoeval --out output/benchmark_cocoeval.json
    python tools/benchmark_eval.py --images 200 --resamples 20 \\
        --out output/bench_eval_small.json   # quick
"""

import argparse
import datetime
import os
import platform
import time

import numpy as np
import torch

from d2_focalstar.data.synthetic_coco import synthetic_coco
from d2_focalstar.evaluation.bootstrap import RunEvaluation, paired_bootstrap
from d2_focalstar.evaluation.coco import coco_eval_implementation, evaluate_coco
from d2_focalstar.fileio import write_json


def bench_bootstrap(args):
    """The paired bootstrap of a pair of runs, two ways in one process on the same data and seed:
    one resample at a time (the reference path, batch=0) and all resamples of a batch at once
    (what tools/compare.py uses); the intervals must be the same."""
    gt, dets_a = synthetic_coco(args.images, seed=0)
    rng = np.random.default_rng(1)
    # another "run": a tenth of its detections lost
    dets_b = [d for d in dets_a if rng.random() > 0.1]
    start = time.perf_counter()
    a = RunEvaluation(gt, dets_a, ["class1", "class2"], name="a")
    b = RunEvaluation(gt, dets_b, ["class1", "class2"], name="b")
    match_s = time.perf_counter() - start
    seconds, results = {}, {}
    for path, batch in (("one at a time", 0), ("batched", args.batch)):
        start = time.perf_counter()
        results[path] = paired_bootstrap(
            [a], [b], num_resamples=args.resamples, seed=0, batch=batch
        )
        seconds[path] = time.perf_counter() - start
    res = results["batched"]
    same = results["batched"] == results["one at a time"]
    return dict(
        images=args.images,
        boxes=len(gt["annotations"]),
        detections=len(dets_a),
        resamples=args.resamples,
        matching_s_two_runs=match_s,
        reference_bootstrap_s=seconds["one at a time"],
        bootstrap_s=seconds["batched"],
        batch=args.batch,
        speedup=seconds["one at a time"] / seconds["batched"],
        same_numbers=same,
        per_resample_ms=1000 * seconds["batched"] / max(args.resamples, 1),
        ap_diff=res["AP"]["diff"],
        ap_interval=[res["AP"]["low"], res["AP"]["high"]],
    )


def bench_cocoeval(args):
    """Seconds of COCO evaluation (loadRes, evaluate, accumulate, summarize) of one run's
    detections, pycocotools then faster-coco-eval, and how far apart their 12 numbers are."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    gt, dets = synthetic_coco(args.images, seed=0)
    seconds, stats = {}, {}
    for impl in ("pycocotools", "fast"):
        coco = COCO()
        coco.dataset = gt
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        copies = [dict(d) for d in dets]  # loadRes adds keys to the dicts it is given
        start = time.perf_counter()
        stats[impl] = evaluate_coco(coco, copies, impl)
        seconds[impl] = time.perf_counter() - start
    return dict(
        images=args.images,
        boxes=len(gt["annotations"]),
        detections=len(dets),
        pycocotools_s=seconds["pycocotools"],
        faster_coco_eval_s=seconds["fast"],
        faster_coco_eval=coco_eval_implementation()[0],
        speedup=seconds["pycocotools"] / seconds["fast"],
        ap=stats["fast"][0],
        max_abs_diff=max(abs(a - b) for a, b in zip(stats["pycocotools"], stats["fast"])),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument(
        "--batch", type=int, default=50, help="resamples scored at once by the batched path"
    )
    p.add_argument("--out", default="output/benchmark_eval.json")
    p.add_argument(
        "--sections",
        nargs="+",
        default=["bootstrap", "cocoeval"],
        choices=["bootstrap", "cocoeval"],
    )
    args = p.parse_args(argv)
    meta = dict(
        date=datetime.date.today().isoformat(),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        numpy=np.__version__,
    )
    report = {"meta": meta}
    print(f"\n{meta}\n")
    if "bootstrap" in args.sections:
        row = report["bootstrap"] = bench_bootstrap(args)
        print(
            "| what | images | boxes | detections | resamples | matching (2 runs) s | "
            "one at a time s | "
            "batched s | speed-up | same intervals |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(
            f"| paired bootstrap of AP, AP50, APs, LAMR (a pair of runs) | {row['images']} | "
            f"{row['boxes']} | "
            f"{row['detections']} | {row['resamples']} | {row['matching_s_two_runs']:.1f} | "
            f"{row['reference_bootstrap_s']:.1f} | {row['bootstrap_s']:.1f} | "
            f"{row['speedup']:.1f}x | "
            f"{'yes' if row['same_numbers'] else 'NO'} |\n"
        )
    if "cocoeval" in args.sections:
        row = report["cocoeval"] = bench_cocoeval(args)
        print(
            "| what | images | boxes | detections | pycocotools s | faster-coco-eval s | "
            "speed-up | "
            "max diff of the 12 numbers |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print(
            f"| COCO evaluation of one run (COCOEvaluator's 12 numbers) | {row['images']} | "
            f"{row['boxes']} | "
            f"{row['detections']} | {row['pycocotools_s']:.1f} | {row['faster_coco_eval_s']:.1f} | "
            f"{row['speedup']:.1f}x | {row['max_abs_diff']:.1e} |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
