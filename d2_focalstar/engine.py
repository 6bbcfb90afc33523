"""Small fixes to detectron2's engine so that the same train_net.py runs on a laptop CPU."""
import logging

import torch
from detectron2.engine import defaults

logger = logging.getLogger(__name__)


def fall_back_to_cpu(cfg):
    """Switch a CUDA config to MODEL.DEVICE=cpu, with a warning, on a machine without CUDA."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available: using the CPU")
        cfg.MODEL.DEVICE = "cpu"


def enable_cpu_ddp():
    """
    DefaultTrainer wraps the model in DistributedDataParallel(device_ids=[local_rank]), which
    torch rejects for a model on the CPU. Let it pass device_ids=None for CPU models, so that
    multi-process CPU runs (gloo, as detectron2's launch picks without a GPU) work.
    """
    create = defaults.create_ddp_model
    if getattr(create, "_d2_focalstar_cpu_ok", False):
        return

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return create(model, **kwargs)

    create_ddp_model._d2_focalstar_cpu_ok = True
    defaults.create_ddp_model = create_ddp_model
