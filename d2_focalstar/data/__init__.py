"""
The data: the embedded synthetic datasets (``shapes``), their and DATASETS.COCO_JSON's, .YOLO's
and .VOC_STYLE's registration in detectron2's catalogs (``catalog``; the folders' readers and
checks: ``folders``), the start-up checks of a config's datasets (``checks``), the training
mapper that survives bad images and boxes (``mapper``), and synthetic
COCO ground truth and detections for evaluation tests and benchmarks (``synthetic_coco``).
"""

from .catalog import (
    register_coco_json_datasets,
    register_config_datasets,
    register_embedded_datasets,
)
from .checks import check_coco_json, check_datasets
from .mapper import CheckedDatasetMapper, EvaluationImageError, summarize_data_faults
from .shapes import (
    EMBEDDED_DATASETS,
    SHAPE_CLASSES,
    ShapesSpec,
    ensure_shapes_dataset,
    generate_shapes_dataset,
)

__all__ = [
    "register_coco_json_datasets",
    "register_config_datasets",
    "register_embedded_datasets",
    "check_coco_json",
    "check_datasets",
    "CheckedDatasetMapper",
    "EvaluationImageError",
    "summarize_data_faults",
    "EMBEDDED_DATASETS",
    "SHAPE_CLASSES",
    "ShapesSpec",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
]
