"""
The classification loss of a dense detector, independent of the detector.

A :class:`ClassificationLoss` takes logits (R, K) and integer labels (R,) (0..K-1 a class, K
background, -1 ignored) and returns the loss summed over anchors and classes, for any type of the
loss table (d2_focalstar/modeling/losses.py). It chooses the fused Triton kernel
(d2_focalstar/modeling/fused.py) where it can run and has a branch for the type, after checking it
once per device, dtype and setting against the float64 reference; elsewhere the reference
functions. RetinaNetFLStar and FCOSFLStar call it from their ``losses()``; each builds it from its
own config node.
"""

import logging
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from .losses import ALPHA, check_loss_arguments, loss_setting, sigmoid_classification_loss

if TYPE_CHECKING:
    from detectron2.config import CfgNode
    from detectron2.modeling.meta_arch.dense_detector import DenseDetector

__all__ = ["ClassificationLoss", "add_classification_loss"]

logger = logging.getLogger(__name__)


def _fused_kernel_runs_on(logits: torch.Tensor) -> bool:
    """CUDA logits; or CPU ones where d2_focalstar.modeling.fused was imported to run in Triton's
    interpreter (the tests); never on a CPU without that (a laptop may lack Triton)."""
    if logits.is_cuda:
        return True
    fused = sys.modules.get(f"{__package__}.fused")
    return fused is not None and fused.INTERPRETED


class ClassificationLoss:
    """The summed sigmoid classification loss of one setting (type, alpha, the type's
    parameters)."""

    def __init__(
        self,
        num_classes: int,
        loss_type: str = "FLSTAR",
        alpha: float = ALPHA.default,
        params: Optional[Mapping[str, Optional[float]]] = None,
        fused_kernel: bool = True,
        compile_on_cpu: bool = False,
    ) -> None:
        """
        Args:
            num_classes: K, the number of foreground classes.
            loss_type, alpha, params: as
                :func:`d2_focalstar.modeling.losses.sigmoid_classification_loss` takes them
                (``params`` a dict of the type's parameters; defaults from the table).
            fused_kernel: use the fused kernel where it runs (CUDA; Triton's interpreter in the
                tests) and the type has a branch in it.
            compile_on_cpu: compute CPU logits' loss with the reference functions compiled by
                ``torch.compile`` (MODEL.FOCALSTAR.COMPILE_LOSS); uncompiled, with one warning,
                where they cannot be compiled.
        """
        self.num_classes = num_classes
        self.entry, self.params = check_loss_arguments(loss_type, alpha, params or {})
        self.alpha = alpha
        self.fused_kernel = fused_kernel
        self.compile_on_cpu = compile_on_cpu
        self._compiled: Optional[Callable[..., torch.Tensor]] = None
        self._told_no_kernel = False

    @classmethod
    def from_config(cls, cfg: "CfgNode", node: str, num_classes: int) -> "ClassificationLoss":
        """The loss that ``cfg`` sets for the detector whose config node is ``node``
        ('MODEL.RETINANET', 'MODEL.FCOS'): :func:`d2_focalstar.modeling.losses.loss_setting`.
        A bad value is a ValueError naming it (the command line checks the whole config before,
        with the keys' names: d2_focalstar.config.check_focalstar_config)."""
        setting = loss_setting(cfg, node)
        return cls(
            num_classes,
            setting.loss_type,
            setting.alpha,
            setting.params,
            cfg.MODEL.FOCALSTAR.FUSED_KERNEL,
            cfg.MODEL.FOCALSTAR.COMPILE_LOSS,
        )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return (
            f"ClassificationLoss({self.entry.name}, alpha={self.alpha:g}"
            f"{', ' + params if params else ''})"
        )

    def uses_kernel(self, logits: torch.Tensor) -> bool:
        """Whether the fused kernel computes the loss of these logits (after its self-check)."""
        if not (self.fused_kernel and _fused_kernel_runs_on(logits)):
            return False
        if self.entry.kernel is None:
            if not self._told_no_kernel:
                logger.info(
                    f"{self.entry.name} has no fused-kernel branch: the reference "
                    "functions compute it on the GPU"
                )
                self._told_no_kernel = True
            return False
        # once per process and setting, on this device and dtype: a kernel that this GPU or
        # Triton version gets wrong is not used (fused.agrees_with_reference warns)
        from .fused import agrees_with_reference

        return agrees_with_reference(
            logits.device, logits.dtype, self.num_classes, self.entry.name, self.alpha, self.params
        )

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: (R, K) class logits, any float dtype.
            labels: (R,) integers: 0..K-1 the anchor's class, K background, -1 ignored.
        Returns:
            fp32 scalar (fp64 for fp64 logits), the loss summed over anchors and classes.
        """
        if self.uses_kernel(logits):
            from .fused import checked_fused_loss  # needs Triton: imported only here

            # the arguments were checked once, in __init__
            return checked_fused_loss(logits, labels, self.entry, self.alpha, self.params)
        valid = labels >= 0
        # one-hot without the background column: background anchors are all-negative rows
        targets = F.one_hot(labels[valid], num_classes=self.num_classes + 1)[:, :-1]
        args = (logits[valid], targets, self.entry.name, self.alpha, "sum")
        if self.compile_on_cpu and not logits.is_cuda:
            return self._compiled_loss(*args)
        return sigmoid_classification_loss(*args, **self.params)

    def _compiled_loss(self, *args: Any) -> torch.Tensor:
        if self._compiled is None:
            # dynamic shapes: the number of valid anchors changes every step
            self._compiled = torch.compile(sigmoid_classification_loss, dynamic=True)
        if self._compiled is not sigmoid_classification_loss:
            try:
                return self._compiled(*args, **self.params)
            except Exception as e:  # noqa: BLE001  (inductor's errors have no common base)
                logger.warning(
                    f"MODEL.FOCALSTAR.COMPILE_LOSS: torch.compile cannot compile the loss here "
                    f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); the "
                    "uncompiled functions compute it (same numbers, slower)"
                )
                self._compiled = sigmoid_classification_loss
        return sigmoid_classification_loss(*args, **self.params)


def add_classification_loss(
    detector: "DenseDetector",
    cls_loss: Optional[ClassificationLoss] = None,
    channels_last: bool = False,
) -> None:
    """What RetinaNetFLStar's and FCOSFLStar's ``__init__`` add to their parent's: ``cls_loss``
    (None: FL with the detector's ``focal_loss_alpha`` and ``focal_loss_gamma``, its parent's
    loss) as ``detector.cls_loss``, and the channels_last layout of its weights if asked."""
    detector.cls_loss = cls_loss or ClassificationLoss(
        detector.num_classes, "FL", detector.focal_loss_alpha, {"gamma": detector.focal_loss_gamma}
    )
    if channels_last:
        detector.to(memory_format=torch.channels_last)
