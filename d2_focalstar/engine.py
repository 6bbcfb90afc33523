"""
What train_net.py needs around detectron2's engine: the pre-launch weights check, the seed drawn
once for every process, launching processes that cannot outlive the launcher and whose one-line
errors stay one line, multi-process CPU runs, the project's log lines, and informative stops
when training diverges, is interrupted, or cannot evaluate.
"""
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import tempfile

from detectron2.engine import defaults, launch
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from .checkpoint import SafeCheckpointer, check_checkpoint_file, last_checkpoint
from .config import config_value, loss_config_node
from .losses import loss_type

logger = logging.getLogger(__name__)

__all__ = ["TrainingDiverged", "EvaluationFailed", "ProcessFailed", "enable_cpu_ddp",
           "divergence_message", "setup_project_logger", "draw_seed", "check_weights_file",
           "launch_processes", "die_with_launcher", "quiet_reported_errors", "interrupted_message",
           "training_errors", "run_command"]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the message says where and what to change."""


class EvaluationFailed(RuntimeError):
    """The evaluation at the end of a training failed; the message says what was kept."""


class ProcessFailed(RuntimeError):
    """A process that launch_processes started ended with an error; the message is its line."""


# ---- processes ----------------------------------------------------------------------------------

_LAUNCHER_PID = "D2_FOCALSTAR_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher():
    """Call it first in a process that launch_processes started (train_net.py imported as
    __mp_main__): the kernel kills it when the launching process dies, however that dies
    (SIGKILL, the OOM killer), and if the launcher died before this ran, it exits now. torch's
    spawn later sets SIGINT as that signal, which a process blocked in C++ (a rendezvous, a
    collective) would never act on, so SIGINT ends these processes at once too: Ctrl-C stops
    every process without a traceback from each. Linux only; elsewhere nothing changes."""
    launcher = os.environ.get(_LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.getppid() != int(launcher):  # orphaned already: the launcher is gone
        os._exit(1)
    os.environ[_LAUNCHER_PID] = str(os.getpid())  # for the processes this one spawns in turn


class _ProcessMain:
    """main(*args) in a process of launch(): an error of ``one_line`` is written to
    <folder>/<local rank> for the launcher to report, and the process exits 1 without a
    traceback."""

    def __init__(self, main, folder, one_line):
        self.main, self.folder, self.one_line = main, folder, one_line

    def __call__(self, *args):
        import detectron2.utils.comm as comm

        try:
            return self.main(*args)
        except self.one_line as e:
            with open(os.path.join(self.folder, str(comm.get_local_rank())), "w") as f:
                f.write(str(e))
            sys.exit(1)


def launch_processes(main, args, one_line=()):
    """detectron2's ``launch(main, args.num_gpus, ...)`` for train_net.py's ``args``, with the
    launcher's pid in the environment for die_with_launcher. With several processes, an error of
    the types ``one_line`` in one of them becomes a ProcessFailed with its message here, and a
    process killed by a signal a ProcessFailed naming it; Ctrl-C here ends them all."""
    if args.num_gpus * args.num_machines == 1:  # main runs in this process
        return launch(main, 1, args=(args,))
    os.environ[_LAUNCHER_PID] = str(os.getpid())
    with tempfile.TemporaryDirectory(prefix="d2_focalstar-errors-") as folder:
        try:
            launch(_ProcessMain(main, folder, tuple(one_line)), args.num_gpus,
                   num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,))
        except ProcessExitedException as e:
            if e.signal_name == "SIGINT":  # Ctrl-C reached them before it reached this process
                raise KeyboardInterrupt from None
            reported = os.path.join(folder, str(e.error_index))
            if os.path.isfile(reported):
                with open(reported) as f:
                    raise ProcessFailed(f.read()) from None
            how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with status {e.exit_code}"
            raise ProcessFailed(f"process {e.error_index} (pid {e.error_pid}) {how}"
                                + (" (out of memory?)" if e.signal_name == "SIGKILL" else "")
                                + "; the others were stopped") from None
        except KeyboardInterrupt:
            for child in multiprocessing.active_children():  # those still running, if any
                child.kill()
            raise


def interrupted_message(cfg, eval_only):
    """The line for Ctrl-C: where the run stands and how to go on."""
    if eval_only:
        return "interrupted (Ctrl-C) before the evaluation finished: no results.json written"
    last = last_checkpoint(cfg.OUTPUT_DIR)
    return (f"interrupted (Ctrl-C); the last checkpoint is {last}: continue with --resume" if last
            else f"interrupted (Ctrl-C) before the first checkpoint in {cfg.OUTPUT_DIR}: "
                 "run the command again to start over")


class _ReportedElsewhere(logging.Filter):
    def __init__(self, errors):
        super().__init__()
        self.errors = errors

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], self.errors))


def quiet_reported_errors(*errors):
    """Leave out detectron2's tracebacks ("Exception during training:", "Exception in writing
    metrics:") of the errors that train_net.py reports in a line of its own."""
    train_loop = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _ReportedElsewhere) for f in train_loop.filters):
        train_loop.addFilter(_ReportedElsewhere(tuple(errors)))


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
        checkpointer.require_finite_weights()
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


@contextlib.contextmanager
def training_errors(trainer):
    """Around DefaultTrainer.train(): the loss or weights turning NaN/inf becomes TrainingDiverged
    (what to change, the last good checkpoint); a test image that cannot be read becomes
    EvaluationFailed, and after the last iteration the finished training's results.json is
    written first, recording the error."""
    from .mapper import EvaluationImageError
    from .results import RESULTS_FILE, write_results

    def last():
        return trainer.checkpointer.get_checkpoint_file() if trainer.checkpointer.has_checkpoint() else None

    try:
        yield
    except FloatingPointError as e:
        raise TrainingDiverged(divergence_message(trainer.cfg, trainer.iter, e, last())) from None
    except EvaluationImageError as e:
        if trainer.iter < trainer.max_iter:  # a periodic evaluation (TEST.EVAL_PERIOD)
            resume = (f"last checkpoint: {last()}: continue with --resume" if last() else
                      "no checkpoint yet: the same command starts over")
            raise EvaluationFailed(f"{e}. Training stopped at iteration {trainer.iter}; {resume}") from None
        # the final one: the trained model is saved; the run's record says what failed
        write_results(trainer.cfg, {}, iteration=min(trainer.iter, trainer.cfg.SOLVER.MAX_ITER),
                      evaluation_error=str(e))
        raise EvaluationFailed(
            f"{e}. The training finished: {last()} and "
            f"{os.path.join(trainer.cfg.OUTPUT_DIR, RESULTS_FILE)} (recording this error) are "
            f"written; once the image is fixed, the same command with --resume evaluates it and "
            f"completes the record") from None


def run_command(main, args, config_of, program="train_net.py"):
    """train_net.py's command: once, before any process starts, the config (``config_of(args)``),
    the output folder, the seed, the datasets and the weights are checked, and partial files of a
    killed run removed; then ``main(args)`` runs in ``args.num_gpus`` x ``args.num_machines``
    processes (detectron2's launch). A project error from any of them, or from the checks, is one
    line and exit status 1; Ctrl-C is one line saying how to go on, status 130."""
    from .checkpoint import CheckpointReadError, UnsafeCheckpointError
    from .config import ConfigError, check_output_dir
    from .data import check_datasets, register_coco_json_datasets
    from .fileio import remove_partial_writes
    from .mapper import EvaluationImageError

    one_line = (ConfigError, TrainingDiverged, EvaluationFailed, EvaluationImageError,
                UnsafeCheckpointError, CheckpointReadError)
    cfg = None
    try:
        setup_project_logger()
        cfg = config_of(args)
        check_output_dir(cfg)
        draw_seed(args, cfg)  # SEED -1: one seed for all processes, recorded in the run's files
        register_coco_json_datasets(cfg)
        check_datasets(cfg, train=not args.eval_only)  # evaluation needs only DATASETS.TEST
        # several processes: a bad weights file is one line, not N tracebacks
        check_weights_file(cfg, args.eval_only, args.resume, args.num_gpus * args.num_machines)
        remove_partial_writes(cfg.OUTPUT_DIR)  # left by a run killed while saving
        launch_processes(main, args, one_line=one_line)
    except one_line + (ProcessFailed,) as e:
        sys.exit(f"{program}: error: {e}")
    except KeyboardInterrupt:
        print(f"{program}: error: {interrupted_message(cfg, args.eval_only) if cfg else 'interrupted'}",
              file=sys.stderr)
        sys.exit(130)
