"""
What train_net.py's Trainer needs around detectron2's DefaultTrainer: multi-process CPU runs
(DistributedDataParallel without device ids), the project's log lines, and informative stops when
training diverges or cannot evaluate (one line saying what to change and what was kept).
"""

import contextlib
import logging
import os

from detectron2.engine import defaults
from detectron2.utils.logger import setup_logger

from ..modeling import loss_config_node
from ..modeling.losses import LOSS_TYPES, loss_setting

__all__ = [
    "TrainingDiverged",
    "EvaluationFailed",
    "enable_cpu_ddp",
    "divergence_message",
    "setup_project_logger",
    "quiet_reported_errors",
    "training_errors",
    "project_hooks",
]

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the message says where and what to change."""


class EvaluationFailed(RuntimeError):
    """The evaluation at the end of a training failed; the message says what was kept."""


class _ReportedElsewhere(logging.Filter):
    def __init__(self, errors):
        super().__init__()
        self.errors = errors

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], self.errors))


def quiet_reported_errors(*errors):
    """Leave out detectron2's tracebacks ("Exception during training:", "Exception in writing
    metrics:") of the errors that train_net.py reports in a line of its own; by default those
    that ``training_errors`` turns into its one-line errors (a diverged loss, a test image that
    cannot be read)."""
    if not errors:
        from ..data.mapper import EvaluationImageError
        from .checkpoint import CheckpointWriteError

        errors = (FloatingPointError, EvaluationImageError, CheckpointWriteError)
    train_loop = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _ReportedElsewhere) for f in train_loop.filters):
        train_loop.addFilter(_ReportedElsewhere(tuple(errors)))


def setup_project_logger(output_dir=None, rank=0):
    """Log this package's messages (dataset generation, data faults, safety metrics, results) like
    detectron2's own: to the console on rank 0, and to OUTPUT_DIR/log.txt when ``output_dir`` is
    given. Replaces what an earlier call set up, so that no line is printed twice."""
    project = logging.getLogger("d2_focalstar")
    for handler in list(project.handlers):
        project.removeHandler(handler)
    # detectron2's setup_logger caches its calls; the function under the cache always acts
    return setup_logger.__wrapped__(output_dir, distributed_rank=rank, name="d2_focalstar")


def project_hooks(trainer, build_stock_hooks, fault_log):
    """train_net.py's Trainer hooks: detectron2's (``build_stock_hooks()``) with the trainer's
    checkpointer a SafeCheckpointer (atomic saves, no NaN weights saved, no code run when
    loading), the data-fault summary after training, every process waiting for rank 0's
    model_final before the final evaluation (only after the last step: after_train also runs
    when a rank fails, and must not wait then), and a checkpoint when a SLURM job is told to stop
    (preemption, time limit)."""
    import weakref

    import detectron2.utils.comm as comm
    from detectron2.engine import hooks

    from ..data.mapper import summarize_data_faults
    from .checkpoint import SafeCheckpointer
    from .preemption import CheckpointOnSignal

    trainer.checkpointer = SafeCheckpointer(
        trainer._trainer.model, trainer.cfg.OUTPUT_DIR, trainer=weakref.proxy(trainer)
    )
    faults = hooks.CallbackHook(after_train=lambda t: summarize_data_faults(fault_log))
    stock = build_stock_hooks()
    wait = hooks.CallbackHook(
        after_train=lambda t: comm.synchronize() if t.iter >= t.max_iter else None
    )
    stock.insert([isinstance(h, hooks.EvalHook) for h in stock].index(True), wait)
    return [faults] + stock + [CheckpointOnSignal(trainer.checkpointer)]


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
    setting = loss_setting(cfg, loss_config_node(cfg))
    entry = LOSS_TYPES[setting.loss_type]
    loss_keys = "".join(
        f"{key}={setting.params[name]}"
        + (" (0 = uncapped)" if entry.capped and name == "max_factor" else "")
        + ", "
        for name, key in setting.keys().items()
    )
    advice = ["lower SOLVER.BASE_LR or lengthen SOLVER.WARMUP_ITERS"]
    if entry.capped:
        advice.append(
            f"lower MODEL.FOCALSTAR.MAX_FACTOR or the gamma ({entry.name}'s factor grows with both)"
        )
    advice.append(
        "lower SOLVER.CLIP_GRADIENTS.CLIP_VALUE"
        if clip.ENABLED
        else "enable gradient clipping (SOLVER.CLIP_GRADIENTS.ENABLED True)"
    )
    return (
        f"Training diverged at iteration {iteration}: {error}\n"
        f"  Settings that control the growth: MODEL.FOCALSTAR.LOSS_TYPE={entry.name}, {loss_keys}"
        f"SOLVER.BASE_LR={solver.BASE_LR}, SOLVER.WARMUP_ITERS={solver.WARMUP_ITERS}, "
        f"SOLVER.CLIP_GRADIENTS.ENABLED={clip.ENABLED} (CLIP_VALUE={clip.CLIP_VALUE}), "
        f"SOLVER.AMP.ENABLED={solver.AMP.ENABLED}.\n"
        f"  Last good checkpoint: {last_checkpoint or 'none yet'}. Then: {'; '.join(advice)}; and "
        f"continue with --resume."
    )


@contextlib.contextmanager
def training_errors(trainer):
    """Around DefaultTrainer.train(): the loss or weights turning NaN/inf becomes TrainingDiverged
    (what to change, the last good checkpoint); a test image that cannot be read becomes
    EvaluationFailed, and after the last iteration the finished training's results.json is
    written first, recording the error."""
    import detectron2.utils.comm as comm

    from ..data.mapper import EvaluationImageError
    from .results import RESULTS_FILE, write_results

    def last():
        return (
            trainer.checkpointer.get_checkpoint_file()
            if trainer.checkpointer.has_checkpoint()
            else None
        )

    try:
        yield
    except FloatingPointError as e:
        if comm.is_main_process():  # the run's record: a diverged seed counts (table1.py)
            write_results(
                trainer.cfg,
                {},
                iteration=trainer.iter,
                diverged=(str(e).strip().splitlines() or [type(e).__name__])[0][:300],
            )
        raise TrainingDiverged(divergence_message(trainer.cfg, trainer.iter, e, last())) from None
    except EvaluationImageError as e:
        if trainer.iter < trainer.max_iter:  # a periodic evaluation (TEST.EVAL_PERIOD)
            resume = (
                f"last checkpoint: {last()}: continue with --resume"
                if last()
                else "no checkpoint yet: the same command starts over"
            )
            raise EvaluationFailed(
                f"{e}. Training stopped at iteration {trainer.iter}; {resume}"
            ) from None
        # the final one: the trained model is saved; the run's record says what failed
        write_results(
            trainer.cfg,
            {},
            iteration=min(trainer.iter, trainer.cfg.SOLVER.MAX_ITER),
            evaluation_error=str(e),
        )
        raise EvaluationFailed(
            f"{e}. The training finished: {last()} and "
            f"{os.path.join(trainer.cfg.OUTPUT_DIR, RESULTS_FILE)} (recording this error) are "
            f"written; once the image is fixed, the same command with --resume evaluates it and "
            f"completes the record"
        ) from None
