"""
Where a run's AP goes: finding objects or naming them. From a run's saved detections and its
ground truth:

- AP and AR@100 by category (COCO's), and class-agnostic (pycocotools' ``useCats = 0``: a box
  of the wrong category on an object still counts);
- ``found``: the share of objects with a detection of any category at IoU >= 0.5;
- ``named``: the share of objects whose highest-scoring detection at IoU >= 0.5 (of any
  category) names the object's category;
- detections per image and their score quantiles;
- with ``name_parts`` (categories named by parts, as the proxy's "red striped circle": colour,
  fill, shape): for each part, the share of objects whose best box names a category that differs
  in that part (an object counts under every part that differs).

Two losses with the same ``found`` and different ``named`` differ in classification, not in
localisation; low score quantiles show a loss that has not yet pushed its scores apart.
"""

import contextlib
import io
from collections import defaultdict
from typing import Any, Dict, List, Sequence

import numpy as np

__all__ = ["detection_diagnostics", "DIAGNOSTIC_COLUMNS"]

#: The keys of detection_diagnostics(), in table order.
DIAGNOSTIC_COLUMNS = (
    "AP",
    "AR100",
    "agnostic AP",
    "agnostic AR100",
    "found",
    "named",
    "dets/image",
    "score p50",
    "score p90",
    "score p99",
)


def _coco_stats(gt: Dict[str, Any], detections: List[Dict[str, Any]], use_cats: bool):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100 * max(ev.stats[0], 0.0), 100 * max(ev.stats[8], 0.0)  # AP, AR@100 (-1: none)


def detection_diagnostics(
    gt: Dict[str, Any],
    detections: List[Dict[str, Any]],
    iou: float = 0.5,
    name_parts: Sequence[str] = (),
) -> Dict[str, float]:
    """
    Args:
        gt: the ground truth, a COCO detection dict (images, annotations, categories).
        detections: a COCO results list (image_id, category_id, bbox XYWH, score), non-empty.
        iou: the IoU at which a detection is on an object, for ``found`` and ``named``.
        name_parts: labels of the space-separated words of every category name, in order.
    Returns:
        a dict with the keys of DIAGNOSTIC_COLUMNS, then "wrong <part>" for each name part; AP,
        AR and shares in percent. Crowd regions are not objects here. ValueError naming a
        category whose name does not have one word per part.
    """
    from pycocotools import mask as mask_utils

    if not detections:
        raise ValueError("no detections to diagnose")
    parts = {}
    if name_parts:
        for c in gt["categories"]:
            words = c["name"].split()
            if len(words) != len(name_parts):
                raise ValueError(
                    f"category {c['name']!r} is not {len(name_parts)} words "
                    f"({' '.join(name_parts)})"
                )
            parts[c["id"]] = words
    wrong = [0] * len(name_parts)
    ap, ar = _coco_stats(gt, detections, use_cats=True)
    agnostic_ap, agnostic_ar = _coco_stats(gt, detections, use_cats=False)

    by_image = defaultdict(list)
    for d in detections:
        by_image[d["image_id"]].append(d)
    objects = [a for a in gt["annotations"] if not a.get("iscrowd", 0)]
    found = named = 0
    objects_by_image = defaultdict(list)
    for a in objects:
        objects_by_image[a["image_id"]].append(a)
    for image_id, anns in objects_by_image.items():
        dets = by_image.get(image_id, [])
        if not dets:
            continue
        ious = mask_utils.iou(
            [d["bbox"] for d in dets], [a["bbox"] for a in anns], [0] * len(anns)
        )  # detections x objects
        scores = np.array([d["score"] for d in dets])
        for j, a in enumerate(anns):
            on = np.flatnonzero(np.asarray(ious)[:, j] >= iou)
            if on.size:
                found += 1
                best = on[np.argmax(scores[on])]
                named += dets[best]["category_id"] == a["category_id"]
                if parts:
                    said, true = parts[dets[best]["category_id"]], parts[a["category_id"]]
                    for k, (x, y) in enumerate(zip(said, true)):
                        wrong[k] += x != y
    scores = np.array([d["score"] for d in detections])
    n_obj = max(len(objects), 1)
    out = {
        "AP": ap,
        "AR100": ar,
        "agnostic AP": agnostic_ap,
        "agnostic AR100": agnostic_ar,
        "found": 100 * found / n_obj,
        "named": 100 * named / n_obj,
        "dets/image": len(detections) / max(len(gt["images"]), 1),
        "score p50": float(np.quantile(scores, 0.5)),
        "score p90": float(np.quantile(scores, 0.9)),
        "score p99": float(np.quantile(scores, 0.99)),
    }
    for part, n in zip(name_parts, wrong):
        out[f"wrong {part}"] = 100 * n / n_obj
    return out
