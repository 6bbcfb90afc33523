"""
train_net.py as a SLURM job through submitit (tools/submit_slurm.py, tools/sweep.py --slurm);
docs/CLUSTER.md is the user's guide.

- One submitit task per node. Each runs ``train_net.py`` with ``--num-gpus`` GPUs per node and the
  distributed settings of the SLURM allocation (machine rank, number of machines, the first
  node's address and a port drawn from the job id: submitit's TorchDistributedEnvironment), which
  detectron2's ``launch`` turns into one process per GPU.
- Preemption and the time limit: submitit's signal reaches the job; its ``checkpoint()`` asks the
  training for a checkpoint now (d2_focalstar/run/preemption.py), waits for it to be whole, and
  returns the same job for submitit to requeue. A job started again, requeued by submitit or by
  the scheduler after a kill, resumes from OUTPUT_DIR's last complete checkpoint on its own and
  finishes at SOLVER.MAX_ITER, writing results.json as an uninterrupted run does; a run whose
  results.json exists is not trained again.
- A process that fails: its machine's training exits with that process's error (detectron2's
  launch stops the machine's other processes); the other machines stop their training, and every
  task of the job fails with that error ("machine M failed: ..."), not with the broken
  connections that followed it.

submitit is imported only here, when a job is built or runs: without it, SlurmError says so in a
line.
"""

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from .errors import reported_message
from .preemption import preemption_signal
from .processes import die_with_parent, stop_process_groups
from .results import RunDiverged, load_run, run_state

__all__ = [
    "SlurmError",
    "TrainJob",
    "add_slurm_arguments",
    "sbatch_options",
    "submit",
    "distributed_args",
    "failure_reason",
    "parse_time",
    "live_jobs",
    "record_jobs",
    "wait_for_local_jobs",
    "check_slurm_arguments",
]


class SlurmError(RuntimeError):
    """What stops a submission, in one line: no submitit, no sbatch, training arguments a job
    cannot take, the scheduler's own refusal."""


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise SlurmError(
            "submitit is not installed: pip install submitit (it is in requirements.txt; "
            "tools/setup_env.sh installs it)"
        ) from None
    return submitit


# ---- in the job ---------------------------------------------------------------------------------


def distributed_args(env, gpus_per_node):
    """train_net.py's distributed arguments for this task of a submitit job (one task per node):
    --num-gpus, --num-machines, --machine-rank and --dist-url from the SLURM environment."""
    from submitit.helpers import TorchDistributedEnvironment

    if env.num_tasks == 1:  # one machine: detectron2 picks a free local port
        return ["--num-gpus", str(gpus_per_node), "--dist-url", "auto"]
    dist = TorchDistributedEnvironment()  # MASTER_ADDR: the first node; port: from the job id
    return [
        "--num-gpus",
        str(gpus_per_node),
        "--num-machines",
        str(dist.world_size),
        "--machine-rank",
        str(dist.rank),
        "--dist-url",
        f"tcp://{dist.master_addr}:{dist.master_port}",
    ]


# an error of a rank that lost its peers (they failed first), not a cause of its own
_SECONDARY = re.compile(
    r"connection (closed|reset|refused)|broken pipe|\bnccl\b|gloo|timed? ?out|socket", re.I
)


def failure_reason(stderr_lines, program="train_net.py"):
    """What says why ``program`` failed: its one-line error's message, else the last exception
    line of a traceback, else its last line."""
    lines = [line.strip() for line in stderr_lines if line.strip()]
    for line in reversed(lines):
        if reported_message(line, program) is not None:
            return reported_message(line, program)
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b[^:]*:", line):
            return line
    return lines[-1] if lines else "no message"


class TrainJob:
    """train_net.py in a submitit job (submitit's checkpointing protocol: ``__call__`` runs it,
    ``checkpoint`` is called on preemption or the time limit). Returns the run's results.json
    record."""

    def __init__(
        self, train_args, output_dir, script, gpus_per_node=1, cwd=None, save_timeout_s=60
    ):
        self.train_args = list(train_args)  # train_net.py's, without the distributed ones
        self.output_dir = output_dir  # absolute; the last OUTPUT_DIR of train_args, added again
        self.script = script
        self.gpus_per_node = gpus_per_node
        self.cwd = cwd or os.getcwd()
        self.save_timeout_s = save_timeout_s

    def _params(self):
        return dict(
            train_args=self.train_args,
            output_dir=self.output_dir,
            script=self.script,
            gpus_per_node=self.gpus_per_node,
            cwd=self.cwd,
            save_timeout_s=self.save_timeout_s,
        )

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        rank = env.global_rank
        # finished before this start (a requeue after the end)
        state = run_state(self.output_dir)
        if state in ("done", "diverged"):  # a divergence is a result: not retried
            print(
                f"[slurm] {self.output_dir} is {'finished' if state == 'done' else state} "
                "(results.json): nothing to train",
                flush=True,
            )
            try:
                return load_run(self.output_dir)
            except RunDiverged as e:  # its record, as for a training that diverged here
                return e.record
        resume = ["--resume"] if state == "interrupted" else []
        cmd = [
            sys.executable,
            self.script,
            *distributed_args(env, self.gpus_per_node),
            *resume,
            *self.train_args,
            "OUTPUT_DIR",
            self.output_dir,
        ]
        print(f"[slurm] {env}: {' '.join(cmd)}", flush=True)
        failures = os.path.join(str(env.paths.folder), f"{env.job_id}_failures")
        os.makedirs(failures, exist_ok=True)
        self._start = time.time()
        returncode, tail = self._run(cmd, failures, rank)
        if returncode == 0:
            return load_run(self.output_dir)
        if returncode is None:  # stopped here because another task's training failed
            other_rank, message = self._first_failure(failures, rank, wait=False)
            raise RuntimeError(
                f"machine {other_rank} failed: {message} (machine {rank} was stopped)"
            )
        mine = failure_reason(tail)
        self._report(failures, rank, mine)
        if _SECONDARY.search(mine):  # lost its peers: did one of them fail first, of its own?
            other = self._first_failure(failures, rank, wait=True)
            if other and not _SECONDARY.search(other[1]):
                raise RuntimeError(
                    f"machine {other[0]} failed: {other[1]} (then machine {rank}: {mine})"
                )
        raise RuntimeError(f"machine {rank} failed: {mine}")

    def _run(self, cmd, failures, rank):
        """(exit status, the last lines of its stderr) of train_net.py; status None when it was
        stopped because another task's training failed."""
        ignored = preemption_signal()

        def child_setup():  # the training's processes ignore the signal until their hook handles it
            signal.signal(ignored, signal.SIG_IGN)
            die_with_parent()  # a task killed outright leaves no training behind

        tail = collections.deque(maxlen=200)
        proc = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=child_setup,
        )
        self._proc = proc
        copier = threading.Thread(target=_copy_lines, args=(proc.stderr, tail), daemon=True)
        copier.start()
        stopped = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(proc, failures, rank, stopped), daemon=True
        )
        watcher.start()
        try:
            returncode = proc.wait()
        finally:
            if proc.poll() is None:  # leaving early (requeue, an exception): the training goes too
                stop_process_groups([proc])
        copier.join(timeout=10)
        return (None if stopped.is_set() else returncode), list(tail)

    def _watch(self, proc, failures, rank, stopped):
        while proc.poll() is None:
            if self._first_failure(failures, rank, wait=False):
                stopped.set()
                stop_process_groups([proc])
                return
            time.sleep(1)

    def _report(self, failures, rank, message):
        with open(os.path.join(failures, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "message": message, "time": time.time()}, f)

    def _first_failure(self, failures, rank, wait):
        """(rank, message) of another task's failure in this start of the job: one that is a cause
        rather than a consequence, else the earliest; None if none. With ``wait``, give the others
        up to 10 s to report one that is a cause."""
        deadline = time.time() + (10 if wait else 0)
        while True:
            found = []
            for name in os.listdir(failures):
                path = os.path.join(failures, name)
                try:
                    if os.path.getmtime(path) < self._start or name == f"rank{rank}.json":
                        continue
                    with open(path) as f:
                        found.append(json.load(f))
                except (OSError, ValueError):  # being written
                    continue
            if any(not _SECONDARY.search(r["message"]) for r in found) or time.time() >= deadline:
                break
            time.sleep(0.5)
        if not found:
            return None
        found.sort(key=lambda r: (bool(_SECONDARY.search(r["message"])), r["time"]))
        return found[0]["rank"], found[0]["message"]

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on rank 0 when the job is about to be stopped: ask the training for
        a checkpoint, wait (up to save_timeout_s) until a checkpoint newer than the request is
        whole, and return the same job to requeue. It resumes from the last complete checkpoint,
        this one or an older one."""
        from submitit.helpers import DelayedSubmission

        proc = getattr(self, "_proc", None)
        marker = os.path.join(self.output_dir, "last_checkpoint")
        asked = time.time()
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, preemption_signal())
            except ProcessLookupError:
                pass
            while time.time() - asked < self.save_timeout_s and proc.poll() is None:
                if os.path.exists(marker) and os.path.getmtime(marker) >= asked:
                    break
                time.sleep(0.2)
        saved = os.path.exists(marker) and os.path.getmtime(marker) >= asked
        print(
            f"[slurm] stopping: {'checkpoint saved' if saved else 'no new checkpoint'}; "
            "requeued, the job "
            f"resumes from {_read(marker) or 'the start'}",
            flush=True,
        )
        return DelayedSubmission(TrainJob(**self._params()))


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _copy_lines(stream, tail):
    for line in stream:  # the job's log keeps train_net.py's stderr
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(line)


# ---- submitting ---------------------------------------------------------------------------------


def parse_time(text):
    """SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes."""
    try:
        days, rest = text.split("-", 1) if "-" in text else ("0", text)
        parts = [int(p) for p in rest.split(":")]
        if "-" in text:
            h, m, s = (parts + [0, 0])[:3]
        elif len(parts) == 3:
            h, m, s = parts
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        elif len(parts) == 1:
            h, m, s = 0, parts[0], 0
        else:
            raise ValueError
        minutes = int(days) * 1440 + h * 60 + m + (s + 59) // 60
        if minutes <= 0 or min(h, m, s, int(days)) < 0 or len(parts) > 3:
            raise ValueError
        return minutes
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(
            f"{text!r}: a SLURM time limit, e.g. 4320 (minutes), 72:00:00 or 3-00:00:00"
        ) from None


def sbatch_options(unknown):
    """sbatch options this tool does not know, from the command line ('--qos high', '--qos=high',
    '--exclusive'), as submitit's additional parameters {name: value or True}. Anything else is a
    SlurmError."""
    options, i = {}, 0
    while i < len(unknown):
        token = unknown[i]
        if not token.startswith("--") or token == "--":
            raise SlurmError(
                f"{token!r}: expected an sbatch option (--name or --name=value) before '--' "
                "and the training's arguments after it"
            )
        name, eq, value = token[2:].partition("=")
        if not eq and i + 1 < len(unknown) and not unknown[i + 1].startswith("-"):
            value, eq = unknown[i + 1], "="
            i += 1
        options[name] = value if eq else True
        i += 1
    return options


SBATCH_TIMEOUT_S = 120  # a scheduler that has not answered by then is not going to


def add_slurm_arguments(parser, gpus=True):
    """The scheduler options of tools/submit_slurm.py and tools/sweep.py --slurm."""
    group = parser.add_argument_group(
        "SLURM (through submitit; any other --option[=value] goes to sbatch as it is)"
    )
    group.add_argument("--nodes", type=int, default=1, help="machines per run (default 1)")
    if gpus:
        group.add_argument(
            "--gpus-per-node", type=int, default=8, help="GPUs per machine (default 8)"
        )
    group.add_argument("--partition", help="sbatch --partition")
    group.add_argument(
        "--time",
        type=parse_time,
        default=parse_time("72:00:00"),
        help="time limit of one job start, e.g. 72:00:00 or 3-00:00:00 (default 72 h); "
        "a run that needs longer is checkpointed and requeued",
    )
    group.add_argument("--account", help="sbatch --account")
    group.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPUs per node (default: GPUs x (DATALOADER.NUM_WORKERS + 1))",
    )
    group.add_argument("--mem", help="sbatch --mem, e.g. 256G")
    group.add_argument("--job-name", help="default: the run's folder name")
    group.add_argument(
        "--slurm-folder", help="submitit's files and the job logs (default: <OUTPUT_DIR>/slurm)"
    )
    group.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="seconds before the time limit when the job is told to checkpoint (default 120)",
    )
    group.add_argument(
        "--max-timeouts",
        type=int,
        default=10,
        help="how many times a run is requeued after reaching its time limit (default 10)",
    )
    group.add_argument(
        "--sbatch-timeout-s",
        type=int,
        default=SBATCH_TIMEOUT_S,
        help=f"seconds to wait for sbatch's answer (default {SBATCH_TIMEOUT_S})",
    )
    group.add_argument(
        "--local",
        action="store_true",
        help="run it here through submitit's local executor (nodes become tasks on this "
        "machine): to try a job without a cluster",
    )
    return group


def check_slurm_arguments(parser, args):
    """parser.error (one line, status 2) for a scheduler option out of range, before anything is
    written or submitted: sbatch would get it as it is, or submitit would replace it silently."""
    for name, least in (
        ("nodes", 1),
        ("gpus_per_node", 1),
        ("cpus_per_task", 1),
        ("signal_delay_s", 0),
        ("max_timeouts", 0),
        ("sbatch_timeout_s", 1),
    ):
        value = getattr(args, name, None)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} {value}: must be at least {least}")


_OWN_FLAGS = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url", "--eval-only")


def check_train_args(train_args, nodes, gpus_per_node):
    """The config of the training (train_net.py's arguments) as the job will run it, checked
    here, before anything waits in a queue: a ConfigError or SlurmError in one line."""
    from .cli import UNSAFE_CONFIG_FLAG, check_batch_split, check_output_dir, load_config

    for flag in _OWN_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            raise SlurmError(
                f"{flag} in the training's arguments: the job sets it (--nodes, "
                "--gpus-per-node); evaluation runs with train_net.py itself"
            )
    config_file, opts, unsafe, i = None, [], False, 0
    while i < len(train_args):
        a = train_args[i]
        if a == "--config-file" and i + 1 < len(train_args):
            config_file, i = train_args[i + 1], i + 2
        elif a.startswith("--config-file="):
            config_file, i = a.split("=", 1)[1], i + 1
        elif a == "--resume":
            i += 1
        elif a == UNSAFE_CONFIG_FLAG:
            unsafe, i = True, i + 1
        elif a.startswith("-"):
            raise SlurmError(
                f"{a}: not a train_net.py argument a job takes (--config-file FILE, "
                f"--resume, {UNSAFE_CONFIG_FLAG}, then KEY VALUE opts)"
            )
        else:
            opts = train_args[i:]
            break
    # the login node need not have the GPUs: one process, and no word about its lack of CUDA
    cfg = load_config(config_file, opts, num_gpus=1, warn_no_cuda=False, allow_unsafe=unsafe)
    check_batch_split(
        cfg, nodes * gpus_per_node, f"(--nodes {nodes} x --gpus-per-node {gpus_per_node})"
    )
    check_output_dir(cfg)
    return cfg


def check_scheduler(args):
    """submitit, and sbatch and srun unless the job runs here (--local): a SlurmError if missing."""
    require_submitit()
    missing = (
        [] if args.local else [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    )
    if missing:
        raise SlurmError(
            f"no {' or '.join(missing)} on this machine (PATH): submit from a SLURM login "
            "node, or add --local to run the job here through submitit's local executor"
        )


def build_executor(args, folder, gpus_per_node, cpus_per_task, name):
    """submitit's executor for ``args`` (add_slurm_arguments' options and the sbatch ones in
    ``args.sbatch``): SLURM, or the local executor with --local."""
    submitit = require_submitit()
    if args.local:
        import torch

        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_timeouts)
        # the local executor sets CUDA_VISIBLE_DEVICES to its first gpus_per_node GPUs: none
        # without CUDA, where each "GPU" is a CPU process
        executor.update_parameters(
            timeout_min=args.time,
            tasks_per_node=args.nodes,
            gpus_per_node=gpus_per_node if torch.cuda.is_available() else 0,
            signal_delay_s=args.signal_delay_s,
        )
        return executor
    check_scheduler(args)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_timeouts)
    params = dict(
        nodes=args.nodes,
        ntasks_per_node=1,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        time=args.time,
        signal_delay_s=args.signal_delay_s,
        partition=args.partition,
        account=args.account,
        mem=args.mem,
        job_name=name,
        additional_parameters=dict(args.sbatch),
    )
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def train_job(args, train_args, script):
    """(TrainJob, config) for train_net.py's arguments ``train_args``, checked (SlurmError)."""
    from ..config import ConfigError

    try:
        cfg = check_train_args(train_args, args.nodes, args.gpus_per_node)
    except ConfigError as e:
        raise SlurmError(str(e)) from None
    job = TrainJob(
        [a for a in train_args if a != "--resume"],
        os.path.abspath(cfg.OUTPUT_DIR),
        script,
        gpus_per_node=args.gpus_per_node,
        save_timeout_s=max(10, args.signal_delay_s // 2),
    )
    return job, cfg


def submit(args, runs, script, folder=None, name=None):
    """Check and submit trainings (a list of train_net.py argument lists) with the scheduler
    options ``args``: one job, or a job array. Returns [(submitit job, TrainJob)]."""
    check_scheduler(args)  # the machine first, then the configs
    prepared = [train_job(args, train_args, script) for train_args in runs]
    jobs = [job for job, _ in prepared]
    cfg = prepared[0][1]
    folder = args.slurm_folder or folder or os.path.join(jobs[0].output_dir, "slurm")
    cpus = args.cpus_per_task or args.gpus_per_node * (cfg.DATALOADER.NUM_WORKERS + 1)
    executor = build_executor(
        args,
        folder,
        args.gpus_per_node,
        cpus,
        args.job_name or name or os.path.basename(jobs[0].output_dir),
    )
    return list(
        zip(submit_jobs(executor, jobs, getattr(args, "sbatch_timeout_s", SBATCH_TIMEOUT_S)), jobs)
    )


JOBS_FILE = "jobs.json"  # in the submitit folder: the job id of each run folder submitted from it
# squeue's states of a job that will still train (one not listed has ended)
_WAITING_OR_RUNNING = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}


def record_jobs(folder, submitted, local):
    """Remember which job trains which run folder (``submitted``: [(submitit job, TrainJob)])."""
    from ..fileio import atomic_write

    path = os.path.join(folder, JOBS_FILE)
    known = _read_jobs(path)
    for job, train in submitted:
        known[train.output_dir] = {"job_id": str(job.job_id), "local": bool(local)}
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(known, indent=1).encode()))


def _read_jobs(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def live_jobs(folder, timeout_s=60):
    """{run folder: job id} of the jobs submitted from ``folder`` that are still queued or running:
    squeue's answer for SLURM jobs, the controller process for local ones. SlurmError if squeue
    does not answer."""
    known = _read_jobs(os.path.join(folder, JOBS_FILE))
    live = {}
    for output_dir, entry in known.items():
        if not isinstance(entry, dict) or not str(entry.get("job_id", "")).split("_")[0].isdigit():
            continue
        if entry.get("local"):
            try:
                os.kill(int(entry["job_id"]), 0)
                live[output_dir] = entry["job_id"]
            except (OSError, ValueError):
                pass
    slurm_ids = {
        e["job_id"]: d
        for d, e in known.items()
        if isinstance(e, dict)
        and not e.get("local")
        and str(e.get("job_id", "")).split("_")[0].isdigit()
    }
    if slurm_ids:
        answer = _scheduler_command(
            [
                "squeue",
                "--noheader",
                "--array",
                "--format=%i %T",
                "--jobs",
                ",".join(sorted({i.split("_")[0] for i in slurm_ids})),
            ],
            timeout_s,
        )
        for line in answer.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in slurm_ids and parts[1] in _WAITING_OR_RUNNING:
                live[slurm_ids[parts[0]]] = parts[0]
    return live


def _scheduler_command(cmd, timeout_s):
    """A scheduler command's stdout; SlurmError in one line if it hangs or fails."""
    if shutil.which(cmd[0]) is None:
        raise SlurmError(
            f"no {cmd[0]} on this machine (PATH): cannot tell which submitted runs are still "
            "queued; submit from a SLURM login node"
        )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"{cmd[0]} did not answer within {timeout_s} s: the scheduler may be overloaded; "
            "try again later"
        ) from None
    # squeue fails for job ids it no longer knows: those jobs have ended
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise SlurmError(
            f"{cmd[0]} failed: {(proc.stderr.strip().splitlines() or ['no message'])[-1]}"
        )
    return proc.stdout


def wait_for_local_jobs(submitted):
    """Wait for jobs of submitit's local executor, which then live and die with this command:
    Ctrl-C or SIGTERM here cancels them (their trainings stop, keeping their checkpoints) before
    it goes on as a KeyboardInterrupt (errors.Terminated for SIGTERM). Returns [(job, its
    results.json record, or None and the reason it failed)]."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from .errors import raise_terminated

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    done = []
    try:
        for job in submitted:
            try:
                done.append((job, job.result(), None))
            except (FailedJobError, UncompletedJobError) as e:  # they hold the job's traceback
                done.append((job, None, failure_reason(str(e).splitlines())))
    except KeyboardInterrupt:
        for job in submitted:
            _interrupt_local_tasks(job)
        for job in submitted:
            process = getattr(job, "_process", None)
            if process is not None:
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return done


def _interrupt_local_tasks(job):
    """SIGINT to the tasks of a local job: each stops its training (TrainJob._run) and exits, and
    its controller then ends on its own (SIGINT to the controller would print its traceback on
    this command's terminal)."""
    process = getattr(job, "_process", None)
    try:
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
            tasks = [int(p) for p in f.read().split()]
    except (AttributeError, OSError, ValueError):  # not Linux, or it has ended
        job.cancel(check=False)
        return
    for pid in tasks:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def _files_under(folder):
    found = set()
    for root, _, names in os.walk(folder):
        found.update(os.path.join(root, n) for n in names)
    return found


def submit_jobs(executor, jobs, timeout_s=SBATCH_TIMEOUT_S):
    """Submit ``jobs`` (TrainJobs): one job, or a job array for several. Returns submitit's jobs.
    The scheduler's refusal, an answer without a job id, or no answer within ``timeout_s`` is a
    SlurmError in one line, and the files the failed submission wrote (submitit's pickles of the
    jobs, its sbatch script) are removed."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    folder = str(executor.folder)
    before = _files_under(folder)
    outcome = {}

    def submit_all():  # in a thread: sbatch may hang, and this command must not hang with it
        try:
            if len(jobs) == 1:
                outcome["jobs"] = [executor.submit(jobs[0])]
            else:
                with executor.batch():
                    submitted = [executor.submit(job) for job in jobs]
                outcome["jobs"] = submitted
        except BaseException as e:  # noqa: B902 - handed to the waiting thread
            outcome["error"] = e

    worker = threading.Thread(target=submit_all, daemon=True)
    worker.start()
    worker.join(timeout_s)
    try:
        if worker.is_alive():
            _kill_children_of(worker.native_id)  # sbatch, still waited for by the worker
            worker.join(10)
            raise SlurmError(
                f"sbatch did not answer within {timeout_s} s (the scheduler may be overloaded "
                "or down): nothing was submitted; try again later"
            )
        error = outcome.get("error")
        if isinstance(error, FailedJobError):
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise SlurmError("sbatch refused the job: " + (" / ".join(lines[:3]) or "no message"))
        if isinstance(error, FailedSubmissionError):
            answer = re.search(r'sbatch output "(.*?)"', str(error), re.S)
            raise SlurmError(
                "sbatch answered "
                f"{answer.group(1).strip()[:200] if answer else str(error)[:200]!r}, "
                "which holds no job id: whether a job was queued is unknown; look with squeue "
                "before submitting again"
            )
        if error is not None:
            raise error
        return outcome["jobs"]
    except BaseException:
        for path in _files_under(folder) - before:  # what the failed submission wrote
            if path.endswith((".pkl", ".sh")):
                try:
                    os.remove(path)
                except OSError:
                    pass
        raise


def _kill_children_of(thread_id):
    """SIGKILL the processes that a thread of this process started (Linux: /proc lists a
    thread's children)."""
    try:
        with open(f"/proc/{os.getpid()}/task/{thread_id}/children") as f:
            children = [int(p) for p in f.read().split()]
    except (OSError, ValueError, TypeError):
        return
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
