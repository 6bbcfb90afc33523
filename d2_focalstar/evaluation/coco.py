"""
COCO evaluation on a maintained fast library: detectron2's ``COCOEvaluator`` whose fast path
(``use_fast_impl``, on by default) runs faster-coco-eval's C++ ``COCOeval_faster`` where
detectron2's own fast path (``COCOeval_opt``, in its compiled ``_C``) is not built. Without
faster-coco-eval it is detectron2's evaluator as it is: pycocotools, the official (and slowest)
implementation. Both give the same 12 numbers to 1e-6 (tests/test_evaluation.py); the time each
takes on a COCO-val-sized set is in docs/BENCHMARKS.md.
"""

import contextlib
import io
import logging

from detectron2.evaluation import COCOEvaluator, coco_evaluation
from pycocotools.cocoeval import COCOeval

__all__ = ["FastCOCOEvaluator", "fast_cocoeval", "coco_eval_implementation", "evaluate_coco"]

logger = logging.getLogger(__name__)


def fast_cocoeval():
    """faster-coco-eval's COCOeval class (pycocotools' interface, C++ evaluate and accumulate), or
    None when faster-coco-eval is not installed."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return COCOeval_faster


def coco_eval_implementation(use_fast_impl=True):
    """(name, COCOeval class) that FastCOCOEvaluator uses: detectron2's own fast path where its _C
    is built, else faster-coco-eval where installed, else pycocotools."""
    if use_fast_impl and coco_evaluation.COCOeval_opt is not COCOeval:
        return "detectron2 COCOeval_opt", coco_evaluation.COCOeval_opt
    fast = fast_cocoeval() if use_fast_impl else None
    if fast is not None:
        import faster_coco_eval

        return f"faster-coco-eval {faster_coco_eval.__version__}", fast
    return "pycocotools", COCOeval


@contextlib.contextmanager
def _fast_path_runs(cocoeval_class):
    # COCOEvaluator._eval_predictions picks its fast class from the module's global COCOeval_opt
    # (pycocotools' COCOeval when _C is missing); point it at ours while this evaluator evaluates
    saved = coco_evaluation.COCOeval_opt
    coco_evaluation.COCOeval_opt = cocoeval_class
    try:
        yield
    finally:
        coco_evaluation.COCOeval_opt = saved


class FastCOCOEvaluator(COCOEvaluator):
    """detectron2's COCOEvaluator (same arguments, same results dict) with faster-coco-eval behind
    ``use_fast_impl`` when detectron2's compiled fast path is missing. ``coco_stats`` holds, per
    task, the 12 numbers of COCOeval.summarize() (AP, AP50, AP75, APs, APm, APl, AR1, AR10,
    AR100, ARs, ARm, ARl, as fractions)."""

    def __init__(self, dataset_name, *args, use_fast_impl=True, **kwargs):
        super().__init__(dataset_name, *args, use_fast_impl=use_fast_impl, **kwargs)
        self.implementation, cocoeval_class = coco_eval_implementation(use_fast_impl)
        # detectron2 turned its fast path off without _C; faster-coco-eval takes it over
        self._substitute = None
        if not self._use_fast_impl and cocoeval_class is not COCOeval:
            self._use_fast_impl, self._substitute = True, cocoeval_class
        self.coco_stats = {}
        self._logger.info(
            f"COCO evaluation with {self.implementation}"
            + (
                " in place of detectron2's fast path (its _C is not built)"
                if self._substitute
                else ""
            )
        )

    def _eval_predictions(self, predictions, img_ids=None):
        if self._substitute is None:
            return super()._eval_predictions(predictions, img_ids)
        with _fast_path_runs(self._substitute):
            return super()._eval_predictions(predictions, img_ids)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is not None:
            self.coco_stats[iou_type] = [float(v) for v in coco_eval.stats[:12]]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)


def evaluate_coco(coco_gt, detections, implementation="fast", iou_type="bbox"):
    """The 12 summary numbers of COCO ``detections`` (a list of result dicts) against ``coco_gt``
    (a pycocotools COCO), with faster-coco-eval ("fast") or pycocotools ("pycocotools"), through
    the function detectron2's COCOEvaluator calls. pycocotools' progress prints are kept out."""
    cocoeval_class = fast_cocoeval() if implementation == "fast" else COCOeval
    if cocoeval_class is None:
        raise ImportError("faster-coco-eval is not installed (pip install faster-coco-eval)")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = coco_evaluation._evaluate_predictions_on_coco(
            coco_gt, detections, iou_type, cocoeval_fn=cocoeval_class
        )
    return [float(v) for v in coco_eval.stats[:12]]
