import sys

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.utils.events import get_event_storage

from .config import check_focalstar_config
from .losses import gamma_for, sigmoid_classification_loss

__all__ = ["RetinaNetFLStar"]


def _fused_kernel_runs_on(logits):
    """CUDA logits; or CPU ones where d2_focalstar.fused was imported to run in Triton's
    interpreter (the tests); never on a CPU without that (a laptop may lack Triton)."""
    if logits.is_cuda:
        return True
    fused = sys.modules.get(f"{__package__}.fused")
    return fused is not None and fused.INTERPRETED


@META_ARCH_REGISTRY.register()
class RetinaNetFLStar(RetinaNet):
    """
    detectron2's RetinaNet whose classification loss is chosen by MODEL.FOCALSTAR.LOSS_TYPE:
    FL* (the modified focal loss), FL, CE, or the RetinaNet appendix's FL*. Everything else, the box loss and its
    normalisation included, is the parent's, so with LOSS_TYPE="FL" the losses equal stock
    RetinaNet's.
    """

    @configurable
    def __init__(self, *, cls_loss_type="FLSTAR", flstar_gamma=0.25, flstar_max_factor=100.0,
                 appendix_gamma=2.0, fused_kernel=True, channels_last=False, **kwargs):
        """
        Args:
            cls_loss_type: "FLSTAR", "FL", "CE" or "FLSTAR_APPENDIX".
            flstar_gamma: FL*'s gamma (FL uses ``focal_loss_gamma``, as in RetinaNet).
            flstar_max_factor: cap on FL*'s modulating factor, 0 for none.
            appendix_gamma: gamma of the RetinaNet appendix's FL* ("FLSTAR_APPENDIX").
            fused_kernel: compute the classification loss with the fused Triton kernel on
                CUDA tensors (and on CPU ones where d2_focalstar.fused was imported with
                TRITON_INTERPRET=1, as the tests do); elsewhere the reference functions.
            channels_last: put the convolution weights in the channels_last memory layout
                (from_config: MODEL.FOCALSTAR.CHANNELS_LAST on a CUDA MODEL.DEVICE); moving
                the model to another device keeps the layout.
            kwargs: as for :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        self.cls_loss_type = cls_loss_type.upper()
        self.flstar_gamma = flstar_gamma
        self.flstar_max_factor = flstar_max_factor
        self.fused_kernel = fused_kernel
        self.cls_loss_gamma = gamma_for(self.cls_loss_type, flstar_gamma, self.focal_loss_gamma,
                                        appendix_gamma)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        check_focalstar_config(cfg)
        ret = super().from_config(cfg)
        ret.update(
            cls_loss_type=cfg.MODEL.FOCALSTAR.LOSS_TYPE,
            flstar_gamma=cfg.MODEL.FOCALSTAR.GAMMA,
            flstar_max_factor=cfg.MODEL.FOCALSTAR.MAX_FACTOR,
            appendix_gamma=cfg.MODEL.FOCALSTAR.APPENDIX_GAMMA,
            fused_kernel=cfg.MODEL.FOCALSTAR.FUSED_KERNEL,
            channels_last=cfg.MODEL.FOCALSTAR.CHANNELS_LAST and str(cfg.MODEL.DEVICE).startswith("cuda"),
        )
        return ret

    def _fused_kernel_agrees(self, logits):
        # once per process and setting, on this device and dtype: a kernel that this GPU or
        # Triton version gets wrong is not used (fused.agrees_with_reference warns)
        from .fused import agrees_with_reference

        return agrees_with_reference(logits.device, logits.dtype, self.num_classes, self.cls_loss_type,
                                     self.focal_loss_alpha, self.cls_loss_gamma, self.flstar_max_factor)

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """Same inputs and outputs as :meth:`RetinaNet.losses`."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R); background = num_classes, ignored = -1

        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)

        logits = cat(pred_logits, dim=1)
        if self.fused_kernel and _fused_kernel_runs_on(logits) and self._fused_kernel_agrees(logits):
            from .fused import fused_classification_loss  # needs Triton: imported only here

            loss_cls = fused_classification_loss(
                logits.reshape(-1, self.num_classes), gt_labels.reshape(-1), self.cls_loss_type,
                self.focal_loss_alpha, self.cls_loss_gamma, self.flstar_max_factor)
        else:
            # One-hot without the background column: background anchors are all-negative rows.
            targets = F.one_hot(gt_labels[valid_mask], num_classes=self.num_classes + 1)[:, :-1]
            loss_cls = sigmoid_classification_loss(
                logits[valid_mask],
                targets,
                loss_type=self.cls_loss_type,
                alpha=self.focal_loss_alpha,
                gamma=self.cls_loss_gamma,
                max_factor=self.flstar_max_factor,
                reduction="sum",
            )

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
