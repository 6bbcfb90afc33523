"""
Safety metrics for safety-critical classes, computed beside COCO AP.

For each class, detections are matched to ground truth at one IoU threshold, and two numbers are
read off the curve of miss rate against false positives per image (FPPI):

* LAMR, the log-average miss rate over FPPI in [1e-2, 1e0], the pedestrian detection standard
  (Dollar et al., "Pedestrian Detection: An Evaluation of the State of the Art", TPAMI 2012);
* the recall at a fixed budget of false positives per image.

Both are in percent; LAMR is lower-is-better. The functions are numpy-only; ``SafetyEvaluator``
is a detectron2 ``DatasetEvaluator`` that reports them under the task ``"safety"``.

Which ground truth counts is the setup (``TEST.SAFETY.SETUP``, the table ``SAFETY_SETUPS``):
``all``, this project's, counts every box of the class (crowd boxes ignored) at
``TEST.SAFETY.IOU_THRESHOLD``; ``reasonable`` and its siblings are the CityPersons protocols
(Zhang et al., CVPR 2017, the evaluation script of its repository): ground truth outside a height
and visibility range, or flagged ``ignore``, is ignored, detections shorter than the range's
lower bound / 1.25 are dropped, at most 1,000 detections per image, and the mean of the log miss
rate over the script's 9 FPPI points, where a zero miss rate makes the mean zero as there.
"""

import itertools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from tabulate import tabulate

from ..fileio import write_json

__all__ = [
    "match_detections",
    "miss_rate_fppi_curve",
    "log_average_miss_rate",
    "recall_at_fppi",
    "SafetySetup",
    "SAFETY_SETUPS",
    "class_miss_rate_curve",
    "SafetyEvaluator",
    "build_safety_evaluator",
]

logger = logging.getLogger(__name__)

#: The FPPI reference points of the log-average miss rate: 9 points evenly spaced in log space.
LAMR_FPPI_POINTS = 10 ** np.linspace(-2, 0, 9)
#: The same points as the CityPersons evaluation script writes them, to 4 decimals.
CITYPERSONS_FPPI_POINTS = np.array(
    [0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.0000]
)
_UNBOUNDED = float("inf")


@dataclass(frozen=True)
class SafetySetup:
    """
    Which ground truth and detections a miss rate counts, and how its curve is averaged.

    Attributes:
        protocol: the published protocol it reproduces, in words (for logs and docs).
        height: (low, high) pixels, or None: ground truth whose box height is outside is
            ignored, and detections shorter than low / 1.25 or at least high * 1.25 are dropped.
        visibility: (low, high), or None: ground truth whose annotation ``vis_ratio`` (1.0 where
            an annotation has none) is outside is ignored.
        use_ignore_flag: ground truth whose annotation has ``ignore`` set is ignored.
        max_detections: the highest-scoring detections kept per image and class, or None.
        fppi_points: the FPPI reference points of the log-average.
        miss_rate_floor: the least miss rate the log-average takes at a point: 1e-10 (Caltech's
            MATLAB code) or 0.0 (CityPersons' script: one point at 0 makes the mean 0).
    """

    protocol: str
    height: Optional[Tuple[float, float]] = None
    visibility: Optional[Tuple[float, float]] = None
    use_ignore_flag: bool = False
    max_detections: Optional[int] = None
    fppi_points: Tuple[float, ...] = tuple(LAMR_FPPI_POINTS)
    miss_rate_floor: float = 1e-10


def _citypersons(name, height, visibility):
    return SafetySetup(
        protocol=f"CityPersons '{name}' (height {height[0]:g}-{height[1]:g} px, visibility "
        f"{visibility[0]:g}-{visibility[1]:g}, IoU 0.5, its evaluation script)",
        height=height,
        visibility=visibility,
        use_ignore_flag=True,
        max_detections=1000,
        fppi_points=tuple(CITYPERSONS_FPPI_POINTS),
        miss_rate_floor=0.0,
    )


#: TEST.SAFETY.SETUP -> its setup. The CityPersons ones match the script's setups 0-3 (tested on
#: tests/data/citypersons within 0.01 points).
SAFETY_SETUPS: Dict[str, SafetySetup] = OrderedDict(
    [
        (
            "all",
            SafetySetup(protocol="every box of the class, crowd boxes ignored (this project's)"),
        ),
        ("reasonable", _citypersons("Reasonable", (50, _UNBOUNDED), (0.65, _UNBOUNDED))),
        ("reasonable_small", _citypersons("Reasonable_small", (50, 75), (0.65, _UNBOUNDED))),
        ("heavy_occlusion", _citypersons("Reasonable_occ=heavy", (50, _UNBOUNDED), (0.2, 0.65))),
        ("citypersons_all", _citypersons("All", (20, _UNBOUNDED), (0.2, _UNBOUNDED))),
    ]
)


def match_detections(det_boxes, det_scores, gt_boxes, gt_ignore, iou_threshold=0.5):
    """
    Match the detections of one class in one image to its ground truth, greedily by descending
    score: each detection takes the unmatched, non-ignored ground truth of highest IoU at or above
    ``iou_threshold`` (a true positive). One that takes none but covers an ignored (crowd) box at
    or above the threshold is dropped, being neither true nor false; any other is a false
    positive. As in COCO, overlap with a crowd box is intersection over the detection's area.

    Args:
        det_boxes (ndarray): (N, 4) detection boxes, XYXY absolute.
        det_scores (ndarray): (N,) detection scores.
        gt_boxes (ndarray): (M, 4) ground-truth boxes, XYXY absolute.
        gt_ignore (ndarray): (M,) bool, True for ground truth to ignore (iscrowd).
        iou_threshold (float): least IoU of a match.

    Returns:
        scores (ndarray): (K,) float64 scores of the K <= N kept detections, descending.
        is_tp (ndarray): (K,) bool, True for a true positive.
        num_gt (int): number of non-ignored ground-truth boxes.
    """
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_ignore = np.asarray(gt_ignore, dtype=bool).reshape(-1)
    order = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable")
    scores = np.asarray(det_scores, dtype=np.float64)[order]
    num_gt = int((~gt_ignore).sum())
    if len(gt_boxes) == 0:
        return scores, np.zeros(len(scores), dtype=bool), num_gt
    # pycocotools returns a bare list, not an (N, M) array, when there are no detections.
    ious = np.asarray(
        mask_util.iou(
            BoxMode.convert(det_boxes[order], BoxMode.XYXY_ABS, BoxMode.XYWH_ABS),
            BoxMode.convert(gt_boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS),
            gt_ignore.astype(np.uint8),
        )
    ).reshape(len(order), len(gt_boxes))
    matched = np.zeros(len(gt_boxes), dtype=bool)
    keep = np.ones(len(order), dtype=bool)
    is_tp = np.zeros(len(order), dtype=bool)
    for i, iou in enumerate(ious):
        candidates = np.where(~gt_ignore & ~matched & (iou >= iou_threshold), iou, -1.0)
        if candidates.max() >= 0:
            matched[candidates.argmax()] = is_tp[i] = True
        elif (gt_ignore & (iou >= iou_threshold)).any():
            keep[i] = False
    return scores[keep], is_tp[keep], num_gt


def miss_rate_fppi_curve(scores, is_tp, num_gt, num_images):
    """
    The miss rate against FPPI curve of a class, one point per detection, by descending score.

    Args:
        scores (ndarray): (K,) scores of the kept detections over all images.
        is_tp (ndarray): (K,) bool, True for a true positive.
        num_gt (int): number of non-ignored ground-truth boxes over all images.
        num_images (int): number of images evaluated, with or without detections.

    Returns:
        miss_rate (ndarray): (K,) 1 - recall after each detection; NaN if num_gt == 0.
        fppi (ndarray): (K,) false positives per image after each detection.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(is_tp, dtype=bool)[order]
    cum_tp, cum_fp = np.cumsum(tp), np.cumsum(~tp)
    recall = cum_tp / num_gt if num_gt > 0 else np.full(len(tp), np.nan)
    return 1.0 - recall, cum_fp / max(num_images, 1)


def log_average_miss_rate(miss_rate, fppi, fppi_points=LAMR_FPPI_POINTS, floor=1e-10):
    """
    The log-average miss rate: the geometric mean of the miss rate at the 9 reference FPPI
    ``fppi_points``, taking at each the last curve point whose FPPI does not exceed it, or
    1.0 where there is none. A miss rate of 0 counts as ``floor``: 1e-10 (Caltech's MATLAB code),
    so that one perfect point does not make the mean 0, or 0.0 (CityPersons' script).

    Args:
        miss_rate (ndarray): (K,) miss rate of the curve (:func:`miss_rate_fppi_curve`).
        fppi (ndarray): (K,) FPPI of the curve, non-decreasing.
        fppi_points (ndarray): the reference points.
        floor (float): the least miss rate taken at a point.

    Returns:
        float: in [0, 1]; 1.0 for an empty curve, NaN for a NaN miss rate (no ground truth).
    """
    miss_rate, fppi = np.asarray(miss_rate, dtype=np.float64), np.asarray(fppi, dtype=np.float64)
    if len(miss_rate) == 0:
        return 1.0
    if np.isnan(miss_rate).any():
        return float("nan")
    last = np.searchsorted(fppi, np.asarray(fppi_points), side="right") - 1  # -1: no point <= ref
    at_ref = np.maximum(floor, np.where(last >= 0, miss_rate[np.maximum(last, 0)], 1.0))
    if (at_ref == 0).any():
        return 0.0
    return float(np.exp(np.mean(np.log(at_ref))))


def recall_at_fppi(recall, fppi, budget):
    """
    Recall at a false-positive budget: that of the last curve point with FPPI <= budget.

    Args:
        recall (ndarray): (K,) recall of the curve (1 - miss rate).
        fppi (ndarray): (K,) FPPI of the curve, non-decreasing.
        budget (float): false positives per image allowed.

    Returns:
        float: the recall, 0.0 if no point is within the budget.
    """
    last = int(np.searchsorted(np.asarray(fppi, dtype=np.float64), budget, side="right")) - 1
    return float(np.asarray(recall, dtype=np.float64)[last]) if last >= 0 else 0.0


def _box_height(annotation):
    box, mode = annotation["bbox"], annotation["bbox_mode"]
    return float(box[3]) if mode == BoxMode.XYWH_ABS else float(box[3]) - float(box[1])


def _in_range(values, bounds):
    return (values >= bounds[0]) & (values <= bounds[1])


def class_miss_rate_curve(
    records, predictions, class_id, setup=SAFETY_SETUPS["all"], iou_threshold=0.5
):
    """
    The miss rate against FPPI curve of one class under a setup, over the images predicted.

    Args:
        records (dict): image id -> detectron2 dataset dict ("annotations" with "bbox",
            "bbox_mode", "category_id" and optionally "iscrowd", "ignore", "vis_ratio").
        predictions (list[dict]): per image "image_id", "boxes" (N, 4) XYXY, "scores", "classes".
        class_id (int): the contiguous class id.
        setup (SafetySetup): which ground truth and detections count.
        iou_threshold (float): least IoU of a match.

    Returns:
        miss_rate, fppi (ndarray), num_gt (int): as :func:`miss_rate_fppi_curve`, and the number
        of ground-truth boxes counted.
    """
    scores, is_tp, num_gt = [], [], 0
    for p in predictions:
        anns = [
            a
            for a in records.get(p["image_id"], {}).get("annotations", [])
            if a["category_id"] == class_id
        ]
        gt = np.array(
            [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
            dtype=np.float64,
        ).reshape(-1, 4)
        ignore = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        if setup.use_ignore_flag:
            ignore |= np.array([bool(a.get("ignore", 0)) for a in anns], dtype=bool)
        if setup.height is not None:  # from the annotation as written, without rounding
            ignore |= ~_in_range(np.array([_box_height(a) for a in anns]), setup.height)
        if setup.visibility is not None:
            vis = np.array([float(a.get("vis_ratio", 1.0)) for a in anns], dtype=np.float64)
            ignore |= ~_in_range(vis, setup.visibility)
        mine = p["classes"] == class_id
        boxes = np.asarray(p["boxes"], dtype=np.float64)[mine].reshape(-1, 4)
        det_scores = np.asarray(p["scores"], dtype=np.float64)[mine]
        if setup.max_detections is not None:
            top = np.argsort(-det_scores, kind="stable")[: setup.max_detections]
            boxes, det_scores = boxes[top], det_scores[top]
        if setup.height is not None:
            h = boxes[:, 3] - boxes[:, 1]
            keep = (h >= setup.height[0] / 1.25) & (h < setup.height[1] * 1.25)
            boxes, det_scores = boxes[keep], det_scores[keep]
        s, t, n = match_detections(boxes, det_scores, gt, ignore, iou_threshold)
        scores.append(s)
        is_tp.append(t)
        num_gt += n
    mr, fppi = miss_rate_fppi_curve(
        np.concatenate(scores) if scores else np.zeros(0),
        np.concatenate(is_tp) if is_tp else np.zeros(0, bool),
        num_gt,
        len(predictions),
    )
    return mr, fppi, num_gt


class SafetyEvaluator(DatasetEvaluator):
    """
    LAMR and recall at ``fp_per_image`` FPPI, per safety-critical class and averaged over those
    with ground truth, on the images given to :meth:`process`. Results, in percent:
    ``{"safety": {"LAMR", "R@<fp>FPPI", "LAMR-<class>", "R@<fp>FPPI-<class>"}}``; a class
    without ground truth in those images is NaN and left out of the averages.
    """

    def __init__(
        self,
        dataset_name: str,
        class_names: List[str],
        fp_per_image: float = 0.1,
        iou_threshold: float = 0.5,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        setup: str = "all",
    ):
        if setup not in SAFETY_SETUPS:
            raise ValueError(f"safety setup {setup!r}: allowed {', '.join(SAFETY_SETUPS)}")
        self._setup = setup
        self._dataset_name = dataset_name
        self._fp_per_image = float(fp_per_image)
        self._iou_threshold = float(iou_threshold)
        self._output_dir = output_dir
        self._distributed = distributed
        thing_classes = list(MetadataCatalog.get(dataset_name).get("thing_classes", []))
        # Class names come from a config shared across datasets (COCO's by default), so names a
        # dataset lacks are expected there and skipped, not an error.
        self._classes = OrderedDict(
            (n, thing_classes.index(n)) for n in class_names if n in thing_classes
        )
        missing = [n for n in class_names if n not in thing_classes]
        if missing:
            logger.warning(
                f"Safety metrics: dataset {dataset_name!r} has no class "
                f"{', '.join(map(repr, missing))}; skipped"
            )
        self.reset()

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        """
        Args:
            inputs: the model's inputs, dicts with "image_id".
            outputs: the model's outputs, dicts with "instances" (:class:`Instances` with
                pred_boxes, scores, pred_classes); only detections of safety classes are kept.
        """
        ids = np.array(list(self._classes.values()), dtype=np.int64)
        for input, output in zip(inputs, outputs):
            if "instances" not in output:
                continue
            inst = output["instances"].to("cpu")
            classes = inst.pred_classes.numpy()
            keep = np.isin(classes, ids)
            self._predictions.append(
                {
                    "image_id": input["image_id"],
                    "boxes": inst.pred_boxes.tensor.numpy()[keep],
                    "scores": inst.scores.numpy()[keep],
                    "classes": classes[keep],
                }
            )

    def evaluate(self):
        """The results on the main process ({} on the others, or with nothing to evaluate)."""
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not self._classes:
            logger.warning(
                f"Safety metrics: none of the safety classes is in dataset "
                f"{self._dataset_name!r}; nothing to evaluate"
            )
            return {}
        if not predictions:
            logger.warning("Safety metrics: received no predictions")
            return {}

        records = {r["image_id"]: r for r in DatasetCatalog.get(self._dataset_name)}
        unknown = sum(p["image_id"] not in records for p in predictions)
        if unknown:
            logger.warning(
                f"Safety metrics: {unknown} images are not in dataset "
                f"{self._dataset_name!r}; evaluated as having no ground truth"
            )
        fp, res, rows, num_gts = f"{self._fp_per_image:g}", OrderedDict(), [], {}
        setup = SAFETY_SETUPS[self._setup]
        for name, cid in self._classes.items():
            mr, fppi, num_gt = class_miss_rate_curve(
                records, predictions, cid, setup, self._iou_threshold
            )
            # With no ground truth both metrics are undefined, whatever the detections.
            lamr = (
                100 * log_average_miss_rate(mr, fppi, setup.fppi_points, setup.miss_rate_floor)
                if num_gt
                else float("nan")
            )
            rec = 100 * recall_at_fppi(1 - mr, fppi, self._fp_per_image) if num_gt else float("nan")
            res[f"LAMR-{name}"], res[f"R@{fp}FPPI-{name}"], num_gts[name] = lamr, rec, num_gt
            rows.append((name, num_gt, lamr, rec))
        with_gt = [r for r in rows if r[1] > 0]
        res_mean = OrderedDict(
            [
                ("LAMR", float(np.mean([r[2] for r in with_gt])) if with_gt else float("nan")),
                (
                    f"R@{fp}FPPI",
                    float(np.mean([r[3] for r in with_gt])) if with_gt else float("nan"),
                ),
            ]
        )
        res_mean.update(res)
        table = tabulate(
            rows + [("mean", sum(num_gts.values()), *list(res_mean.values())[:2])],
            headers=["class", "#GT", "LAMR %", f"R@{fp}FPPI %"],
            floatfmt=".2f",
            tablefmt="pipe",
        )
        logger.info(
            f"Safety metrics on {len(predictions)} images, IoU {self._iou_threshold:g}, "
            f"setup {self._setup!r}: {setup.protocol} (LAMR: lower is better):\n{table}"
        )
        if self._output_dir:
            self._write_json(res_mean, num_gts, len(predictions))
        return {"safety": res_mean}

    def _write_json(self, res, num_gts, num_images):
        os.makedirs(self._output_dir, exist_ok=True)
        record = {
            "safety": res,
            "num_gt": num_gts,
            "num_images": num_images,
            "iou_threshold": self._iou_threshold,
            "fp_per_image": self._fp_per_image,
            "setup": self._setup,
            "protocol": SAFETY_SETUPS[self._setup].protocol,
        }
        write_json(os.path.join(self._output_dir, "safety_metrics.json"), record)


def build_safety_evaluator(cfg, dataset_name, output_dir=None):
    """A :class:`SafetyEvaluator` configured by ``cfg.TEST.SAFETY``, or None if it is disabled."""
    s = cfg.TEST.SAFETY
    if not s.ENABLED:
        return None
    return SafetyEvaluator(
        dataset_name,
        list(s.CLASSES),
        fp_per_image=s.FP_PER_IMAGE,
        iou_threshold=s.IOU_THRESHOLD,
        output_dir=output_dir,
        setup=s.SETUP,
    )
