"""d2-focalstar: one-stage detectors (RetinaNet, FCOS) with the modified focal loss FL* and its
relatives, on detectron2."""
import warnings

# fvcore, imported by detectron2, jit-scripts its losses at import time, which recent torch
# deprecates loudly in every process; nothing a user of this project can act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

from .config import add_focalstar_config, check_focalstar_config, load_config
from .data import check_datasets, register_coco_json_datasets, register_embedded_datasets
from .losses import (LOSS_TYPES, sigmoid_ce_loss, sigmoid_classification_loss, sigmoid_flstar_loss,
                     sigmoid_focal_loss)
from .classification import ClassificationLoss
from .retinanet import RetinaNetFLStar  # registers the meta-architecture
from .fcos import FCOSFLStar  # registers the meta-architecture and its backbone

__all__ = ["add_focalstar_config", "check_focalstar_config", "load_config", "check_datasets",
           "register_coco_json_datasets", "LOSS_TYPES", "sigmoid_ce_loss", "sigmoid_classification_loss",
           "sigmoid_flstar_loss", "sigmoid_focal_loss", "ClassificationLoss", "RetinaNetFLStar", "FCOSFLStar"]

register_embedded_datasets()
