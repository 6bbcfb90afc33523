#!/usr/bin/env python
"""Run a list of trainings, loss type x parameters x alpha x learning rate x seed, each in its own
folder: one after another, or --jobs at a time sharing the GPUs. Finished runs (results.json
present) are skipped; interrupted ones resume from their checkpoint.

    python tools/sweep.py --config-file configs/retinanet_R50_flstar_1x.yaml --num-gpus 8 \\
        --loss-types CE FL FLSTAR --gammas 0.125 0.25 0.5 --seeds 0 1 --out output/sweep
    python tools/sweep.py --config-file configs/study_shapes_gpu.yaml --jobs 12 \\
        --loss-types CE FL FLSTAR FLSTAR_APPENDIX --seeds 0 1 --out output/study_gpu
    python tools/sweep.py --config-file configs/quickstart_flstar.yaml --loss-types CE FL \\
        --param FL.gamma=0.5,1,2,5 --alphas 0.25 0.75 --seeds 0 1 2 --out output/table1
    python tools/sweep.py --config-file configs/proxy80_flstar.yaml --loss-types FL \\
        --base-lrs 0.005 0.01 0.02 0.04 --seeds 0 --out output/proxy80_rates
    python tools/compare.py output/sweep/*

The loss types, their parameters and the values a sweep tries by default come from the loss
table (d2_focalstar/modeling/losses.py): FL* tries the proposal's gammas, FL g = 2;
--param TYPE.NAME=V,V sets the values of any parameter (--gammas and --fl-gamma are short for
FLSTAR.gamma and FL.gamma). Any detector's config works (RetinaNet, FCOS): the keys are the
config's own. --base-lrs tries learning rates: losses differ in their best rate (on the
COCO-imbalance proxy CE's is 0.005 and FL g=2's 0.02), so one shared rate can decide a comparison.

With --jobs N, N runs go at once: run slot j gets --num-gpus GPUs starting at GPU j * num_gpus,
wrapping around (small models share a GPU well), each run's output goes to <folder>/sweep.log,
and OMP_NUM_THREADS defaults to the CPU count / N so that the runs do not oversubscribe the CPU;
every --status-every seconds a line gives each running run's iteration and ETA (from its log).
Anything after "--" goes to every train_net.py run as opts, e.g. -- SOLVER.MAX_ITER 2000

Stopping the sweep (Ctrl-C, SIGTERM) stops its runs too; their checkpoints are whole (written
atomically), so the same command later resumes them.

With --slurm the runs not done yet go to a SLURM cluster as one job array instead, each run a job
of --nodes machines x --num-gpus GPUs, checkpointed and requeued when preempted or at its time
limit (tools/submit_slurm.py's options; any other --option goes to sbatch; docs/CLUSTER.md):

    python tools/sweep.py --config-file configs/retinanet_R50_flstar_1x.yaml --num-gpus 8 --slurm \
        --partition gpu --time 24:00:00 --loss-types CE FL FLSTAR --seeds 0 1 --out output/sweep
"""

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

from d2_focalstar.config import ConfigError
from d2_focalstar.modeling import loss_config_node
from d2_focalstar.modeling.losses import LOSS_TYPES
from d2_focalstar.run.cli import UNSAFE_CONFIG_FLAG, add_unsafe_config_argument, load_config
from d2_focalstar.run.errors import Terminated, error_line
from d2_focalstar.run.lock import RunFolderBusy, run_folder_lock
from d2_focalstar.run.processes import stop_process_groups
from d2_focalstar.run.results import recipe_mismatch, run_state
from d2_focalstar.run.slurm import (
    SlurmError,
    add_slurm_arguments,
    check_slurm_arguments,
    live_jobs,
    record_jobs,
    sbatch_options,
    submit,
    wait_for_local_jobs,
)
from d2_focalstar.study.sweep import plan_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def visible_gpus():
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES, else all that torch sees."""
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ids is not None:
        return [i for i in ids.split(",") if i.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _tail(path, size=8192):
    """The last ``size`` bytes of a file as text (a run's log can be large), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return None


def last_progress(log_path, tail=8192):
    """'iter N, eta H:MM:SS' from the last progress line detectron2 wrote to a run's log, or
    None."""
    found = re.findall(r"eta: (\S+)\s+iter: (\d+)", _tail(log_path, tail) or "")
    return f"iter {found[-1][1]}, eta {found[-1][0]}" if found else None


def last_line(log_path, tail=4096):
    """The last non-empty line of a run's log (a failed run's reason, e.g. 'train_net.py: error:
    ...'), or None."""
    lines = [line.strip() for line in (_tail(log_path, tail) or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def gpu_sharing_warning(jobs, num_gpus, gpus):
    """The line to print when --jobs x --num-gpus asks for more GPUs than ``gpus`` (the visible
    ones) holds, so that runs share GPUs; None when they do not, or without GPUs (CPU runs)."""
    if not gpus or jobs * num_gpus <= len(gpus):
        return None
    return (
        f"[sweep] warning: --jobs {jobs} x --num-gpus {num_gpus} = {jobs * num_gpus} GPUs "
        f"wanted, {len(gpus)} visible: runs will share GPUs"
    )


def parse_param(text):
    """'FL.gamma=0.5,1,2' -> (('FL', 'gamma'), [0.5, 1.0, 2.0]); argparse's error otherwise."""
    try:
        target, values = text.split("=", 1)
        loss, name = target.split(".", 1)
        entry = LOSS_TYPES[loss.upper()]
        entry.param(name)
        return (entry.name, name), [float(v) for v in values.split(",")]
    except (ValueError, KeyError, StopIteration):
        known = "; ".join(
            f"{t.name}: {', '.join(p.name for p in t.params) or '-'}" for t in LOSS_TYPES.values()
        )
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected TYPE.NAME=V[,V...] with a loss type and one of its parameters "
            f"({known})"
        ) from None


def interrupt(signum, frame):
    raise KeyboardInterrupt


def slot_gpus(slot, num_gpus, gpus):
    """The CUDA_VISIBLE_DEVICES of run slot ``slot`` (None without GPUs)."""
    if not gpus:
        return None
    return ",".join(
        gpus[(slot * num_gpus + i) % len(gpus)] for i in range(min(num_gpus, len(gpus)))
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument(
        "--loss-types",
        nargs="+",
        default=["CE", "FL", "FLSTAR"],
        type=str.upper,
        choices=list(LOSS_TYPES),
        metavar="LOSS",
        help=f"of {', '.join(LOSS_TYPES)}",
    )
    parser.add_argument(
        "--param",
        nargs="+",
        type=parse_param,
        default=[],
        metavar="TYPE.NAME=V,V",
        help="values of a loss parameter to try, e.g. FL.gamma=0.5,1,2,5 POLY1_FL.eps=1,2",
    )
    parser.add_argument(
        "--gammas",
        nargs="+",
        type=float,
        help="FL*'s gammas (default: the table's, 0.125 0.25 0.5); = --param FLSTAR.gamma=...",
    )
    parser.add_argument(
        "--fl-gamma", type=float, nargs="+", help="FL's gamma(s); = --param FL.gamma=..."
    )
    parser.add_argument(
        "--alphas",
        nargs="+",
        type=float,
        help="alphas to try for every loss type (default: the config's)",
    )
    parser.add_argument(
        "--base-lrs",
        nargs="+",
        type=float,
        metavar="LR",
        help="learning rates (SOLVER.BASE_LR) to try for every setting (default: the config's); "
        "run folders get _lr<rate>",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs (or CPU processes) per run")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once (default: one after another)"
    )
    parser.add_argument("--out", default="output/sweep", help="one sub-folder per run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument(
        "--status-every",
        type=float,
        default=60,
        help="seconds between progress lines with --jobs > 1 (0: none)",
    )
    parser.add_argument(
        "--slurm",
        action="store_true",
        help="submit the runs not done yet as one SLURM job array instead (each run: --nodes "
        "x --num-gpus GPUs, requeued when preempted; docs/CLUSTER.md)",
    )
    add_unsafe_config_argument(parser)
    add_slurm_arguments(parser, gpus=False)
    args, unknown = parser.parse_known_args(argv)  # with --slurm, the rest goes to sbatch
    if unknown and not args.slurm:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.jobs < 1 or args.num_gpus < 1:
        parser.error(f"--jobs ({args.jobs}) and --num-gpus ({args.num_gpus}) must be at least 1")
    check_slurm_arguments(parser, args)
    bad = [lr for lr in args.base_lrs or [] if not 0 < lr < float("inf")]
    if bad:
        parser.error(f"--base-lrs {bad[0]:g}: a learning rate must be a positive number")
    if args.base_lrs and "SOLVER.BASE_LR" in extra[::2]:
        parser.error("--base-lrs and SOLVER.BASE_LR after '--' both set the rate: give one")

    values = dict(args.param)
    if args.gammas:
        values[("FLSTAR", "gamma")] = args.gammas
    if args.fl_gamma:
        values[("FL", "gamma")] = args.fl_gamma
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file}: no such file")
    try:  # the config every run starts from, checked once here (its runs add the loss's keys)
        cfg = load_config(
            args.config_file, extra, warn_no_cuda=False, allow_unsafe=args.unsafe_config
        )
        node = loss_config_node(cfg)
    except ConfigError as e:
        sys.exit(error_line("sweep.py", e))
    runs = plan_sweep(args.loss_types, args.seeds, values, args.alphas, args.base_lrs)
    total = len(runs)
    gpus = visible_gpus()
    # every run would fail in detectron2's launch
    if gpus and args.num_gpus > len(gpus) and not args.slurm:
        parser.error(
            f"--num-gpus {args.num_gpus}: only {len(gpus)} GPUs visible ({','.join(gpus)})"
        )
    gpus = gpus if args.jobs > 1 else []  # one run at a time: it gets all of them
    warning = gpu_sharing_warning(args.jobs, args.num_gpus, gpus)
    if warning:
        print(warning, flush=True)
    env = dict(os.environ)
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    unsafe = [UNSAFE_CONFIG_FLAG] if args.unsafe_config else []  # each run loads the config again
    todo, stale = [], []
    for i, run in enumerate(runs, 1):
        folder = os.path.join(args.out, run.name)
        state = run_state(folder)
        print(
            f"[sweep {i}/{total}] {run.name}: {state}"
            + (f" ({' '.join(run.opts(node))})" if args.dry_run else ""),
            flush=True,
        )
        if state not in ("done", "diverged") and not args.dry_run:
            todo.append((i, run, folder, state))
        elif state in ("done", "diverged") and recipe_mismatch(folder, cfg):
            # kept as this sweep's run, it would enter a table beside runs of another recipe
            stale.append(f"{folder}: {recipe_mismatch(folder, cfg)}")
    if stale:
        sys.exit(
            error_line(
                "sweep.py",
                f"{len(stale)} finished run(s) in --out were trained with another recipe than "
                f"{args.config_file} sets, so they are not this sweep's runs: {'; '.join(stale)}"
                " (give another --out, or move them away)",
            )
        )
    if args.slurm and todo:  # the jobs resume interrupted runs themselves
        slurm_folder = args.slurm_folder or os.path.join(args.out, "slurm")
        try:  # a run whose job is still queued or running is not submitted again
            live = live_jobs(slurm_folder)
        except SlurmError as e:
            sys.exit(error_line("sweep.py", e))
        for i, run, folder, state in [t for t in todo if os.path.abspath(t[2]) in live]:
            print(
                f"[sweep {i}/{total}] {run.name}: job {live[os.path.abspath(folder)]} "
                "is still queued or "
                "running: not submitted again",
                flush=True,
            )
        todo = [t for t in todo if os.path.abspath(t[2]) not in live]
    if args.slurm and todo:
        args.gpus_per_node = args.num_gpus
        trainings = [
            [
                "--config-file",
                args.config_file,
                *unsafe,
                *run.opts(node),
                "OUTPUT_DIR",
                folder,
                *extra,
            ]
            for i, run, folder, state in todo
        ]
        try:
            args.sbatch = sbatch_options(unknown)
            submitted = submit(
                args,
                trainings,
                os.path.join(REPO, "train_net.py"),
                folder=slurm_folder,
                name=os.path.basename(os.path.abspath(args.out)),
            )
            record_jobs(slurm_folder, submitted, args.local)
        except SlurmError as e:
            sys.exit(error_line("sweep.py", e))
        for (i, run, folder, state), (job, _) in zip(todo, submitted):
            print(
                f"[sweep {i}/{total}] {run.name}: submitted, job {job.job_id} "
                f"(log {job.paths.stdout})",
                flush=True,
            )
        if args.local:  # the jobs run under this command, and stop with it
            try:
                finished = wait_for_local_jobs([job for job, _ in submitted])
            except KeyboardInterrupt as e:
                how = (
                    "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
                )
                print(
                    error_line(
                        "sweep.py",
                        f"{how}: the local jobs were stopped; the same command "
                        "continues them from their checkpoints",
                    ),
                    file=sys.stderr,
                )
                sys.exit(143 if isinstance(e, Terminated) else 130)
            for (i, run, folder, state), (job, _, why) in zip(todo, finished):
                print(
                    f"[sweep {i}/{total}] {run.name}: {'failed' if why else 'finished'}", flush=True
                )
            failed = [
                (i, run.name, job.paths.stdout)
                for (i, run, folder, state), (job, _, why) in zip(todo, finished)
                if why
            ]
            report_failures(failed, args.out)
        return

    # SIGTERM (kill, a job scheduler) stops the sweep like Ctrl-C: its runs are stopped with it
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        # a second sweep of the same runs at once is refused (they would train twice into one
        # folder)
        with run_folder_lock(args.out, "--out") if todo else contextlib.nullcontext():
            failed = run_all(args, todo, total, env, gpus, extra, node)
    except RunFolderBusy as e:
        sys.exit(error_line("sweep.py", e))
    finally:
        signal.signal(signal.SIGTERM, previous)
    report_failures(failed, args.out)


def report_failures(failed, out):
    """Exit naming the runs that failed (in the sweep's order) and what a rerun does. Runs that
    diverged are results (recorded in their results.json, counted by table1.py, not retried):
    a sweep where only those failed exits 0."""
    diverged = [f for f in failed if run_state(os.path.join(out, f[1])) == "diverged"]
    failed = [f for f in failed if f not in diverged]
    if diverged:
        print(
            f"sweep.py: {len(diverged)} run(s) diverged: "
            + ", ".join(name for _, name, _ in sorted(diverged))
            + " (recorded in their results.json as results; a rerun does not retry them: "
            "delete a run's folder to)",
            flush=True,
        )
    if failed:
        listed = ", ".join(
            f"{name} (log {path})" if path else name for _, name, path in sorted(failed)
        )
        sys.exit(f"sweep.py: {len(failed)} run(s) failed: {listed} (rerun to retry them)")


def run_all(args, todo, total, env, gpus, extra, node):
    """Run ``todo`` (--jobs at a time); [(index, name, log)] of those that failed."""
    failed, running, free_slots = [], {}, list(range(args.jobs))
    last_status = time.time()
    try:
        while todo or running:
            while todo and free_slots:  # start runs while there is a free slot
                i, run, folder, state = todo.pop(0)
                slot = free_slots.pop(0)
                cmd = [
                    sys.executable,
                    os.path.join(REPO, "train_net.py"),
                    "--config-file",
                    args.config_file,
                    "--num-gpus",
                    str(args.num_gpus),
                    "--dist-url",
                    "auto",
                ]
                cmd += ["--resume"] if state == "interrupted" else []
                cmd += [UNSAFE_CONFIG_FLAG] if args.unsafe_config else []
                cmd += run.opts(node) + ["OUTPUT_DIR", folder] + extra
                run_env, log = dict(env), None
                if args.jobs > 1:
                    devices = slot_gpus(slot, args.num_gpus, gpus)
                    if devices is not None:
                        run_env["CUDA_VISIBLE_DEVICES"] = devices
                    os.makedirs(folder, exist_ok=True)
                    log = open(os.path.join(folder, "sweep.log"), "a")
                    print(
                        f"[sweep {i}/{total}] {run.name}: started (GPUs {devices}, log "
                        f"{os.path.join(folder, 'sweep.log')})",
                        flush=True,
                    )
                # its own process group, so that stopping the sweep stops all of a run's processes
                proc = subprocess.Popen(
                    cmd,
                    env=run_env,
                    stdout=log,
                    start_new_session=True,
                    stderr=subprocess.STDOUT if log else None,
                )
                running[proc] = (i, run, slot, log, time.time())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                i, run, slot, log, start = running.pop(proc)
                free_slots.append(slot)
                if log:
                    log.close()
                print(
                    f"[sweep {i}/{total}] {run.name}: exit {proc.returncode} after "
                    f"{time.time() - start:.0f} s",
                    flush=True,
                )
                if proc.returncode != 0:
                    failed.append((i, run.name, log.name if log else None))
                    if log:  # its reason is in the log, not on the screen
                        print(
                            f"[sweep {i}/{total}] {run.name}: failed, {log.name} ends: "
                            f"{last_line(log.name) or '(empty)'}",
                            flush=True,
                        )
            if (
                args.jobs > 1
                and args.status_every > 0
                and time.time() - last_status >= args.status_every
            ):
                last_status = time.time()
                states = [
                    f"{run.name} {last_progress(log.name) or 'starting'}"
                    for i, run, slot, log, start in running.values()
                ]
                print(
                    f"[sweep] {total - len(todo) - len(running)} done or failed, "
                    f"{len(todo)} waiting; running: {'; '.join(states)}",
                    flush=True,
                )
    except KeyboardInterrupt:
        print(f"[sweep] stopping {len(running)} run(s); the same command resumes them", flush=True)
        stop_process_groups(running, grace=30)  # each run's group: train_net.py and its processes
        sys.exit(130)
    return failed


if __name__ == "__main__":
    main()
