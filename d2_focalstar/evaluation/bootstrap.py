"""
Confidence intervals for the difference between two settings, from each run's saved detections:
a paired bootstrap over images (Efron & Tibshirani; the same resampled image set for both
settings, so that the images' own difficulty cancels).

The per-image work is done once per run: pycocotools' ``COCOeval.evaluate()`` matches each
image's detections to its ground truth (every category, IoU threshold and area range), and the
safety metrics' matcher (``d2_focalstar.evaluation.safety.match_detections``) does the same for
LAMR. A resample is then only an accumulation: each image's detections and ground truth weighted
by how many times the resample drew it. :meth:`RunEvaluation.metrics` with every weight 1 is
COCOeval's ``accumulate()`` + ``summarize()`` (a test holds it to 1e-6); with weights it is that on
the resampled image set.

With several seeds per setting, each resample scores every seed's run on the same image set and
averages them: the interval is over images for seed-averaged metrics (seed-to-seed spread is the
table's ± sd, not part of the interval).
"""

import contextlib
import io
import logging
import math
import os
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .detections import DetectionsError, check_detection_categories, read_detections
from .safety import log_average_miss_rate, match_detections

if TYPE_CHECKING:
    from numpy.typing import ArrayLike  # numpy >= 1.20; only for the annotations

__all__ = [
    "RunEvaluation",
    "paired_bootstrap",
    "BOOTSTRAP_METRICS",
    "detections_file",
    "load_detections",
    "BootstrapError",
    "MAX_RESAMPLES",
]

logger = logging.getLogger(__name__)

#: The metrics with intervals: COCO AP, AP50, APs (AP of small objects) and the safety LAMR.
BOOTSTRAP_METRICS = ("AP", "AP50", "APs", "LAMR")

#: Resamples that the commands compute without being asked twice (--many-resamples): 1,000 take
#: minutes on a CPU (docs/BENCHMARKS.md), more than this would take days.
MAX_RESAMPLES = 100_000


class BootstrapError(ValueError):
    """Runs that cannot be compared (other datasets or image sets), or files that cannot be used."""


def detections_file(folder: str, dataset: Optional[str] = None) -> Optional[str]:
    """The COCO-format detections that detectron2's COCOEvaluator saved for a run: under
    <folder>/inference/ (or inference/<dataset>/ with several test datasets), as .json or .json.gz;
    None if there are none."""
    for sub in ([os.path.join("inference", dataset)] if dataset else []) + ["inference"]:
        for name in ("coco_instances_results.json", "coco_instances_results.json.gz"):
            path = os.path.join(folder, sub, name)
            if os.path.isfile(path):
                return path
    return None


def load_detections(path: str) -> List[Dict[str, Any]]:
    """A COCO results list from a .json or .json.gz file; BootstrapError naming the file and its
    first bad record for one that no detector wrote (evaluation/detections.py)."""
    try:
        return read_detections(path)
    except DetectionsError as e:
        raise BootstrapError(str(e)) from None


def _quiet_cocoeval(gt, detections):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def coco(dataset):
        c = COCO()
        c.dataset = dataset
        c.createIndex()
        return c

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = coco(gt)
        coco_dt = (
            coco_gt.loadRes(detections)
            if detections
            # loadRes refuses an empty list
            else coco({"images": gt["images"], "categories": gt["categories"], "annotations": []})
        )
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        # only the area ranges the metrics need (all, small): half the matching and its memory
        ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:2], ev.params.areaRngLbl[:2]
        ev.evaluate()
    return ev


class RunEvaluation:
    """One run's detections matched to the ground truth, image by image, ready to be accumulated
    under any image weights."""

    # areas of COCOeval's params.areaRng that the metrics need: 0 all, 1 small
    _AREAS = (0, 1)

    def __init__(
        self,
        gt: Dict[str, Any],
        detections: List[Dict[str, Any]],
        safety_classes: Sequence[str] = (),
        safety_iou: float = 0.5,
        name: str = "",
    ) -> None:
        """
        Args:
            gt: the ground truth, a COCO detection dict (images, annotations, categories).
            detections: COCO results list (image_id, category_id, bbox XYWH, score).
            safety_classes: class names for LAMR (those the ground truth lacks are skipped).
            safety_iou: IoU of a match for LAMR.
            name: for messages.
        """
        self.name = name
        known = {img["id"] for img in gt["images"]}
        unknown = {d["image_id"] for d in detections} - known
        if unknown:
            raise BootstrapError(
                f"{name}: detections of {len(unknown)} images that the ground truth "
                f"does not have (e.g. image_id {sorted(unknown)[0]}): evaluated on "
                "another image set"
            )
        try:
            check_detection_categories(detections, gt, name)
        except DetectionsError as e:
            raise BootstrapError(str(e)) from None
        ev = _quiet_cocoeval(gt, detections)
        p = ev.params
        self.image_ids = list(p.imgIds)  # sorted, as COCOeval sorts them
        self.rec_thrs = np.asarray(p.recThrs)
        self.iou50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
        num_images, num_areas = len(p.imgIds), len(p.areaRng)
        # (area, category index) -> (image index per det, tp (T, n), fp (T, n), npig (I,))
        self._groups = {}
        for a in self._AREAS:
            for k in range(len(p.catIds)):
                evals = [
                    (i, ev.evalImgs[k * num_areas * num_images + a * num_images + i])
                    for i in range(num_images)
                ]
                evals = [(i, e) for i, e in evals if e is not None]
                npig = np.zeros(num_images)
                for i, e in evals:
                    npig[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
                if not evals or npig.sum() == 0:
                    continue  # COCOeval leaves such a category out (precision -1)
                max_det = p.maxDets[-1]
                scores = np.concatenate([np.asarray(e["dtScores"][:max_det]) for _, e in evals])
                img = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in evals])
                dtm = np.concatenate(
                    [np.asarray(e["dtMatches"])[:, :max_det] for _, e in evals], axis=1
                )
                dtig = np.concatenate(
                    [np.asarray(e["dtIgnore"])[:, :max_det] for _, e in evals], axis=1
                )
                order = np.argsort(-scores, kind="mergesort")  # as COCOeval.accumulate
                dtm, dtig = dtm[:, order].astype(bool), dtig[:, order].astype(bool)
                # a detection ignored at every IoU threshold adds a point equal to the one before
                # it to every curve, which changes no interpolated precision: left out
                used = ~dtig.all(axis=0)
                self._groups[(a, k)] = (
                    img[order][used].astype(np.int32),
                    (dtm & ~dtig)[:, used],
                    (~dtm & ~dtig)[:, used],
                    npig,
                )
        self._safety = self._match_safety(gt, detections, safety_classes, safety_iou)

    def _match_safety(self, gt, detections, class_names, iou):
        names = {c["name"]: c["id"] for c in gt["categories"]}
        index = {img: i for i, img in enumerate(self.image_ids)}
        by_image = {}
        for d in detections:
            by_image.setdefault((d["image_id"], d["category_id"]), []).append(d)
        gts = {}
        for a in gt["annotations"]:
            gts.setdefault((a["image_id"], a["category_id"]), []).append(a)
        out = {}
        for name in class_names:
            if name not in names:
                continue
            cid = names[name]
            scores, tps, imgs = [], [], []
            num_gt = np.zeros(len(self.image_ids))
            for img_id in self.image_ids:
                anns = gts.get((img_id, cid), [])
                dets = by_image.get((img_id, cid), [])
                g = np.array(
                    [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
                ).reshape(-1, 4)
                b = np.array(
                    [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
                ).reshape(-1, 4)
                s, t, n = match_detections(
                    b, [d["score"] for d in dets], g, [bool(a.get("iscrowd", 0)) for a in anns], iou
                )
                scores.append(s)
                tps.append(t)
                imgs.append(np.full(len(s), index[img_id]))
                num_gt[index[img_id]] = n
            if num_gt.sum() == 0:
                continue  # no ground truth: left out of the mean, as SafetyEvaluator does
            scores = np.concatenate(scores)
            order = np.argsort(-scores, kind="stable")
            out[name] = (np.concatenate(imgs)[order], np.concatenate(tps)[order], num_gt)
        return out

    def _compressed_groups(self):
        """Each group's curve points that can carry its precision: the detections that are a true
        positive or ignored at some IoU threshold (U). A detection that is a false positive at every
        threshold only lowers the precision of the points after it, never the precision envelope
        at a point that reaches a recall threshold, so it enters only through the running weight
        total. With integer weights every sum is exact, so this gives bit for bit what
        :meth:`metrics` gives (a test holds it)."""
        if getattr(self, "_compressed", None) is None:
            self._compressed = {}
            for key, (img, tp, fp, npig) in self._groups.items():
                keep = np.flatnonzero(~fp.all(axis=0))
                self._compressed[key] = (img, keep, tp[:, keep], (~tp & ~fp)[:, keep], npig)
        return self._compressed

    def metrics_batch(self, weights: "ArrayLike") -> Dict[str, np.ndarray]:
        """:meth:`metrics` for many resamples at once: ``weights`` is (B, images) of integer image
        counts (a bootstrap's draws); returns {metric: (B,) array}, equal to calling
        :meth:`metrics` on each row. The per-detection work (a running total of the weights per
        group) is done for all rows in one pass; the curves are built on the compressed points."""
        w_all = np.asarray(weights, dtype=np.float64)
        num_b, num_t, num_r = len(w_all), None, len(self.rec_thrs)
        q_by_area = {a: [] for a in self._AREAS}  # per group: ((B,) valid, (B, T, R) precision)
        for (a, k), (img, keep, tp, ig, npig) in self._compressed_groups().items():
            n_gt = w_all @ npig
            valid = n_gt > 0
            q = None
            if valid.any():
                w = w_all[valid]
                wd = np.take(w, img, axis=1)
                num_t, n = tp.shape
                q = np.zeros((num_b, num_t, num_r))
                if n:
                    total = np.cumsum(wd, axis=1)[:, keep]  # every used detection's weight so far
                    wk = wd[:, keep][:, None, :]
                    tpc = np.cumsum(tp * wk, axis=2)
                    # tp + fp = all weight so far minus the ignored: exact integers, so this is
                    # the fpc + tpc of metrics() to the last bit
                    seen = (
                        total[:, None, :] - np.cumsum(ig * wk, axis=2)
                        if ig.any()
                        else total[:, None, :]
                    )
                    pr = tpc / (seen + np.spacing(1))
                    pr = np.maximum.accumulate(pr[:, :, ::-1], axis=2)[:, :, ::-1]
                    shift = 2.0 * np.arange(num_t)[:, None]
                    # as metrics(): rows 2 apart
                    shifted_rc = tpc / n_gt[valid][:, None, None] + shift
                    thrs = (self.rec_thrs[None, :] + shift).ravel()
                    rows_t = np.arange(num_t)[:, None]
                    starts = n * rows_t
                    # one search over the T shifted rows
                    for j, b in enumerate(np.flatnonzero(valid)):
                        idx = (
                            np.searchsorted(shifted_rc[j].ravel(), thrs, side="left").reshape(
                                num_t, -1
                            )
                            - starts
                        )
                        q[b] = np.where(idx < n, pr[j][rows_t, np.minimum(idx, n - 1)], 0.0)
            q_by_area[a].append((valid, q))
        out = OrderedDict((m, np.full(num_b, math.nan)) for m in ("AP", "AP50", "APs", "LAMR"))
        for b in range(num_b):
            all_ = [q[b] for valid, q in q_by_area[0] if valid[b]]
            if all_:
                all_ = np.stack(all_)
                out["AP"][b] = 100 * float(all_.mean())
                out["AP50"][b] = 100 * float(all_[:, self.iou50].mean())
            small = [q[b] for valid, q in q_by_area[1] if valid[b]]
            if small:
                out["APs"][b] = 100 * float(np.stack(small).mean())
        lamrs = [[] for _ in range(num_b)]
        images_drawn = w_all.sum(axis=1)
        for img, tp, num_gt in self._safety.values():
            n_gt = w_all @ num_gt
            wd = w_all[:, img]
            recall = np.cumsum(tp * wd, axis=1) / np.where(n_gt > 0, n_gt, 1.0)[:, None]
            fppi = np.cumsum(~tp * wd, axis=1) / images_drawn[:, None]
            for b in np.flatnonzero(n_gt > 0):
                lamrs[b].append(100 * log_average_miss_rate(1 - recall[b], fppi[b]))
        for b, values in enumerate(lamrs):
            if values:
                out["LAMR"][b] = float(np.mean(values))
        return out

    def metrics(self, weights: Optional["ArrayLike"] = None) -> Dict[str, float]:
        """AP, AP50, APs (COCO's, in percent) and LAMR (the mean over safety classes, percent)
        with image i counted ``weights[i]`` times (in the order of sorted image ids; None: once)."""
        w = (
            np.ones(len(self.image_ids))
            if weights is None
            else np.asarray(weights, dtype=np.float64)
        )
        precision = {a: [] for a in self._AREAS}  # per category: (T, R) precision
        for (a, k), (img, tp, fp, npig) in self._groups.items():
            n_gt = float(w @ npig)
            if n_gt == 0:
                continue  # no ground truth of this category in the resample: left out, as COCOeval
            wd = w[img]
            tpc = np.cumsum(tp * wd, axis=1)
            fpc = np.cumsum(fp * wd, axis=1)
            rc = tpc / n_gt
            pr = tpc / (fpc + tpc + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the precision envelope
            # each threshold's first curve point at or above it, every IoU row in one search:
            # rows shifted apart by 2 (recall is in [0, 1]) make one sorted array
            num_t, n = tp.shape
            shift = 2.0 * np.arange(num_t)[:, None]
            idx = np.searchsorted(
                (rc + shift).ravel(), (self.rec_thrs[None, :] + shift).ravel(), side="left"
            )
            idx = idx.reshape(num_t, -1) - n * np.arange(num_t)[:, None]
            ok = idx < n  # past the last point: recall never reached, precision 0
            q = (
                np.where(ok, np.take_along_axis(pr, np.minimum(idx, n - 1), axis=1), 0.0)
                if n
                else np.zeros((num_t, len(self.rec_thrs)))
            )
            precision[a].append(q)
        out = OrderedDict()
        all_ = np.stack(precision[0]) if precision[0] else None
        out["AP"] = 100 * float(all_.mean()) if all_ is not None else math.nan
        out["AP50"] = 100 * float(all_[:, self.iou50].mean()) if all_ is not None else math.nan
        out["APs"] = 100 * float(np.stack(precision[1]).mean()) if precision[1] else math.nan
        lamrs = []
        for img, tp, num_gt in self._safety.values():
            n_gt = float(w @ num_gt)
            if n_gt == 0:
                continue
            wd = w[img]
            recall = np.cumsum(tp * wd) / n_gt
            fppi = np.cumsum(~tp * wd) / w.sum()
            lamrs.append(100 * log_average_miss_rate(1 - recall, fppi))
        out["LAMR"] = float(np.mean(lamrs)) if lamrs else math.nan
        return out


def paired_bootstrap(
    setting_a: Sequence[RunEvaluation],
    setting_b: Sequence[RunEvaluation],
    num_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    metrics: Sequence[str] = BOOTSTRAP_METRICS,
    batch: int = 50,
    progress: Optional[Callable[[int, int], Any]] = None,
) -> Dict[str, Dict[str, float]]:
    """
    The difference A - B of each metric (seed-averaged) and its percentile interval over
    ``num_resamples`` resamples of the images with replacement, the same resample for every run.

    Args:
        setting_a, setting_b: lists of :class:`RunEvaluation` (one per seed), all on one image set.
        batch: resamples scored at once (:meth:`RunEvaluation.metrics_batch`); 0 scores them one
            at a time with :meth:`RunEvaluation.metrics` (the reference path: the same numbers).
        progress: called as ``progress(done, total)`` after each batch, or None.
    Returns:
        {metric: {"diff": A - B on the images as they are, "low", "high": the interval,
        "a", "b": each setting's value}} (NaN where a metric has no value).
    """
    runs = list(setting_a) + list(setting_b)
    ids = runs[0].image_ids
    for r in runs[1:]:
        if r.image_ids != ids:
            raise BootstrapError(
                f"{runs[0].name} and {r.name} were evaluated on different image sets "
                f"({len(ids)} and {len(r.image_ids)} images): a paired bootstrap needs the same"
            )

    def mean_metrics(setting, weights):
        values = [r.metrics(weights) for r in setting]
        return {
            m: float(np.nanmean([v[m] for v in values]))
            if any(not math.isnan(v[m]) for v in values)
            else math.nan
            for m in metrics
        }

    def seed_mean(values):
        out = {}
        for m in metrics:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
                out[m] = np.nanmean(np.stack([v[m] for v in values]), axis=0)
        return out

    # numpy releases the GIL in the long array passes: the runs are scored side by side
    workers = ThreadPoolExecutor(max_workers=max(1, min(len(runs), os.cpu_count() or 1)))

    a0, b0 = mean_metrics(setting_a, None), mean_metrics(setting_b, None)
    rng = np.random.default_rng(seed)
    diffs = {m: [] for m in metrics}
    n = len(ids)
    done = 0
    while done < num_resamples:
        size = min(batch, num_resamples - done) if batch else 1
        # drawn one resample at a time, as always: the same draws for any batch size
        weights = np.stack(
            [
                np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
                for _ in range(size)
            ]
        )
        if batch:
            values = list(workers.map(lambda r: r.metrics_batch(weights), runs))
            a, b = seed_mean(values[: len(setting_a)]), seed_mean(values[len(setting_a) :])
            for m in metrics:
                diffs[m].extend((a[m] - b[m]).tolist())
        else:
            a, b = mean_metrics(setting_a, weights[0]), mean_metrics(setting_b, weights[0])
            for m in metrics:
                diffs[m].append(a[m] - b[m])
        done += size
        if progress is not None:
            progress(done, num_resamples)
    workers.shutdown()
    tail = 100 * (1 - level) / 2
    out = OrderedDict()
    for m in metrics:
        d = np.asarray(diffs[m])
        d = d[~np.isnan(d)]
        low, high = np.percentile(d, [tail, 100 - tail]) if len(d) else (math.nan, math.nan)
        out[m] = {
            "diff": a0[m] - b0[m],
            "low": float(low),
            "high": float(high),
            "a": a0[m],
            "b": b0[m],
        }
    return out
