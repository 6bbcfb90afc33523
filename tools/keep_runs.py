#!/usr/bin/env python
"""Copy what a study keeps of each run into the repository: results.json, metrics.json,
config.yaml and the saved detections (gzipped; the comparison's intervals need them), nothing
else (checkpoints and events stay out).

    python tools/keep_runs.py output/proxy_shapes/* --to docs/results/proxy_shapes
    python tools/compare.py docs/results/proxy_shapes/*/ --out docs/results/proxy_shapes_compare
"""
import argparse
import gzip
import os
import shutil
import sys

from d2_focalstar.evaluation.bootstrap import detections_file
from d2_focalstar.fileio import atomic_write
from d2_focalstar.run.results import RESULTS_FILE


def keep(folder, to):
    name = os.path.basename(os.path.normpath(folder))
    dest = os.path.join(to, name)
    os.makedirs(dest, exist_ok=True)
    for f in (RESULTS_FILE, "metrics.json", "config.yaml"):
        if os.path.isfile(os.path.join(folder, f)):
            shutil.copyfile(os.path.join(folder, f), os.path.join(dest, f))
    det = detections_file(folder)
    if det:
        os.makedirs(os.path.join(dest, "inference"), exist_ok=True)
        out = os.path.join(dest, "inference", "coco_instances_results.json.gz")
        with open(det, "rb") as f:
            data = f.read() if det.endswith(".json") else gzip.decompress(f.read())
        # mtime 0: the same detections give the same bytes (committed files diff clean)
        atomic_write(out, lambda f: f.write(gzip.compress(data, mtime=0)))
    return dest, det is not None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+")
    p.add_argument("--to", required=True)
    args = p.parse_args(argv)
    kept = 0
    for folder in args.folders:
        if not os.path.isfile(os.path.join(folder, RESULTS_FILE)):
            print(f"skipped {folder}: no {RESULTS_FILE} (unfinished)", file=sys.stderr)
            continue
        dest, with_det = keep(folder, args.to)
        kept += 1
        print(f"{folder} -> {dest}" + ("" if with_det else " (no saved detections)"))
    print(f"kept {kept} run(s) in {args.to}")


if __name__ == "__main__":
    main()
