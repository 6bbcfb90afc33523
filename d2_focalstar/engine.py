"""
What train_net.py needs around detectron2's engine: the pre-launch weights check, the seed drawn
once for every process, multi-process CPU runs, the project's log lines, and an informative stop
when training diverges.
"""
import logging
import os

from detectron2.engine import defaults
from detectron2.utils.logger import setup_logger

from .checkpoint import SafeCheckpointer, check_checkpoint_file, last_checkpoint
from .config import config_value, loss_config_node
from .losses import loss_type

logger = logging.getLogger(__name__)

__all__ = ["TrainingDiverged", "enable_cpu_ddp", "divergence_message", "setup_project_logger",
           "draw_seed", "check_weights_file"]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the message says where and what to change."""


def check_weights_file(cfg, eval_only, resume, num_processes):
    """Before any process starts, read the weights the run will load (the last checkpoint with
    --resume, else MODEL.WEIGHTS) through the same safe loaders; for --eval-only also load them
    into the model (on the CPU) and require all of its weights. A bad file is then one line with
    nothing written, however many processes. Training in one process skips it (it reports a bad
    file in one line anyway, and need not read a large file twice). URLs are left to
    detectron2's download in the run."""
    last = last_checkpoint(cfg.OUTPUT_DIR) if resume else None
    path = last or cfg.MODEL.WEIGHTS
    if not path or "://" in path:
        return
    if eval_only:
        from detectron2.modeling import build_model

        cpu = cfg.clone()
        cpu.defrost()
        cpu.MODEL.DEVICE = "cpu"
        checkpointer = SafeCheckpointer(build_model(cpu))
        checkpointer.logger = _quiet  # the run itself logs what it loads
        checkpointer.load(path)
        checkpointer.require_all_weights()
    elif num_processes > 1:
        check_checkpoint_file(path)


_quiet = logging.getLogger(__name__ + ".precheck")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def draw_seed(args, cfg):
    """With SEED < 0 (detectron2's "a different seed each run"), draw the seed here, once, and put
    it on ``args.opts`` for every process, so that config.yaml and results.json record the seed
    the run used instead of -1. Not on several machines: each would draw its own, and the one
    recorded would not repeat the run; there SEED stays -1 (detectron2's own draw)."""
    if cfg.SEED < 0 and args.num_machines == 1:
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
        args.opts = list(args.opts) + ["SEED", str(seed)]
        cfg.defrost()
        cfg.SEED = seed


def setup_project_logger(output_dir=None, rank=0):
    """Log this package's messages (dataset generation, data faults, safety metrics, results) like
    detectron2's own: to the console on rank 0, and to OUTPUT_DIR/log.txt when ``output_dir`` is
    given. Replaces what an earlier call set up, so that no line is printed twice."""
    project = logging.getLogger("d2_focalstar")
    for handler in list(project.handlers):
        project.removeHandler(handler)
    # detectron2's setup_logger caches its calls; the function under the cache always acts
    return setup_logger.__wrapped__(output_dir, distributed_rank=rank, name="d2_focalstar")


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


def divergence_message(cfg, iteration, error, last_checkpoint):
    """What to tell the user when the loss or the weights stop being finite: the settings that
    control the growth for this loss type (its parameters in the loss table), and what to
    change."""
    solver, clip = cfg.SOLVER, cfg.SOLVER.CLIP_GRADIENTS
    entry = loss_type(cfg.MODEL.FOCALSTAR.LOSS_TYPE)
    head = loss_config_node(cfg) or "MODEL.RETINANET"
    loss_keys = "".join(
        f"{p.config_key(head)}={config_value(cfg, p.config_key(head))}"
        + (" (0 = uncapped)" if entry.capped and p.name == "max_factor" else "") + ", "
        for p in entry.params)
    advice = ["lower SOLVER.BASE_LR or lengthen SOLVER.WARMUP_ITERS"]
    if entry.capped:
        advice.append(f"lower MODEL.FOCALSTAR.MAX_FACTOR or the gamma ({entry.name}'s factor grows "
                      "with both)")
    advice.append("lower SOLVER.CLIP_GRADIENTS.CLIP_VALUE" if clip.ENABLED
                  else "enable gradient clipping (SOLVER.CLIP_GRADIENTS.ENABLED True)")
    return (
        f"Training diverged at iteration {iteration}: {error}\n"
        f"  Settings that control the growth: MODEL.FOCALSTAR.LOSS_TYPE={entry.name}, {loss_keys}"
        f"SOLVER.BASE_LR={solver.BASE_LR}, SOLVER.WARMUP_ITERS={solver.WARMUP_ITERS}, "
        f"SOLVER.CLIP_GRADIENTS.ENABLED={clip.ENABLED} (CLIP_VALUE={clip.CLIP_VALUE}), "
        f"SOLVER.AMP.ENABLED={solver.AMP.ENABLED}.\n"
        f"  Last good checkpoint: {last_checkpoint or 'none yet'}. Then: {'; '.join(advice)}; and "
        f"continue with --resume.")
