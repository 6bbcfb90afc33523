"""
Evaluation: COCO AP on a maintained fast library (``coco``: detectron2's COCOEvaluator with
faster-coco-eval behind its fast path), the safety metrics (``safety``: log-average miss rate and
recall at a false-positive budget for chosen classes), and confidence intervals for the
difference between two settings (``bootstrap``: a paired bootstrap over test images).
"""
from .bootstrap import BOOTSTRAP_METRICS, BootstrapError, RunEvaluation, paired_bootstrap
from .coco import FastCOCOEvaluator, evaluate_coco
from .safety import SafetyEvaluator, build_safety_evaluator, log_average_miss_rate

__all__ = ["BOOTSTRAP_METRICS", "BootstrapError", "RunEvaluation", "paired_bootstrap",
           "FastCOCOEvaluator", "evaluate_coco", "SafetyEvaluator", "build_safety_evaluator",
           "log_average_miss_rate"]
