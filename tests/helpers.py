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
