"""
The classification loss of a dense detector, independent of the detector.

A :class:`ClassificationLoss` takes logits (R, K) and integer labels (R,) (0..K-1 a class, K
background, -1 ignored) and returns the loss summed over anchors and classes, for any type of the
loss table (d2_focalstar/losses.py). It chooses the fused Triton kernel (d2_focalstar/fused.py)
where it can run and has a branch for the type, after checking it once per device, dtype and
setting against the float64 reference; elsewhere the reference functions. RetinaNetFLStar and
FCOSFLStar call it from their ``losses()``; each builds it from its own config node.
"""
import logging
import sys

import torch.nn.functional as F

from .config import check_focalstar_config, config_value
from .losses import ALPHA, check_loss_arguments, loss_type, sigmoid_classification_loss

__all__ = ["ClassificationLoss"]

logger = logging.getLogger(__name__)


def _fused_kernel_runs_on(logits):
    """CUDA logits; or CPU ones where d2_focalstar.fused was imported to run in Triton's
    interpreter (the tests); never on a CPU without that (a laptop may lack Triton)."""
    if logits.is_cuda:
        return True
    fused = sys.modules.get(f"{__package__}.fused")
    return fused is not None and fused.INTERPRETED


class ClassificationLoss:
    """The summed sigmoid classification loss of one setting (type, alpha, the type's parameters)."""

    def __init__(self, num_classes, loss_type="FLSTAR", alpha=ALPHA.default, params=None,
                 fused_kernel=True):
        """
        Args:
            num_classes: K, the number of foreground classes.
            loss_type, alpha, params: as :func:`d2_focalstar.losses.sigmoid_classification_loss`
                takes them (``params`` a dict of the type's parameters; defaults from the table).
            fused_kernel: use the fused kernel where it runs (CUDA; Triton's interpreter in the
                tests) and the type has a branch in it.
        """
        self.num_classes = num_classes
        self.entry, self.params = check_loss_arguments(loss_type, alpha, params or {})
        self.alpha = alpha
        self.fused_kernel = fused_kernel
        self._told_no_kernel = False

    @classmethod
    def from_config(cls, cfg, head, num_classes):
        """The loss that ``cfg`` sets for the detector whose config node is ``head``
        ('MODEL.RETINANET', 'MODEL.FCOS'): MODEL.FOCALSTAR.LOSS_TYPE, the type's parameters from
        their keys in the table ('{head}' in a key is ``head``), alpha from
        ``head``.FOCAL_LOSS_ALPHA. Checks the config first (ConfigError naming a bad key)."""
        check_focalstar_config(cfg)
        entry = loss_type(cfg.MODEL.FOCALSTAR.LOSS_TYPE)
        params = {p.name: config_value(cfg, p.config_key(head)) for p in entry.params}
        return cls(num_classes, entry.name, config_value(cfg, ALPHA.config_key(head)), params,
                   cfg.MODEL.FOCALSTAR.FUSED_KERNEL)

    def __repr__(self):
        params = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"ClassificationLoss({self.entry.name}, alpha={self.alpha:g}{', ' + params if params else ''})"

    def uses_kernel(self, logits):
        """Whether the fused kernel computes the loss of these logits (after its self-check)."""
        if not (self.fused_kernel and _fused_kernel_runs_on(logits)):
            return False
        if self.entry.kernel is None:
            if not self._told_no_kernel:
                logger.info(f"{self.entry.name} has no fused-kernel branch: the reference "
                            "functions compute it on the GPU")
                self._told_no_kernel = True
            return False
        # once per process and setting, on this device and dtype: a kernel that this GPU or
        # Triton version gets wrong is not used (fused.agrees_with_reference warns)
        from .fused import agrees_with_reference

        return agrees_with_reference(logits.device, logits.dtype, self.num_classes, self.entry.name,
                                     self.alpha, self.params)

    def __call__(self, logits, labels):
        """
        Args:
            logits: (R, K) class logits, any float dtype.
            labels: (R,) integers: 0..K-1 the anchor's class, K background, -1 ignored.
        Returns:
            fp32 scalar (fp64 for fp64 logits), the loss summed over anchors and classes.
        """
        if self.uses_kernel(logits):
            from .fused import fused_classification_loss  # needs Triton: imported only here

            return fused_classification_loss(logits, labels, self.entry.name, self.alpha, **self.params)
        valid = labels >= 0
        # one-hot without the background column: background anchors are all-negative rows
        targets = F.one_hot(labels[valid], num_classes=self.num_classes + 1)[:, :-1]
        return sigmoid_classification_loss(logits[valid], targets, self.entry.name, self.alpha,
                                           "sum", **self.params)
