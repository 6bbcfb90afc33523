"""
The evaluator of a dataset, by its metadata's ``evaluator_type``: one table, read by train_net.py's
Trainer and by the start-up checks (so that a test dataset no evaluator here reads is refused
before training, not after it).
"""

from typing import Callable, Dict, Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, PascalVOCDetectionEvaluator

from .coco import FastCOCOEvaluator

__all__ = ["EVALUATOR_TYPES", "EvaluatorTypeError", "evaluator_type_of", "build_dataset_evaluator"]

#: evaluator_type -> (dataset name, output folder) -> evaluator. "coco": detectron2's
#: COCOEvaluator on faster-coco-eval (coco.py; it converts a dataset without a COCO JSON itself,
#: as a YOLO folder); "pascal_voc": detectron2's PascalVOCDetectionEvaluator (VOC's AP at IoU
#: 0.5 to 0.95, its XMLs as ground truth; results ``bbox: {AP, AP50, AP75}``).
EVALUATOR_TYPES: Dict[str, Callable[[str, Optional[str]], DatasetEvaluator]] = {
    "coco": lambda name, output_dir: FastCOCOEvaluator(name, output_dir=output_dir),
    "pascal_voc": lambda name, output_dir: PascalVOCDetectionEvaluator(name),
}
#: The evaluator_type of a dataset whose metadata has none (one registered by code without it):
#: detectron2's COCOEvaluator reads any dataset's dicts.
DEFAULT_EVALUATOR_TYPE = "coco"


class EvaluatorTypeError(ValueError):
    """A dataset whose evaluator_type no evaluator of EVALUATOR_TYPES reads."""


def evaluator_type_of(dataset_name: str) -> str:
    """The evaluator_type of a registered dataset; EvaluatorTypeError naming the dataset and the
    types allowed where no evaluator here reads it."""
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", DEFAULT_EVALUATOR_TYPE)
    if kind not in EVALUATOR_TYPES:
        raise EvaluatorTypeError(
            f"dataset {dataset_name!r} has evaluator_type {kind!r}; allowed "
            f"{', '.join(map(repr, EVALUATOR_TYPES))} (box detection)"
        )
    return kind


def build_dataset_evaluator(
    dataset_name: str, output_dir: Optional[str] = None
) -> DatasetEvaluator:
    """The box-detection evaluator of a dataset, by its evaluator_type (EVALUATOR_TYPES)."""
    return EVALUATOR_TYPES[evaluator_type_of(dataset_name)](dataset_name, output_dir)
