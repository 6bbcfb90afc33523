"""
Saved detections (COCO results: ``[{image_id, category_id, bbox, score}, ...]``, as .json or
.json.gz) read back for the intervals, and refused when they hold what no detector writes: a
NaN, infinite or negative score, a box that is not four finite numbers, a record without an
``image_id``. pycocotools would accept them and every interval computed from them would be
wrong without a word.
"""

import gzip
import json
import math
import zlib

__all__ = ["DetectionsError", "read_detections", "check_detection_categories"]


class DetectionsError(ValueError):
    """A detections file that cannot be used, naming the file and its first bad record."""


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(d):
    """What is wrong with one detection record, or None."""
    if not isinstance(d, dict):
        return f"a JSON {type(d).__name__}, not a detection"
    for key in ("image_id", "category_id"):
        if key not in d:
            return f"no {key!r}"
        if not isinstance(d[key], int) or isinstance(d[key], bool):
            return f"{key} {d[key]!r:.40} is not a whole number"
    score = d.get("score")
    if not _number(score) or not math.isfinite(score) or score < 0:
        return f"score {score!r:.40}: allowed a finite number >= 0"
    box = d.get("bbox")
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(_number(v) and math.isfinite(v) for v in box)
        and box[2] >= 0
        and box[3] >= 0
    ):
        return (
            f"bbox {box!r:.80}: allowed [x, y, width, height], finite numbers, "
            "width and height >= 0"
        )
    return None


def read_detections(path):
    """The detection records of a .json or .json.gz file, checked; DetectionsError naming the
    file (and the first bad record) otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        detections = json.loads(data.decode("utf-8"))
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DetectionsError(f"{path}: not a whole gzip file ({e or 'cut short'})") from None
    except RecursionError:
        raise DetectionsError(f"{path}: JSON nested too deep to be detections") from None
    except (ValueError, OSError) as e:  # not UTF-8, not JSON, unreadable
        raise DetectionsError(
            f"{path}: not a detections JSON file ({str(e).splitlines()[0][:120]})"
        ) from None
    if not isinstance(detections, list):
        raise DetectionsError(
            f"{path}: a JSON {type(detections).__name__}, where a list of detections "
            "(COCO results format) is expected"
        )
    for i, d in enumerate(detections):
        problem = _problem(d)
        if problem:
            raise DetectionsError(
                f"{path}: detection {i} ({json.dumps(d)[:120]}): {problem}; no detector "
                "writes this: not used"
            )
    return detections


def check_detection_categories(detections, gt, where):
    """DetectionsError when a detection's category_id is not one of the ground truth's."""
    known = {c["id"] for c in gt.get("categories", [])}
    for i, d in enumerate(detections):
        if d["category_id"] not in known:
            raise DetectionsError(
                f"{where}: detection {i} has category_id {d['category_id']}, which the ground "
                f"truth does not have (it has {', '.join(map(str, sorted(known))) or 'none'}): "
                "detections of another dataset?"
            )
