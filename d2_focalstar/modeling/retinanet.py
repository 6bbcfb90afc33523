from typing import Any, Dict, List, Optional

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage

from .classification import ClassificationLoss, add_classification_loss

__all__ = ["RetinaNetFLStar"]


@META_ARCH_REGISTRY.register()
class RetinaNetFLStar(RetinaNet):
    """
    detectron2's RetinaNet whose classification loss is chosen by MODEL.FOCALSTAR.LOSS_TYPE, any
    type of the loss table (d2_focalstar/modeling/losses.py). Everything else, the box loss and its
    normalisation included, is the parent's, so with LOSS_TYPE="FL" the losses equal stock
    RetinaNet's.
    """

    #: where this detector's alpha, FL gamma and class count live ('{node}' in the loss table's
    #: keys)
    loss_config_node = "MODEL.RETINANET"

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
            cls_loss: a :class:`ClassificationLoss`; None: FL with the parent's
                ``focal_loss_alpha`` and ``focal_loss_gamma`` (stock RetinaNet's loss).
            channels_last: put the convolution weights in the channels_last memory layout
                (from_config: MODEL.FOCALSTAR.CHANNELS_LAST on a CUDA MODEL.DEVICE); moving
                the model to another device keeps the layout.
            kwargs: as for :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        add_classification_loss(self, cls_loss, channels_last)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        ret = super().from_config(cfg)
        ret.update(
            cls_loss=ClassificationLoss.from_config(cfg, cls.loss_config_node, ret["num_classes"]),
            channels_last=cfg.MODEL.FOCALSTAR.CHANNELS_LAST
            and str(cfg.MODEL.DEVICE).startswith("cuda"),
        )
        return ret

    def losses(
        self,
        anchors: List[Boxes],
        pred_logits: List[torch.Tensor],
        gt_labels: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        gt_boxes: List[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """Same inputs and outputs as :meth:`RetinaNet.losses`."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R); background = num_classes, ignored = -1

        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)

        logits = cat(pred_logits, dim=1).reshape(-1, self.num_classes)
        loss_cls = self.cls_loss(logits, gt_labels.reshape(-1))

        loss_box_reg = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            pos_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box_reg / normalizer}
