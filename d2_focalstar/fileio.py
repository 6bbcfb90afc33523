"""
Writing files so that a crash, a kill or a power loss leaves the old file or the new one, whole.
"""

import json
import logging
import math
import os
import re
import tempfile

__all__ = ["atomic_write", "write_json", "remove_partial_writes", "usual_mode"]

logger = logging.getLogger(__name__)


def _umask():
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


_UMASK = _umask()


def usual_mode(directory=False):
    """The permissions open() or mkdir() would give a new file or folder under the umask
    (mkstemp's and mkdtemp's are owner-only)."""
    return (0o777 if directory else 0o666) & ~_UMASK


# what atomic_write leaves behind when killed before its rename: .<name>.<mkstemp's 8>.tmp
_PARTIAL = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_partial_writes(folder):
    """Remove the temporary files of atomic_write calls that were killed before their rename (a
    SIGKILL while saving a checkpoint: tens of MB each). Call it where no other run writes into
    ``folder`` at the same time. Returns the names removed."""
    try:
        names = [n for n in os.listdir(folder) if _PARTIAL.fullmatch(n)]
    except OSError:  # no folder yet
        return []
    size = 0
    for name in names:
        path = os.path.join(folder, name)
        try:
            size += os.path.getsize(path)
            os.remove(path)
        except OSError:
            pass
    if names:
        logger.info(
            f"Removed {len(names)} partial file(s) of an interrupted save from {folder} "
            f"({size / 2**20:.1f} MiB): {', '.join(sorted(names)[:5])}"
        )
    return names


def atomic_write(path, write):
    """Call write(file) on a temporary file beside ``path``, fsync it, rename it to ``path`` and
    fsync the folder, so that after a crash or power loss ``path`` is the old file or the new
    one, whole. ``path`` gets the permissions a plain open() would give (mkstemp's are
    owner-only)."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), usual_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # the rename itself reaches the disk with the folder's entry
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for this (some network file systems)
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _finite_or_null(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_json(path, record, indent=2):
    """``atomic_write`` of ``record`` as strict JSON: a value that is not a finite number (COCO's
    APs for a dataset with no small objects, a miss rate with no ground truth) is written as
    ``null``, which every JSON reader accepts, instead of Python's bare ``NaN``, which jq,
    JavaScript and other strict readers refuse."""
    data = json.dumps(_finite_or_null(record), indent=indent, allow_nan=False).encode()
    atomic_write(path, lambda f: f.write(data))
