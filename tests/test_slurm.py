"""SLURM through submitit (d2_focalstar/run/slurm.py, d2_focalstar/run/preemption.py,
tools/submit_slurm.py, tools/sweep.py --slurm), without a cluster: the jobs run through submitit's
local executor (a 2-process CPU training preempted, requeued and finished; a job whose rank fails),
the submissions go to stand-ins for sbatch and srun that check their options as sbatch does."""

import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from helpers import FAST, QUICKSTART, REPO, assert_one_line_error, run_here

submitit = pytest.importorskip("submitit")

from d2_focalstar.run.results import read_metrics  # noqa: E402
from d2_focalstar.run.slurm import add_slurm_arguments, distributed_args, failure_reason, submit  # noqa: E402

TINY = [*QUICKSTART, *FAST, "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96"]


def _local_args(tmp_path, nodes, gpus):
    parser = argparse.ArgumentParser()
    add_slurm_arguments(parser)
    args = parser.parse_args(
        [
            "--local",
            "--nodes",
            str(nodes),
            "--gpus-per-node",
            str(gpus),
            "--time",
            "30",
            "--slurm-folder",
            str(tmp_path / "slurm"),
        ]
    )
    args.sbatch = {}
    return args


def _tasks(job):
    """The pids of the job's tasks: the children of submitit's local controller."""
    pid = job._process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _wait_for(predicate, job, timeout=400):
    end = time.time() + timeout
    while not predicate():
        assert job.state == "RUNNING", f"the job ended first: {job.stderr()}"
        assert time.time() < end, "timed out waiting"
        time.sleep(0.2)


def _text(path):
    return path.read_text() if path.exists() else ""


def test_preempted_job_saves_a_checkpoint_is_requeued_and_finishes_where_it_stopped(tmp_path):
    """A 2-process CPU training in a submitit job gets submitit's preemption signal mid-run (what
    SLURM sends before the time limit, or at preemption): it saves a checkpoint after the step
    under way, submitit requeues it, and the job started again resumes from that checkpoint and
    finishes at MAX_ITER with results.json. No periodic checkpoint falls in the run
    (CHECKPOINT_PERIOD 1000): the one it resumes from is the one saved on the signal."""
    out, max_iter = tmp_path / "run", 6
    ((job, _),) = submit(
        _local_args(tmp_path, nodes=1, gpus=2),
        [
            [
                *TINY,
                "SOLVER.MAX_ITER",
                str(max_iter),
                "SOLVER.CHECKPOINT_PERIOD",
                "1000",
                "OUTPUT_DIR",
                str(out),
            ]
        ],
        os.path.join(REPO, "train_net.py"),
    )
    _wait_for(lambda: "Starting training from iteration 0" in _text(out / "log.txt"), job)
    time.sleep(1)
    assert not (out / "results.json").exists()
    for pid in _tasks(job):  # what submitit's local controller sends near the time limit
        os.kill(pid, signal.SIGUSR2)
    record = job.result()

    assert record["iteration"] == max_iter and record["solver"]["max_iter"] == max_iter
    log = _text(out / "log.txt")
    saved = [n for n in os.listdir(out) if n.startswith("model_") and n != "model_final.pth"]
    assert len(saved) == 1, saved  # the checkpoint saved on the signal, and no other
    k = int(saved[0][len("model_") : -len(".pth")])
    assert 0 <= k < max_iter - 1  # mid-run
    assert f"Checkpoint {saved[0]} saved at iteration {k} on SIGUSR2" in log
    assert f"[Checkpointer] Loading from {out / saved[0]}" in log
    assert f"Starting training from iteration {k + 1}" in log  # not from 0
    stdout = job.stdout() + job.stderr()
    assert "Requeued job" in stdout and "checkpoint saved; requeued" in stdout
    assert [r["iteration"] for r in read_metrics(out)][-1] == max_iter - 1
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == max_iter - 1


def test_job_whose_rank_fails_fails_with_that_ranks_error(tmp_path):
    """Two machines (two tasks of the local executor, one process each, the distributed settings
    from submitit's environment): the process of machine 1 raises at iteration 3. Both tasks
    fail, each with that error, not with machine 0's broken connection that followed."""
    out = tmp_path / "run"
    start = time.time()
    ((job, _),) = submit(
        _local_args(tmp_path, nodes=2, gpus=1),
        [[*TINY, "SOLVER.MAX_ITER", "50", "OUTPUT_DIR", str(out)]],
        os.path.join(REPO, "tests", "failing_rank_train_net.py"),
    )
    with pytest.raises(
        submitit.core.utils.FailedJobError, match="injected fault on rank 1 at iteration 3"
    ):
        job.result()
    for task in range(2):
        message = str(job.task(task).exception())
        assert (
            "RuntimeError: machine 1 failed: RuntimeError: injected fault on rank 1 at iteration 3"
            in message
        )
    assert "--num-machines 2 --machine-rank 1 --dist-url tcp://" in job.task(1).stdout()
    assert not (out / "results.json").exists()
    assert time.time() - start < 240


def test_distributed_settings_come_from_the_slurm_environment(monkeypatch):
    """Task 1 of a 2-node job: machine rank 1 of 2, the first node of the allocation as master,
    the same port on both nodes (drawn from the job id); one node: detectron2's own free port."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_", "MASTER_"))]:
        monkeypatch.delenv(key)
    env = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = distributed_args(submitit.JobEnvironment(), 8)
    assert args[:6] == ["--num-gpus", "8", "--num-machines", "2", "--machine-rank", "1"]
    assert args[6] == "--dist-url" and args[7].startswith("tcp://gpu07:")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed_args(submitit.JobEnvironment(), 8)[5:] == ["0", "--dist-url", args[7]]
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert distributed_args(submitit.JobEnvironment(), 4) == [
        "--num-gpus",
        "4",
        "--dist-url",
        "auto",
    ]


def test_local_job_with_cuda_reported_present_gets_the_gpus(tmp_path, monkeypatch):
    """The local executor hides the GPUs it is not given (CUDA_VISIBLE_DEVICES): with CUDA it is
    given --gpus-per-node of them; without, none (each "GPU" is then a CPU process)."""
    from d2_focalstar.run.slurm import build_executor

    args = _local_args(tmp_path, nodes=1, gpus=2)
    assert build_executor(args, tmp_path / "s", 2, 6, "x").parameters["gpus_per_node"] == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert build_executor(args, tmp_path / "s", 2, 6, "x").parameters["gpus_per_node"] == 2


def test_failure_reason_is_the_one_line_error_else_the_last_exception():
    assert (
        failure_reason(["x", "train_net.py: error: SOLVER.BASE_LR=0: allowed > 0", ""])
        == "SOLVER.BASE_LR=0: allowed > 0"
    )
    trace = [
        "Traceback (most recent call last):",
        "torch.multiprocessing.spawn.ProcessRaisedException:",
        "-- Process 0 terminated with the following error:",
        "Traceback (most recent call last):",
        '  File "x.py", line 3, in f',
        "RuntimeError: injected fault",
        "  ",
    ]
    assert failure_reason(trace) == "RuntimeError: injected fault"


# ---- submitting: stand-ins for sbatch and srun -------------------------------------------------

FAKE_SBATCH = """\
    #!{python}
    # sbatch's checks of #SBATCH options, and its answers: an unknown option is refused with the
    # message sbatch gives; a known set is accepted with a job id
    import os, re, shutil, sys
    KNOWN = {{"account", "array", "constraint", "cpus-per-task", "error", "exclusive",
             "gpus-per-node", "job-name", "mem", "nodes", "ntasks-per-node", "open-mode", "output",
             "partition", "qos", "signal", "time", "wckey"}}
    script = sys.argv[-1]
    shutil.copy(script, os.environ["FAKE_SBATCH_COPY"])
    for line in open(script):
        m = re.match(r"#SBATCH --([\\w-]+)", line)
        if m and m.group(1) not in KNOWN:
            print(f"sbatch: unrecognized option '{{line[8:].strip()}}'", file=sys.stderr)
            print('Try "sbatch --help" for more information', file=sys.stderr)
            sys.exit(1)
    print("Submitted batch job 4242")
"""


@pytest.fixture
def scheduler(tmp_path):
    """PATH with stand-ins for sbatch and srun; the environment to run the tools with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(textwrap.dedent(FAKE_SBATCH.format(python=sys.executable)))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    return dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SBATCH_COPY=str(tmp_path / "submitted.sh"),
    )


def _tool(env, *args):
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    proc.output = proc.stdout + proc.stderr
    return proc


def test_submission_passes_every_scheduler_option_to_sbatch(tmp_path, scheduler):
    out = tmp_path / "run"
    proc = _tool(
        scheduler,
        "tools/submit_slurm.py",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--time",
        "1-12:00:00",
        "--account",
        "proj",
        "--qos",
        "high",
        "--exclusive",
        "--",
        *QUICKSTART,
        "SOLVER.IMS_PER_BATCH",
        "8",
        "OUTPUT_DIR",
        str(out),
    )
    assert proc.returncode == 0, proc.output[-3000:]
    assert f"submitted job 4242 to SLURM: 2 node(s) x 4 GPU(s), OUTPUT_DIR {out}" in proc.stdout
    script = (tmp_path / "submitted.sh").read_text()
    for line in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=2160",
        "--account=proj",
        "--qos=high",
        "--exclusive\n",
        "--signal=USR2@120",
        "--cpus-per-task=12",
    ):  # 4 GPUs x (2 loader workers + 1)
        assert f"#SBATCH {line}" in script, line
    assert "srun --unbuffered" in script
    # what the job will run: train_net.py with the training's arguments and an absolute OUTPUT_DIR
    job = submitit.helpers.DelayedSubmission.load(out / "slurm" / "4242_submitted.pkl").function
    assert job.output_dir == str(out) and job.gpus_per_node == 4
    assert job.train_args[:2] == QUICKSTART and job.script == os.path.join(REPO, "train_net.py")


def test_an_option_sbatch_does_not_know_is_passed_on_and_its_error_shown(tmp_path, scheduler):
    proc = _tool(
        scheduler,
        "tools/submit_slurm.py",
        "--gpus-per-node",
        "1",
        "--bogus-option=3",
        "--",
        *QUICKSTART,
        "OUTPUT_DIR",
        str(tmp_path / "run"),
    )
    assert_one_line_error(
        proc,
        "submit_slurm.py",
        "sbatch refused the job: sbatch: unrecognized option '--bogus-option=3'",
    )
    assert "#SBATCH --bogus-option=3" in (tmp_path / "submitted.sh").read_text()


def test_without_sbatch_or_submitit_it_says_so_in_one_line(tmp_path):
    no_slurm = dict(os.environ, PATH=str(tmp_path))  # no sbatch, no srun
    proc = _tool(no_slurm, "tools/submit_slurm.py", "--", *QUICKSTART)
    assert_one_line_error(proc, "submit_slurm.py", "no sbatch or srun on this machine", "--local")
    without = (
        "import runpy, sys; sys.modules['submitit'] = None; "
        "sys.argv = ['tools/submit_slurm.py', '--', "
        "'--config-file', 'configs/quickstart_flstar.yaml']; "
        "runpy.run_path('tools/submit_slurm.py', run_name='__main__')"
    )
    proc = _tool(dict(os.environ), "-c", without)
    assert_one_line_error(
        proc, "submit_slurm.py", "submitit is not installed: pip install submitit"
    )


def test_the_training_arguments_are_checked_before_anything_is_queued(tmp_path, scheduler):
    proc = _tool(
        scheduler,
        "tools/submit_slurm.py",
        "--nodes",
        "3",
        "--gpus-per-node",
        "1",
        "--",
        *QUICKSTART,
        "OUTPUT_DIR",
        str(tmp_path / "run"),
    )  # 8 images per batch over 3 processes
    assert_one_line_error(
        proc, "submit_slurm.py", "SOLVER.IMS_PER_BATCH=8: allowed a multiple of the 3 processes"
    )
    proc = _tool(scheduler, "tools/submit_slurm.py", "--", *QUICKSTART, "--num-gpus", "2")
    assert_one_line_error(
        proc, "submit_slurm.py", "--num-gpus in the training's arguments: the job sets it"
    )
    assert not (tmp_path / "submitted.sh").exists()


def test_sweep_submits_the_runs_not_done_as_one_job_array(tmp_path, scheduler):
    out = tmp_path / "sweep"
    done = out / "ce_s0"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    proc = _tool(
        scheduler,
        "tools/sweep.py",
        *QUICKSTART,
        "--loss-types",
        "CE",
        "FL",
        "FLSTAR",
        "--gammas",
        "0.25",
        "--num-gpus",
        "2",
        "--slurm",
        "--partition",
        "gpu",
        "--qos",
        "high",
        "--out",
        str(out),
        "--",
        "SOLVER.MAX_ITER",
        "100",
    )
    assert proc.returncode == 0, proc.output[-3000:]
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --qos=high" in script
    assert "#SBATCH --gpus-per-node=2" in script
    assert proc.stdout.count("submitted, job 4242_") == 2 and "ce_s0: done" in proc.stdout
    jobs = [
        submitit.helpers.DelayedSubmission.load(out / "slurm" / f"4242_{i}_submitted.pkl").function
        for i in range(2)
    ]
    assert sorted(os.path.basename(j.output_dir) for j in jobs) == sorted(
        line.split(": ")[0].split("] ")[1]
        for line in proc.stdout.splitlines()
        if "submitted, job" in line
    )
    for job in jobs:
        assert job.train_args[-2:] == ["SOLVER.MAX_ITER", "100"] and job.gpus_per_node == 2
    assert json.loads((done / "results.json").read_text()) == {}  # untouched


def test_sweep_refuses_scheduler_options_without_slurm(tmp_path):
    proc = run_here("tools/sweep.py", *QUICKSTART, "--qos", "high", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unrecognized arguments: --qos high" in proc.stderr


def test_sweep_slurm_local_waits_for_its_runs_and_they_finish(tmp_path):
    """sweep --slurm --local runs the array under the command and returns when the runs are done
    (it once named a function it had not imported and crashed after submitting)."""
    out = tmp_path / "sweep"
    proc = run_here(
        "tools/sweep.py",
        *QUICKSTART,
        "--loss-types",
        "CE",
        "--alphas",
        "0.75",
        "--seeds",
        "0",
        "--slurm",
        "--local",
        "--out",
        str(out),
        "--",
        *TINY[2:],
        "SOLVER.MAX_ITER",
        "2",
        "DATASETS.TEST",
        "()",
        "DATALOADER.NUM_WORKERS",
        "0",
    )
    assert proc.returncode == 0, proc.output[-3000:]
    (run,) = [p for p in out.iterdir() if p.is_dir() and p.name != "slurm"]
    assert (run / "results.json").is_file() and (run / "model_final.pth").is_file()
    assert f"[sweep 1/1] {run.name}: finished" in proc.stdout, proc.stdout[-2000:]


def test_a_local_job_in_a_folder_whose_training_diverged_says_so_and_trains_nothing(tmp_path):
    """A divergence is a result: a job (a requeue, a second submission) on its folder does not
    train it again, and says why in one line instead of crashing on the missing metrics."""
    from detectron2.config import get_cfg

    from d2_focalstar.config import add_focalstar_config
    from d2_focalstar.run.results import run_state, write_results

    out = tmp_path / "run"
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.OUTPUT_DIR = str(out)
    write_results(cfg, {}, 84, diverged="Loss became infinite or NaN at iteration=84!")
    proc = run_here(
        "tools/submit_slurm.py",
        "--local",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--time",
        "5",
        "--slurm-folder",
        str(tmp_path / "slurm"),
        "--",
        *QUICKSTART,
        "OUTPUT_DIR",
        str(out),
    )
    assert proc.returncode == 0, proc.output[-3000:]
    assert "holds a training that diverged at iteration 84 (Loss became infinite" in proc.stdout
    assert run_state(str(out)) == "diverged" and not list(out.glob("model_*.pth"))
