#!/usr/bin/env python
"""Copy what a study keeps of each run into the repository: results.json, metrics.json,
config.yaml and the saved detections (gzipped; the comparison's intervals need them), nothing
else (checkpoints and events stay out).

    python tools/keep_runs.py output/proxy_shapes/* --to docs/results/proxy_shapes
    python tools/compare.py docs/results/proxy_shapes/*/ --out docs/results/proxy_shapes_compare

Only regular files are copied: a symlink (results.json -> a file elsewhere) is refused and named.
A run already kept in --to is not replaced without --overwrite.
"""

import argparse
import gzip
import os
import stat
import sys

from d2_focalstar.evaluation.bootstrap import detections_file
from d2_focalstar.fileio import atomic_write
from d2_focalstar.run.errors import error_line
from d2_focalstar.run.results import RESULTS_FILE

PROG = "keep_runs.py"
KEPT = (RESULTS_FILE, "metrics.json", "config.yaml")
DETECTIONS = os.path.join("inference", "coco_instances_results.json.gz")


class Refused(ValueError):
    pass


def _read_regular(path):
    """The bytes of ``path`` if it is a regular file reached without a symlink; Refused otherwise
    (a link could make a study copy any file of the machine into the repository)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        why = "a symlink: only regular files are copied" if os.path.islink(path) else e.strerror
        raise Refused(f"{path}: {why}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Refused(f"{path}: not a regular file: only regular files are copied")
        return f.read()


def plan(folder, to):
    """(destination, {name: source path}) of a run; Refused for a link among them."""
    dest = os.path.join(to, os.path.basename(os.path.normpath(folder)))
    if os.path.realpath(dest) == os.path.realpath(folder):
        raise Refused(f"--to {to}: {folder} would be copied onto itself; choose another --to")
    sources = {f: os.path.join(folder, f) for f in KEPT if os.path.lexists(os.path.join(folder, f))}
    det = detections_file(folder)
    if det is None and os.path.islink(os.path.join(folder, "inference")):
        raise Refused(
            f"{os.path.join(folder, 'inference')}: a symlink: only regular files are copied"
        )
    if det:
        if os.path.islink(os.path.dirname(det)):
            raise Refused(f"{os.path.dirname(det)}: a symlink: only regular files are copied")
        sources[DETECTIONS] = det
    for path in sources.values():
        if os.path.islink(path) or not os.path.isfile(path):
            raise Refused(
                f"{path}: {'a symlink' if os.path.islink(path) else 'not a regular file'}: "
                "only regular files are copied"
            )
    return dest, sources


def keep(dest, sources):
    # all read before any write
    data = {name: _read_regular(path) for name, path in sources.items()}
    for name, content in data.items():
        if name == DETECTIONS:
            if not sources[name].endswith(".json"):
                content = gzip.decompress(content)
            # mtime 0: the same detections give the same bytes (committed files diff clean)
            content = gzip.compress(content, mtime=0)
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        atomic_write(os.path.join(dest, name), lambda f, c=content: f.write(c))
    return DETECTIONS in sources


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+")
    p.add_argument("--to", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace runs already kept in --to")
    args = p.parse_args(argv)
    if os.path.exists(args.to) and not os.path.isdir(args.to):
        sys.exit(error_line(PROG, f"--to {args.to} is a file: give a folder"))
    plans, refused = [], []
    for folder in args.folders:
        if not os.path.isfile(os.path.join(folder, RESULTS_FILE)):
            print(f"skipped {folder}: no {RESULTS_FILE} (unfinished)", file=sys.stderr)
            continue
        try:
            dest, sources = plan(folder, args.to)
        except Refused as e:
            refused.append(str(e))
            continue
        if not args.overwrite and any(
            os.path.lexists(os.path.join(dest, n)) for n in (*KEPT, DETECTIONS)
        ):
            refused.append(f"{folder}: already kept in {dest}; --overwrite replaces it")
            continue
        plans.append((folder, dest, sources))
    if refused:  # nothing copied: a study keeps all its runs or none
        sys.exit(error_line(PROG, f"nothing copied: {'; '.join(refused)}"))
    for folder, dest, sources in plans:
        try:
            with_det = keep(dest, sources)
        except (Refused, OSError) as e:
            sys.exit(error_line(PROG, f"{folder}: {e}"))
        print(f"{folder} -> {dest}" + ("" if with_det else " (no saved detections)"))
    print(f"kept {len(plans)} run(s) in {args.to}")


if __name__ == "__main__":
    main()
