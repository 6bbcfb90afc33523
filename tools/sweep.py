#!/usr/bin/env python
"""Run a list of trainings, loss type x gamma x seed, one after another, each in its own folder.
Finished runs (results.json present) are skipped; interrupted ones resume from their checkpoint.

    python tools/sweep.py --config-file configs/retinanet_R50_flstar_1x.yaml --num-gpus 8 \\
        --loss-types CE FL FLSTAR --gammas 0.125 0.25 0.5 --seeds 0 1 --out output/sweep
    python tools/compare.py output/sweep/*

Anything after "--" goes to every train_net.py run as opts, e.g. -- SOLVER.MAX_ITER 2000
"""
import argparse
import os
import subprocess
import sys
import time

from d2_focalstar.study import plan_sweep, run_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--loss-types", nargs="+", default=["CE", "FL", "FLSTAR"],
                        help="of FLSTAR, FL, CE, FLSTAR_APPENDIX")
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.125, 0.25, 0.5],
                        help="FL*'s gammas (FL uses --fl-gamma)")
    parser.add_argument("--fl-gamma", type=float, default=2.0)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs (or CPU processes) per run")
    parser.add_argument("--out", default="output/sweep", help="one sub-folder per run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = parser.parse_args(argv)

    runs = plan_sweep(args.loss_types, args.gammas, args.seeds, fl_gamma=args.fl_gamma)
    failed = []
    for i, run in enumerate(runs, 1):
        folder = os.path.join(args.out, run.name)
        state = run_state(folder)
        print(f"[sweep {i}/{len(runs)}] {run.name}: {state}", flush=True)
        if state == "done" or args.dry_run:
            continue
        cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", args.config_file,
               "--num-gpus", str(args.num_gpus), "--dist-url", "auto"]
        cmd += ["--resume"] if state == "interrupted" else []
        cmd += run.opts() + ["OUTPUT_DIR", folder] + extra
        start = time.time()
        rc = subprocess.call(cmd)
        print(f"[sweep {i}/{len(runs)}] {run.name}: exit {rc} after {time.time() - start:.0f} s",
              flush=True)
        if rc != 0:
            failed.append(run.name)
    if failed:
        sys.exit(f"sweep.py: {len(failed)} run(s) failed: {', '.join(failed)} (rerun to retry them)")
