"""d2-focalstar: one-stage detectors (RetinaNet, FCOS) with the modified focal loss FL* and its
relatives, on detectron2. docs/ARCHITECTURE.md says what each subpackage owns."""

__version__ = "0.1.0"  # the single source: setup.py reads it, results.json records it

from .config import add_focalstar_config, check_focalstar_config
from .data import register_coco_json_datasets, register_config_datasets, register_embedded_datasets
from .modeling import (
    LOSS_TYPES,
    ClassificationLoss,
    FCOSFLStar,
    RetinaNetFLStar,
    loss_setting,  # registers
    sigmoid_ce_loss,
    sigmoid_classification_loss,
    sigmoid_flstar_loss,
    sigmoid_focal_loss,
    sigmoid_poly1_focal_loss,
)

__all__ = [
    "add_focalstar_config",
    "check_focalstar_config",
    "register_coco_json_datasets",
    "register_config_datasets",
    "LOSS_TYPES",
    "ClassificationLoss",
    "FCOSFLStar",
    "RetinaNetFLStar",
    "loss_setting",
    "sigmoid_ce_loss",
    "sigmoid_classification_loss",
    "sigmoid_flstar_loss",
    "sigmoid_focal_loss",
    "sigmoid_poly1_focal_loss",
]

register_embedded_datasets()  # config-free: their names only; each is generated on first use
