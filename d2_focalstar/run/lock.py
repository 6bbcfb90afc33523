"""
One process at a time in a run folder: ``run_folder_lock`` holds an exclusive lock on
``<folder>/.lock`` (portalocker, which iopath already brings) while a command trains or evaluates
there. Two trainings in one OUTPUT_DIR would interleave log.txt and metrics.json and write two
event files. The operating system drops the lock when its process ends, however it ends, so a
killed run never blocks the next one; the file's text only says who holds it.
"""

import contextlib
import json
import os
import socket
import sys
import time

import portalocker

from ..config import ConfigError

__all__ = ["LOCK_FILE", "RunFolderBusy", "run_folder_lock"]

LOCK_FILE = ".lock"


class RunFolderBusy(ConfigError):
    """Another live process holds the folder's lock; reported in one line."""


def _holder(path):
    try:
        with open(path) as f:
            info = json.load(f)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["time"]))
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {started})"
    except (OSError, ValueError, KeyError, TypeError):  # written at this moment, or by someone else
        return "another process"


@contextlib.contextmanager
def run_folder_lock(folder, what="OUTPUT_DIR"):
    """Hold ``folder``'s lock (the folder is made if needed) for the ``with`` block; RunFolderBusy
    naming the process that holds it otherwise. ``what`` names the folder in the message."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    f = open(path, "a+")
    try:
        try:
            portalocker.lock(f, portalocker.LOCK_EX | portalocker.LOCK_NB)
        except portalocker.LockException:
            raise RunFolderBusy(
                f"{what} {folder} is in use by {_holder(path)}: wait until it ends, or "
                f"choose another {what}"
            ) from None
        f.seek(0)
        f.truncate()
        json.dump(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "time": time.time(),
                "command": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
            },
            f,
        )
        f.flush()
        try:
            yield
        finally:
            portalocker.unlock(f)
    finally:
        f.close()
