"""
A training DatasetMapper that survives bad images and boxes, the way detectron2 treats them:

| fault | what happens |
| --- | --- |
| image missing, unreadable, truncated, sized unlike the JSON | skipped (the loader takes another) |
| 16-bit image | skipped: detectron2's reader would clip it to white; convert it to 8 bits |
| grayscale or RGBA image | read as RGB (gray replicated, alpha dropped) |
| box of zero or negative size | removed (detectron2 would flip a negative one into a valid one) |
| box outside the image | clipped to the image (detectron2's transform_instance_annotations) |
| image without annotations | removed before training (DATALOADER.FILTER_EMPTY_ANNOTATIONS) |

Each kind is warned about once per process; every occurrence is appended to a JSON-lines fault
log (one line per image and kind), which :func:`summarize_data_faults` counts at the end.

For evaluation (``is_train=False``) an image that training would skip raises
:class:`EvaluationImageError` naming it instead: evaluating without it would change the AP.
"""

import json
import logging
import os

from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode
from PIL import Image

__all__ = ["CheckedDatasetMapper", "EvaluationImageError", "summarize_data_faults"]

logger = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class EvaluationImageError(RuntimeError):
    """A test image that cannot be evaluated; the message names it."""

    def __init__(self, message):
        # raised in a DataLoader worker, torch re-raises it with the worker's traceback as the
        # message: keep its last line, ours
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def _check_boxes(dataset_dict):
    """(annotations to keep, [(kind, detail)]): boxes of zero or negative size are dropped here,
    since detectron2 would turn a negative-size box into a flipped, positive one."""
    w, h = dataset_dict.get("width"), dataset_dict.get("height")
    keep, faults = [], []
    for ann in dataset_dict.get("annotations", []):
        x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
        if x1 <= x0 or y1 <= y0:
            faults.append(("box of zero or negative size (removed)", f"bbox {ann['bbox']}"))
            continue
        if w and h and (x0 < 0 or y0 < 0 or x1 > w or y1 > h):
            faults.append(("box outside the image (clipped)", f"bbox {ann['bbox']} in {w}x{h}"))
        keep.append(ann)
    return keep, faults


class CheckedDatasetMapper(DatasetMapper):
    def __init__(self, cfg, is_train=True, fault_log=None):
        """fault_log: path of the JSON-lines file that records every fault (None: not recorded)."""
        super().__init__(cfg, is_train)
        self.fault_log = fault_log
        self._warned = set()

    def _report(self, kind, file_name, detail):
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(
                f"Data fault: {kind}: {file_name} ({detail}). Further faults of this "
                f"kind are counted in {self.fault_log or 'no log'}, not printed."
            )
        if self.fault_log:
            line = json.dumps({"kind": kind, "file": file_name, "detail": detail}) + "\n"
            # one write() with O_APPEND: lines from several loader workers do not interleave
            fd = os.open(self.fault_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def _skip(self, kind, file_name, detail):
        """None (the loader takes another image) in training; an EvaluationImageError in
        evaluation."""
        if not self.is_train:
            kind = kind.replace(" (skipped)", "").replace("skipped; ", "")
            raise EvaluationImageError(
                f"test image {file_name}: {kind} ({detail}); evaluating without it would change "
                f"the AP: repair or replace the file, or remove its entry from the dataset's JSON"
            )
        return self._report(kind, file_name, detail)

    def __call__(self, dataset_dict):
        """The mapped dict, or None for a skipped image (detectron2's MapDataset then takes
        another one)."""
        file_name = dataset_dict["file_name"]
        try:
            with Image.open(file_name) as im:  # reads the header only
                mode = im.mode
        except FileNotFoundError:
            return self._skip("image missing (skipped)", file_name, "no such file")
        except OSError as e:
            return self._skip("image unreadable (skipped)", file_name, str(e))
        if mode in SIXTEEN_BIT_MODES:
            return self._skip(
                "16-bit image (skipped; convert it to 8 bits)", file_name, f"PIL mode {mode}"
            )
        if mode in ("L", "LA", "P", "RGBA", "CMYK"):
            self._report(
                "grayscale, palette, RGBA or CMYK image (read as RGB)",
                file_name,
                f"PIL mode {mode}",
            )
        if "annotations" in dataset_dict:
            annotations, faults = _check_boxes(dataset_dict)
            for kind, detail in faults:
                self._report(kind, file_name, detail)
            dataset_dict = dict(dataset_dict, annotations=annotations)
        try:
            return super().__call__(dataset_dict)
        except OSError as e:  # PIL: "image file is truncated", a decoder error
            return self._skip("image truncated or corrupt (skipped)", file_name, str(e))
        except ValueError as e:  # detectron2's SizeMismatchError and friends
            return self._skip("image does not match its annotations (skipped)", file_name, str(e))


def summarize_data_faults(fault_log):
    """{kind: number of distinct images} from a fault log; logs one line per kind."""
    if not fault_log or not os.path.isfile(fault_log):
        return {}
    files = {}
    with open(fault_log) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            files.setdefault(rec["kind"], set()).add(rec["file"])
    counts = {kind: len(v) for kind, v in sorted(files.items())}
    for kind, n in counts.items():
        logger.warning(f"Data faults during training: {kind}: {n} image(s); see {fault_log}")
    return counts
