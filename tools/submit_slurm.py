#!/usr/bin/env python
"""Submit a train_net.py training as a SLURM job through submitit: --nodes machines with
--gpus-per-node GPUs each, checkpointed and requeued when preempted or at its time limit, resumed
until it reaches SOLVER.MAX_ITER (docs/CLUSTER.md). Scheduler options first, then "--" and
train_net.py's arguments (--config-file and opts; the job sets the distributed ones):

    python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --account myproj --qos high -- --config-file configs/retinanet_R50_flstar_1x.yaml
    python tools/submit_slurm.py --local --nodes 1 --gpus-per-node 2 --time 60 -- \\
        --config-file configs/quickstart_flstar.yaml SOLVER.MAX_ITER 100   # try it here, no cluster

Any sbatch option this tool does not name (--qos high, --constraint=a100, --exclusive) goes to
sbatch as it is; sbatch's own error is shown if it refuses one. The job's logs and submitit's
files go to <OUTPUT_DIR>/slurm unless --slurm-folder says otherwise.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROG = "submit_slurm.py"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from d2_focalstar.run.errors import error_line
    from d2_focalstar.run.slurm import (
        SlurmError,
        add_slurm_arguments,
        check_slurm_arguments,
        sbatch_options,
    )

    add_slurm_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    if not train_args:
        parser.error(
            "no training: give train_net.py's arguments after '--', e.g. "
            "-- --config-file configs/retinanet_R50_flstar_1x.yaml"
        )
    check_slurm_arguments(parser, args)
    try:
        args.sbatch = sbatch_options(unknown)
        submit_and_report(args, train_args)
    except SlurmError as e:
        sys.exit(error_line(PROG, e))


def submit_and_report(args, train_args):
    from d2_focalstar.run.errors import Terminated, error_line
    from d2_focalstar.run.slurm import SlurmError, submit, wait_for_local_jobs

    ((submitted, job),) = submit(args, [train_args], os.path.join(REPO, "train_net.py"))
    where = "here (submitit's local executor)" if args.local else "SLURM"
    print(
        f"[{PROG}] submitted job {submitted.job_id} to {where}: {args.nodes} node(s) x "
        f"{args.gpus_per_node} GPU(s), OUTPUT_DIR {job.output_dir}; log {submitted.paths.stdout}",
        flush=True,
    )
    if args.local:  # the job runs under this command, and stops with it
        try:
            ((_, record, failed),) = wait_for_local_jobs([submitted])
        except KeyboardInterrupt as e:
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
            print(
                error_line(
                    PROG,
                    f"{how}: the local job was stopped; the same command continues it from "
                    f"its last checkpoint in {job.output_dir}",
                ),
                file=sys.stderr,
            )
            sys.exit(143 if isinstance(e, Terminated) else 130)
        if failed:
            raise SlurmError(f"the job failed: {failed}")
        if "diverged" in record:  # an earlier training in the folder diverged: not retried
            print(
                f"[{PROG}] {job.output_dir} holds a training that diverged at iteration "
                f"{record.get('iteration')} ({record['diverged']}): a result, not retried; "
                "delete its results.json to train again"
            )
            return
        print(
            f"[{PROG}] finished: {os.path.join(job.output_dir, 'results.json')} "
            f"(iteration {record.get('iteration')})"
        )


if __name__ == "__main__":
    main()
