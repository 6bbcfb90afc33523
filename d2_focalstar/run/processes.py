"""
Processes: launching train_net.py's ``main`` in one process per GPU (detectron2's ``launch``) so
that none outlives the launcher and a one-line error in any of them stays one line; the kernel's
parent-death signal; stopping a process group. tools/sweep.py and the SLURM job use the last two.
"""

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time

from detectron2.engine import launch
from torch.multiprocessing import ProcessExitedException

__all__ = [
    "ProcessFailed",
    "launch_processes",
    "die_with_launcher",
    "die_with_parent",
    "stop_process_groups",
]


class ProcessFailed(RuntimeError):
    """A process that launch_processes started ended with an error; the message is its line."""


_LAUNCHER_PID = "D2_FOCALSTAR_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# opened here, not in die_with_parent: dlopen between fork and exec may deadlock
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent():
    """Have the kernel SIGKILL this process when its parent dies, however that dies (SIGKILL, the
    OOM killer). Linux only: elsewhere it does nothing and returns False. Safe between fork and
    exec (a ``preexec_fn``)."""
    if _LIBC is None:
        return False
    return _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def die_with_launcher():
    """Call it first in a process that launch_processes started (train_net.py imported as
    __mp_main__): it dies with the launching process, and if the launcher died before this ran,
    it exits now. torch's spawn later sets SIGINT as the parent-death signal, which a process
    blocked in C++ (a rendezvous, a collective) would never act on, so SIGINT ends these
    processes at once too: Ctrl-C stops every process without a traceback from each."""
    launcher = os.environ.get(_LAUNCHER_PID)
    if not launcher or not die_with_parent():
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.getppid() != int(launcher):  # orphaned already: the launcher is gone
        os._exit(1)
    os.environ[_LAUNCHER_PID] = str(os.getpid())  # for the processes this one spawns in turn


def stop_process_groups(procs, grace=20):
    """SIGTERM the process group of each of ``procs`` (Popens started with
    start_new_session=True: each process and all it started), SIGKILL those still there
    ``grace`` seconds later; returns when they have ended."""
    procs = list(procs)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


class _ProcessMain:
    """main(*args) in a process of launch(): an error of the types ``reported`` is written to
    <folder>/<local rank> for the launcher to report, and the process exits 1 without a
    traceback."""

    def __init__(self, main, folder, reported):
        self.main, self.folder, self.reported = main, folder, reported

    def __call__(self, *args):
        import detectron2.utils.comm as comm

        try:
            return self.main(*args)
        except self.reported as e:
            with open(os.path.join(self.folder, str(comm.get_local_rank())), "w") as f:
                f.write(str(e))
            sys.exit(1)


def launch_processes(main, args, cfg, reported=()):
    """detectron2's ``launch(main, args.num_gpus, ...)`` of ``main(cfg, args)``, with the
    launcher's pid in the environment for die_with_launcher. Every process gets the config
    checked here (it is not loaded again). With several processes, an error of the types
    ``reported`` in one of them becomes a ProcessFailed with its message here, and a process
    killed by a signal a ProcessFailed naming it; Ctrl-C here ends them all."""
    if args.num_gpus * args.num_machines == 1:  # main runs in this process
        return launch(main, 1, args=(cfg, args))
    os.environ[_LAUNCHER_PID] = str(os.getpid())
    # processes stopped because another one failed leave their data loaders' semaphores to the
    # resource tracker (shared with this process), whose warning about them would come after
    # the one-line error: the tracker, started with this interpreter's -W options, ignores it
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)
    with tempfile.TemporaryDirectory(prefix="d2_focalstar-errors-") as folder:
        try:
            launch(
                _ProcessMain(main, folder, tuple(reported)),
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(cfg, args),
            )
        except ProcessExitedException as e:
            if e.signal_name == "SIGINT":  # Ctrl-C reached them before it reached this process
                raise KeyboardInterrupt from None
            written = os.path.join(folder, str(e.error_index))
            if os.path.isfile(written):
                with open(written) as f:
                    raise ProcessFailed(f.read()) from None
            how = (
                f"was killed by {e.signal_name}"
                if e.signal_name
                else f"exited with status {e.exit_code}"
            )
            raise ProcessFailed(
                f"process {e.error_index} (pid {e.error_pid}) {how}"
                + (" (out of memory?)" if e.signal_name == "SIGKILL" else "")
                + "; the others were stopped"
            ) from None
        except KeyboardInterrupt:
            for child in multiprocessing.active_children():  # those still running, if any
                child.kill()
            raise
