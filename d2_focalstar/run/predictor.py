"""
detectron2's DefaultPredictor with the weights read by SafeCheckpointer: one model, one image in,
its predictions out, on the config's MODEL.DEVICE (CUDA or CPU).
"""

import logging

from detectron2.engine import DefaultPredictor

from .checkpoint import SafeCheckpointer

__all__ = ["SafePredictor"]


class SafePredictor(DefaultPredictor):
    """
    ``DefaultPredictor(cfg)``, but the weights (``weights``, else cfg.MODEL.WEIGHTS) are loaded by
    :class:`SafeCheckpointer`: a file that would run code is refused, one that is no checkpoint,
    lacks part of the detector (backbone weights, other classes) or holds NaN/inf weights is a
    one-line error, never a model with random heads or one that detects nothing.
    """

    def __init__(self, cfg, weights=None):
        weights = weights or cfg.MODEL.WEIGHTS
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""  # DefaultPredictor's own checkpointer loads nothing...
        fvcore_logger = logging.getLogger("fvcore.common.checkpoint")
        level = fvcore_logger.level
        fvcore_logger.setLevel(logging.WARNING)  # ...without saying "initializing from scratch"
        try:
            super().__init__(unloaded)
        finally:
            fvcore_logger.setLevel(level)
        self.weights = weights
        checkpointer = SafeCheckpointer(self.model)
        checkpointer.load(weights)
        checkpointer.require_all_weights()
        checkpointer.require_finite_weights()
