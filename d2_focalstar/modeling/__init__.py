"""
The research part: the table of classification loss types and their reference functions in
logit space (``losses``), the fused Triton kernel that computes them on CUDA (``fused``), the
detector-independent classification loss that chooses between the two (``classification``), and
the two meta-architectures that use it, each overriding only ``losses()`` and ``from_config``
(``retinanet``: RetinaNetFLStar; ``fcos``: FCOSFLStar); and a backbone whose frozen trunk's
features come from a cache (``cached_trunk``), a speed lever for CPU-scale studies. Nothing here
depends on how a run is launched or recorded.
"""

from detectron2.modeling import META_ARCH_REGISTRY

from .cached_trunk import build_cached_trunk_retinanet_fpn_backbone  # noqa: F401  registers the backbone
from .classification import ClassificationLoss
from .fcos import FCOSFLStar  # registers the meta-architecture and its backbone
from .losses import (
    DEFAULT_NODE,
    LOSS_TYPES,
    LossSetting,
    loss_setting,
    sigmoid_ce_loss,
    sigmoid_classification_loss,
    sigmoid_flstar_loss,
    sigmoid_focal_loss,
    sigmoid_poly1_focal_loss,
)
from .retinanet import RetinaNetFLStar  # registers the meta-architecture

__all__ = [
    "ClassificationLoss",
    "FCOSFLStar",
    "RetinaNetFLStar",
    "LOSS_TYPES",
    "LossSetting",
    "loss_setting",
    "loss_config_node",
    "sigmoid_ce_loss",
    "sigmoid_classification_loss",
    "sigmoid_flstar_loss",
    "sigmoid_focal_loss",
    "sigmoid_poly1_focal_loss",
]


def loss_config_node(cfg):
    """The config node where the detector that ``cfg`` builds reads its alpha, FL gamma and class
    count: its meta-architecture's ``loss_config_node`` ('MODEL.RETINANET' for RetinaNetFLStar,
    'MODEL.FCOS' for FCOSFLStar), :data:`DEFAULT_NODE` for one that does not say (detectron2's
    RetinaNet) or is not registered."""
    try:
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    except KeyError:
        return DEFAULT_NODE
    return getattr(arch, "loss_config_node", DEFAULT_NODE)
