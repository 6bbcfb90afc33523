"""
Evaluation: COCO AP on a maintained fast library (``coco``: detectron2's COCOEvaluator with
faster-coco-eval behind its fast path), the evaluator of a dataset by its evaluator_type
(``evaluators``: COCO's or detectron2's Pascal VOC), the safety metrics (``safety``: log-average
miss rate and recall at a false-positive budget for chosen classes), and confidence intervals
for the difference between two settings (``bootstrap``: a paired bootstrap over test images).
"""

from .bootstrap import BOOTSTRAP_METRICS, BootstrapError, RunEvaluation, paired_bootstrap
from .coco import FastCOCOEvaluator, evaluate_coco
from .evaluators import (
    EVALUATOR_TYPES,
    EvaluatorTypeError,
    build_dataset_evaluator,
    evaluator_type_of,
)
from .safety import SafetyEvaluator, build_safety_evaluator, log_average_miss_rate

__all__ = [
    "BOOTSTRAP_METRICS",
    "BootstrapError",
    "RunEvaluation",
    "paired_bootstrap",
    "FastCOCOEvaluator",
    "evaluate_coco",
    "SafetyEvaluator",
    "build_safety_evaluator",
    "log_average_miss_rate",
    "EVALUATOR_TYPES",
    "EvaluatorTypeError",
    "build_dataset_evaluator",
    "evaluator_type_of",
]
