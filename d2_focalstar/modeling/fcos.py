"""
FCOSFLStar: detectron2's FCOS (``detectron2/modeling/meta_arch/fcos.py``, which detectron2 builds
only from a LazyConfig) as a yacs meta-architecture, with the classification loss of the loss
table. Its keys are MODEL.FCOS.* (added by ``add_focalstar_config``), and its backbone
``build_fcos_resnet_fpn_backbone``: ResNet-FPN with P6 and P7 computed from P5, as in
detectron2's ``COCO-Detection/fcos_R_50_FPN_1x.py``.
"""

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage

from .classification import ClassificationLoss, add_classification_loss

__all__ = ["FCOSFLStar", "build_fcos_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ``build_retinanet_resnet_fpn_backbone``, but P6 from P5 (FCOS, Sec. 2.2 of
    arXiv:2006.09214), not from C5."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@META_ARCH_REGISTRY.register()
class FCOSFLStar(FCOS):
    """
    detectron2's FCOS whose classification loss is chosen by MODEL.FOCALSTAR.LOSS_TYPE; the box
    (GIoU) and centerness losses and their normalisation are the parent's, so with
    LOSS_TYPE="FL" the losses equal stock FCOS's.
    """

    loss_config_node = "MODEL.FCOS"

    @configurable
    def __init__(
        self,
        *,
        cls_loss: Optional[ClassificationLoss] = None,
        channels_last: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            cls_loss: a :class:`ClassificationLoss`; None: FL with ``focal_loss_alpha`` and
                ``focal_loss_gamma`` (stock FCOS's loss).
            channels_last: as for :class:`RetinaNetFLStar`.
            kwargs: as for :class:`FCOS`.
        """
        super().__init__(**kwargs)
        add_classification_loss(self, cls_loss, channels_last)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        fcos = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = [backbone.output_shape()[f] for f in fcos.IN_FEATURES]
        head = FCOSHead(
            input_shape=shapes,
            conv_dims=[shapes[0].channels] * fcos.NUM_CONVS,
            num_classes=fcos.NUM_CLASSES,
            norm=fcos.HEAD_NORM,
            prior_prob=fcos.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": fcos.IN_FEATURES,
            "num_classes": fcos.NUM_CLASSES,
            "center_sampling_radius": fcos.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": fcos.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": fcos.FOCAL_LOSS_GAMMA,
            "test_score_thresh": fcos.SCORE_THRESH_TEST,
            "test_topk_candidates": fcos.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": fcos.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "cls_loss": ClassificationLoss.from_config(cfg, cls.loss_config_node, fcos.NUM_CLASSES),
            "channels_last": cfg.MODEL.FOCALSTAR.CHANNELS_LAST
            and str(cfg.MODEL.DEVICE).startswith("cuda"),
        }

    def losses(
        self,
        anchors: List[Boxes],
        pred_logits: List[torch.Tensor],
        gt_labels: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        gt_boxes: List[torch.Tensor],
        pred_centerness: List[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """Same inputs and outputs as :meth:`FCOS.losses`; the classification term by
        ``cls_loss``."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R); background = num_classes, no ignored anchors

        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 300)

        logits = torch.cat(pred_logits, dim=1).reshape(-1, self.num_classes)
        loss_cls = self.cls_loss(logits, gt_labels.reshape(-1))

        loss_box_reg = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            pos_mask,
            box_reg_loss_type="giou",
        )

        ctrness_targets = self.compute_ctrness_targets(anchors, gt_boxes)  # (N, R)
        pred_centerness = torch.cat(pred_centerness, dim=1).squeeze(dim=2)  # (N, R)
        ctrness_loss = F.binary_cross_entropy_with_logits(
            pred_centerness[pos_mask], ctrness_targets[pos_mask], reduction="sum"
        )
        return {
            "loss_fcos_cls": loss_cls / normalizer,
            "loss_fcos_loc": loss_box_reg / normalizer,
            "loss_fcos_ctr": ctrness_loss / normalizer,
        }
