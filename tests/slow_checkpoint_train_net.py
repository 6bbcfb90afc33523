"""train_net.py whose second checkpoint write stalls half-way (after touching $SLOW_SAVE_MARKER),
so that a test can SIGKILL the process in the middle of writing a checkpoint; with
SLOW_SAVE_WHICH=last_checkpoint, the first write of last_checkpoint stalls instead."""

import io
import os
import runpy
import sys
import time

import torch

_real_save, _saves = torch.save, []


def _slow_save(obj, f, *args, **kwargs):
    _saves.append(1)
    if len(_saves) != 2 or not hasattr(f, "write"):
        return _real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    _real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    open(os.environ["SLOW_SAVE_MARKER"], "w").close()
    time.sleep(600)


def _slow_tag(path, write):
    if not path.endswith("last_checkpoint") or _saves:
        return _real_atomic_write(path, write)
    _saves.append(1)

    def half(f):
        f.write(b"model_")
        f.flush()
        open(os.environ["SLOW_SAVE_MARKER"], "w").close()
        time.sleep(600)

    return _real_atomic_write(path, half)


if os.environ.get("SLOW_SAVE_WHICH") == "last_checkpoint":
    import d2_focalstar.run.checkpoint

    _real_atomic_write = d2_focalstar.run.checkpoint.atomic_write
    d2_focalstar.run.checkpoint.atomic_write = _slow_tag
else:
    torch.save = _slow_save
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.argv[0] = "train_net.py"
runpy.run_path("train_net.py", run_name="__main__")
