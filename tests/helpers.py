"""Shared by the end-to-end tests: run train_net.py, build small broken datasets."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = ["--config-file", "configs/quickstart_flstar.yaml"]
# A few seconds of CPU training: small batches, frequent checkpoints, no evaluation.
FAST = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TEST", "()"]


def run(script, *args, timeout=600, check=None):
    """Run a script of the repo (or tests/) with the venv's Python; returns CompletedProcess."""
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    if check is not None:
        assert (proc.returncode == 0) == check, proc.output[-5000:]
    return proc


def assert_one_line_error(proc, program, *needles):
    """The process failed with one line, '<program>: error: ...' holding every needle, and no
    traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.output, proc.output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error: "), proc.output[-2000:]
    for needle in needles:
        assert needle in last, last
