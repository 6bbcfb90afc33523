"""
The one-line errors of the project's commands: ``<program>: error: <message>`` on stderr and exit
status 1 (130 for Ctrl-C), never a traceback for a fault of the input. The format is written by
``error_line`` and read back by ``reported_message`` (the SLURM job reads train_net.py's reason
from its stderr); nothing else spells it.
"""
import contextlib
import sys

__all__ = ["error_line", "reported_message", "reported_errors", "command_errors", "interrupted_message"]

_FORMAT = "{program}: error: {message}"


def error_line(program, message):
    """The line a command ends with when it fails: 'train_net.py: error: <message>'."""
    return _FORMAT.format(program=program, message=message)


def reported_message(line, program):
    """The message of ``program``'s error line ``line``, or None if it is not one."""
    prefix = error_line(program, "")
    line = line.strip()
    return line[len(prefix):] if line.startswith(prefix) else None


def reported_errors():
    """The exception types that train_net.py reports in one line (their message says what to
    do), from any of its processes."""
    from ..config import ConfigError
    from ..data.mapper import EvaluationImageError
    from .checkpoint import CheckpointReadError, UnsafeCheckpointError
    from .processes import ProcessFailed
    from .training import EvaluationFailed, TrainingDiverged

    return (ConfigError, TrainingDiverged, EvaluationFailed, EvaluationImageError,
            UnsafeCheckpointError, CheckpointReadError, ProcessFailed)


def interrupted_message(cfg, eval_only):
    """The line for Ctrl-C: where the run stands and how to go on."""
    from .checkpoint import last_checkpoint

    if eval_only:
        return "interrupted (Ctrl-C) before the evaluation finished: no results.json written"
    last = last_checkpoint(cfg.OUTPUT_DIR)
    return (f"interrupted (Ctrl-C); the last checkpoint is {last}: continue with --resume" if last
            else f"interrupted (Ctrl-C) before the first checkpoint in {cfg.OUTPUT_DIR}: "
                 "run the command again to start over")


class _Command:
    cfg = None  # set once the config is loaded: the Ctrl-C line then says where the run stands


@contextlib.contextmanager
def command_errors(program, eval_only=False):
    """Around a command's work: an error of ``reported_errors()`` becomes its one line and exit
    status 1; Ctrl-C one line saying how to go on (set ``.cfg`` on what this yields once the
    config is loaded) and status 130."""
    command = _Command()
    try:
        yield command
    except reported_errors() as e:
        sys.exit(error_line(program, e))
    except KeyboardInterrupt:
        why = interrupted_message(command.cfg, eval_only) if command.cfg is not None else "interrupted"
        print(error_line(program, why), file=sys.stderr)
        sys.exit(130)
