"""
A DetectionCheckpointer that never leaves a half-written file and never runs code from one.

- Saving writes to a temporary file in the same folder, fsyncs it and renames it into place; so
  does ``last_checkpoint``. A kill at any moment leaves the previous complete checkpoint and a
  ``last_checkpoint`` that names a complete file.
- A model whose weights are not finite is not saved: the last good checkpoint stays the last one.
- Loading never unpickles arbitrary objects: ``.pth`` files go through
  ``torch.load(weights_only=True)`` (tensors and plain containers only), and detectron2 / Caffe2
  model-zoo ``.pkl`` files through an unpickler that admits only numpy arrays and plain data.
"""
import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import Checkpointer

from .fileio import atomic_write

__all__ = ["SafeCheckpointer", "UnsafeCheckpointError", "CheckpointReadError",
           "IncompleteCheckpointError", "NonFiniteWeightsError", "check_checkpoint_file",
           "last_checkpoint"]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds Python objects that loading it would have to construct or call."""


class CheckpointReadError(RuntimeError):
    """A weights file is not a checkpoint at all, or a damaged or truncated one."""


def _first_line(e):
    """The exception's type and first sentence (torch's messages run on with advice)."""
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line.split('. ')[0][:160]}"


def _not_a_checkpoint(filename, e):
    return CheckpointReadError(
        f"{filename} cannot be read as a checkpoint: it is not a PyTorch (.pth) or model-zoo "
        f"(.pkl) file, or it is damaged or truncated ({_first_line(e)}).")


class IncompleteCheckpointError(CheckpointReadError):
    """A checkpoint that lacks some of the model's weights, where all are needed (evaluation)."""


class NonFiniteWeightsError(FloatingPointError):
    """The model's weights are NaN or infinite, so they are not saved."""


# What a model-zoo .pkl (a dict of numpy arrays, pickled by Python 2 or 3) may contain.
_PKL_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes
}


class _Forbidden(pickle.UnpicklingError):
    """A .pkl names a Python global outside _PKL_ALLOWED."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PKL_ALLOWED:
            return super().find_class(module, name)
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

    def require_all_weights(self):
        """Raise IncompleteCheckpointError unless the last load() set every weight of the model:
        evaluating ImageNet backbone weights (the 1x configs' MODEL.WEIGHTS) or a checkpoint for
        other classes would give a meaningless AP, not an error."""
        if not self.loaded_path:
            raise IncompleteCheckpointError("no checkpoint was loaded: the model has random weights")
        if self.missing_keys:
            total = len(self.model.state_dict())
            raise IncompleteCheckpointError(
                f"{self.loaded_path} is not a trained detector for this config: {len(self.missing_keys)} "
                f"of the model's {total} weight tensors are missing from it or have another shape "
                f"(e.g. {', '.join(self.missing_keys[:3])}). Evaluate a checkpoint of this model "
                f"(a training's model_final.pth, or a model-zoo RetinaNet with the same classes).")

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        bad = [k for k, v in self.model.state_dict().items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            last = self.get_checkpoint_file() if self.has_checkpoint() else None
            raise NonFiniteWeightsError(
                f"Not saving checkpoint {name!r}: {len(bad)} weight tensors are NaN/inf "
                f"(first: {bad[0]}). The last good checkpoint is {last or 'none'}.")
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(os.path.basename(path))

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
                        f"arrays and plain data, but {e}. Nothing in it was run.") from None
                except Exception as e:  # text, an image, a cut file: pickle raises many kinds
                    raise _not_a_checkpoint(filename, e) from None
            if not isinstance(data, dict):
                raise _not_a_checkpoint(filename, TypeError(f"it holds a {type(data).__name__}, not a dict"))
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
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message explains how to turn the check off; we name only what it found
            found = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
            if not found:  # not a pickle of anything: an image, a text file renamed .pth
                raise _not_a_checkpoint(f, e) from None
            raise UnsafeCheckpointError(
                f"Refusing to load {f}: it holds Python objects beyond tensors and plain "
                f"containers, which loading would construct or call "
                f"({found[0].replace('WeightsUnpickler error: ', '').split(' was not')[0]}). "
                f"Nothing in it was run.") from None
        except Exception as e:  # a truncated zip, an empty file, bytes that are not a pickle
            raise _not_a_checkpoint(f, e) from None


def check_checkpoint_file(path):
    """Read ``path`` as SafeCheckpointer.load() would, without a model: raise
    UnsafeCheckpointError or CheckpointReadError for a file that load() would refuse."""
    checkpointer = SafeCheckpointer(torch.nn.Module())
    if path.endswith((".pkl", ".pyth")):
        checkpointer._load_file(path)
    else:  # what DetectionCheckpointer._load_file does for a .pth, outside load()
        checkpointer._torch_load(path)


def last_checkpoint(folder):
    """The path of the checkpoint that ``folder``/last_checkpoint names (fvcore's checkpointer
    reads it), whether or not that file exists; None without a last_checkpoint."""
    checkpointer = Checkpointer(torch.nn.Module(), save_dir=folder)
    return checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
