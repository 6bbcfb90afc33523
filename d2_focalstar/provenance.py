"""Which code, libraries and CPU produced a record (results.json): the project's version, the git
commit of the checkout it runs from (and whether that tree had uncommitted changes), the torch,
detectron2 and CUDA versions, and the CPU's architecture, instruction set and torch's thread
count (a CPU training repeats only on the same ones). Readers accept records without it."""

import os
import platform
import subprocess

from . import __version__

__all__ = ["SCHEMA_VERSION", "provenance", "add_provenance", "git_state"]

#: The layout of results.json. 2: with "provenance"; records without "schema_version" are 1.
SCHEMA_VERSION = 2

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _git(args, cwd):
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(path=_PACKAGE_DIR):
    """{"commit": sha, "dirty": bool} of the git checkout that holds ``path`` (the package, for an
    editable install or a run from the repository), or None: no checkout (an installed wheel), no
    git, or git failing. "dirty": tracked files differ from the commit."""
    try:
        top = _git(["rev-parse", "--show-toplevel"], path)
        if not top or not os.path.isfile(os.path.join(top, "d2_focalstar", "__init__.py")):
            return None  # another project's checkout around a site-packages copy
        commit = _git(["rev-parse", "HEAD"], top)
        status = _git(["status", "--porcelain", "--untracked-files=no"], top)
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


def provenance():
    """The versions behind a record, as plain JSON data."""
    import detectron2
    import torch

    return {
        "d2_focalstar": __version__,
        "git": git_state(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA torch was built with; None for a CPU build
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
        # a CPU training is deterministic only at one thread count and one instruction set: the
        # same config and seed gave another trunk on an AVX2 machine (docs/RESULTS.md)
        "cpu": {
            "machine": platform.machine(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        },
    }


def add_provenance(record):
    """Adds "schema_version" and "provenance" to a record (a dict) about to be written."""
    record["schema_version"] = SCHEMA_VERSION
    record["provenance"] = provenance()
    return record
