"""
A DetectionCheckpointer that never leaves a half-written file and never runs code from one.

- Saving writes to a temporary file in the same folder, fsyncs it and renames it into place; so
  does ``last_checkpoint``. A kill at any moment leaves the previous complete checkpoint and a
  ``last_checkpoint`` that names a complete file.
- A model whose weights are not finite is not saved: the last good checkpoint stays the last one.
- Loading never unpickles arbitrary objects: ``.pth`` files go through
  ``torch.load(weights_only=True)`` (tensors and plain containers only), and detectron2 / Caffe2
  model-zoo ``.pkl`` files through an unpickler that admits only numpy arrays and plain data.
- A folder whose ``last_checkpoint`` was never written (a kill right after the first checkpoint)
  resumes from its newest complete checkpoint.
"""

import errno
import logging
import os
import pickle
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ..fileio import atomic_write

__all__ = [
    "SafeCheckpointer",
    "UnsafeCheckpointError",
    "CheckpointReadError",
    "IncompleteCheckpointError",
    "NonFiniteCheckpointError",
    "NonFiniteWeightsError",
    "check_checkpoint_file",
    "last_checkpoint",
]

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds Python objects that loading it would have to construct or call."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (disk full, a file-size limit); nothing complete
    was lost: the message names the last complete checkpoint."""


class CheckpointReadError(RuntimeError):
    """A weights file is not a checkpoint at all, or a damaged or truncated one."""


def _write_failure(path, e, last):
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None and not isinstance(e, OSError):
        raise e  # not a failed write
    cause = cause or e
    code = errno.errorcode.get(cause.errno, cause.errno) if cause.errno else "no errno"
    return (
        f"cannot write checkpoint {path}: {cause.strerror or cause} ({code}); "
        "nothing complete was lost: "
        f"the last complete checkpoint is {last or 'none yet'}. "
        "Free disk space (or raise the file-size "
        "limit, ulimit -f) and continue with --resume"
    )


def _first_line(e):
    """The exception's type and first sentence (torch's messages run on with advice)."""
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line.split('. ')[0][:160]}"


def _not_a_checkpoint(filename, e):
    return CheckpointReadError(
        f"{filename} cannot be read as a checkpoint: it is not a PyTorch (.pth) or model-zoo "
        f"(.pkl) file, or it is damaged or truncated ({_first_line(e)})."
    )


class IncompleteCheckpointError(CheckpointReadError):
    """A checkpoint that lacks some of the model's weights, where all are needed (evaluation)."""


class NonFiniteCheckpointError(CheckpointReadError):
    """A checkpoint whose weights hold NaN or inf: evaluating it would detect nothing."""


class NonFiniteWeightsError(FloatingPointError):
    """The model's weights are NaN or infinite, so they are not saved."""


def _non_finite(state_dict):
    """The names of the floating-point tensors of ``state_dict`` that hold NaN or inf."""
    return [
        k
        for k, v in state_dict.items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]


# What a model-zoo .pkl (a dict of numpy arrays, pickled by Python 2 or 3, numpy 1 or 2, any
# pickle protocol) may contain: the functions that rebuild an array or a scalar from its bytes,
# dtype and shape, and plain containers. Nothing here runs code or imports a module by name;
# numpy 2's dtype classes (numpy.dtypes.*) and object arrays are not needed for weights.
_PKL_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),  # numpy 1, protocols 0-4
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.multiarray", "_reconstruct"),  # numpy 2
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocols 0-2 store bytes
}


def _empty_bytes():
    return b""


# ... and empty bytes (an array of size 0): bytes() without arguments, all a pickle needs of it
_PKL_STAND_INS = {("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}

# torch.load(weights_only=True)'s messages for a file that names a Python global or object it
# will not build: its "Unsupported global: GLOBAL m.f was not an allowed global", and "Trying to
# load unsupported GLOBAL posix.system whose module posix is blocked" for os, subprocess, ...
_TORCH_REFUSALS = (
    "Unsupported global",
    "unsupported GLOBAL",
    "Trying to call reduce",
    "Can only create new object",
    "Can only build",
)

#: The checkpoints a training writes (detectron2's PeriodicCheckpointer names).
_CHECKPOINT_NAME = re.compile(r"model_(\d{7}|final)\.pth")
_warned = set()


class _Forbidden(pickle.UnpicklingError):
    """A .pkl names a Python global outside _PKL_ALLOWED."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PKL_ALLOWED:
            return super().find_class(module, name)
        if (module, name) in _PKL_STAND_INS:
            return _PKL_STAND_INS[module, name]
        raise _Forbidden(f"global '{module}.{name}' is not allowed")


class SafeCheckpointer(DetectionCheckpointer):
    loaded_path = None  # the last file load() read, and the model weights it did not have
    missing_keys = ()

    def load(self, path, *args, **kwargs):
        self.loaded_path, self.missing_keys = path, ()
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        # weights the file lacks, and those of another shape (left out of the load, so missing)
        self.missing_keys = tuple(incompatible.missing_keys) if incompatible is not None else ()
        return incompatible

    def require_finite_weights(self):
        """Raise NonFiniteCheckpointError if the weights the last load() gave the model hold NaN or
        inf (a checkpoint from after a divergence, written by other code): every score would be
        NaN, every AP empty."""
        bad = _non_finite(self.model.state_dict())
        if bad:
            raise NonFiniteCheckpointError(
                f"{self.loaded_path or 'the model'} holds weights that are not finite: "
                f"{len(bad)} of "
                f"the model's weight tensors have NaN/inf values (first: {bad[0]}), so it would "
                f"detect nothing. Use a checkpoint from before the training diverged (this "
                f"project's training never saves such weights)."
            )

    def require_all_weights(self):
        """Raise IncompleteCheckpointError unless the last load() set every weight of the model:
        evaluating ImageNet backbone weights (the 1x configs' MODEL.WEIGHTS) or a checkpoint for
        other classes would give a meaningless AP, not an error."""
        if not self.loaded_path:
            raise IncompleteCheckpointError(
                "no checkpoint was loaded: the model has random weights"
            )
        if self.missing_keys:
            total = len(self.model.state_dict())
            raise IncompleteCheckpointError(
                f"{self.loaded_path} is not a trained detector for this config: "
                f"{len(self.missing_keys)} "
                f"of the model's {total} weight tensors are missing from it or have another shape "
                f"(e.g. {', '.join(self.missing_keys[:3])}). Evaluate a checkpoint of this model "
                f"(a training's model_final.pth, or a model-zoo RetinaNet with the same classes)."
            )

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        bad = _non_finite(self.model.state_dict())
        if bad:
            last = self.get_checkpoint_file() if self.has_checkpoint() else None
            raise NonFiniteWeightsError(
                f"Not saving checkpoint {name!r}: {len(bad)} weight tensors are NaN/inf "
                f"(first: {bad[0]}). The last good checkpoint is {last or 'none'}."
            )
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        last = self.get_checkpoint_file() if self.has_checkpoint() else None
        try:
            atomic_write(path, lambda f: torch.save(data, f))
            self.tag_last_checkpoint(os.path.basename(path))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            raise CheckpointWriteError(_write_failure(path, e, last)) from None

    def _newest_checkpoint(self):
        """The newest of save_dir's model_*.pth (each is written whole, then renamed into place),
        or None."""
        try:
            names = [n for n in os.listdir(self.save_dir) if _CHECKPOINT_NAME.fullmatch(n)]
        except (OSError, TypeError):  # no folder (yet), or no save_dir
            return None
        paths = [os.path.join(self.save_dir, n) for n in names]
        return max(paths, key=lambda p: (os.path.getmtime(p), p)) if paths else None

    def has_checkpoint(self):
        # a kill between the first checkpoint's rename and the first last_checkpoint write
        # leaves a folder without last_checkpoint: resume from its newest complete checkpoint
        return super().has_checkpoint() or (
            bool(self.save_dir) and self._newest_checkpoint() is not None
        )

    def get_checkpoint_file(self):
        if super().has_checkpoint() or not self.save_dir:
            return super().get_checkpoint_file()
        newest = self._newest_checkpoint()
        if newest and newest not in _warned:  # once per process
            _warned.add(newest)
            logger.warning(
                f"{self.save_dir} has no last_checkpoint (the run was stopped before "
                f"writing it): using its newest complete checkpoint, {newest}"
            )
        return newest or ""

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename):
        if filename.endswith(".pyth"):
            raise UnsafeCheckpointError(f"{filename}: pycls .pyth checkpoints are not supported")
        if filename.endswith(".pkl"):
            with PathManager.open(filename, "rb") as f:
                try:
                    data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
                except _Forbidden as e:
                    raise UnsafeCheckpointError(
                        f"Refusing to load {filename}: a .pkl checkpoint may hold only numpy "
                        f"arrays and plain data, but {e}. Nothing in it was run."
                    ) from None
                except Exception as e:  # text, an image, a cut file: pickle raises many kinds
                    raise _not_a_checkpoint(filename, e) from None
            if not isinstance(data, dict):
                raise _not_a_checkpoint(
                    filename, TypeError(f"it holds a {type(data).__name__}, not a dict")
                )
            return self._from_model_zoo_dict(data)
        return super()._load_file(filename)

    def _from_model_zoo_dict(self, data):
        # What DetectionCheckpointer._load_file does with an unpickled .pkl, on safe data.
        if "model" in data and "__author__" in data:
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        if "blobs" in data:
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f):
        try:
            loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message explains how to turn the check off; we name only what it found
            found = [
                line.strip()
                for line in str(e).splitlines()
                if any(refusal in line for refusal in _TORCH_REFUSALS)
            ]
            if not found:  # not a pickle of anything: an image, a text file renamed .pth
                raise _not_a_checkpoint(f, e) from None
            name = re.search(r"GLOBAL (\S+?)\.?(?:\s|$)", found[0])
            what = (
                f"Unsupported global {name.group(1)}"
                + (", from a blocked module" if "blocked" in found[0] else "")
                if name
                else found[0].replace("WeightsUnpickler error: ", "")[:160]
            )
            raise UnsafeCheckpointError(
                f"Refusing to load {f}: it holds Python objects beyond tensors and plain "
                f"containers, which loading would construct or call ({what}). "
                f"Nothing in it was run."
            ) from None
        except Exception as e:  # a truncated zip, an empty file, bytes that are not a pickle
            raise _not_a_checkpoint(f, e) from None
        # torch.save(torch.zeros(5), f): a tensor, no weights by name
        if not isinstance(loaded, dict):
            raise _not_a_checkpoint(
                f, TypeError(f"it holds a {type(loaded).__name__}, not a dict of weights by name")
            )
        return loaded


def check_checkpoint_file(path):
    """Read ``path`` as SafeCheckpointer.load() would, without a model, and return what it holds:
    raise UnsafeCheckpointError or CheckpointReadError for a file that load() would refuse."""
    checkpointer = SafeCheckpointer(torch.nn.Module())
    if path.endswith((".pkl", ".pyth")):
        return checkpointer._load_file(path)
    # what DetectionCheckpointer._load_file does for a .pth, outside load()
    return checkpointer._torch_load(path)


def last_checkpoint(folder):
    """The path of the checkpoint that ``folder``/last_checkpoint names (fvcore's checkpointer
    reads it), whether or not that file exists; without a last_checkpoint, the folder's newest
    complete checkpoint; None without either."""
    checkpointer = SafeCheckpointer(torch.nn.Module(), save_dir=folder)
    return checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
