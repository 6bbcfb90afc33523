"""
The one-line errors of the project's commands: ``<program>: error: <message>`` on stderr and exit
status 1 (130 for Ctrl-C), never a traceback for a fault of the input. The format is written by
``error_line`` and read back by ``reported_message`` (the SLURM job reads train_net.py's reason
from its stderr); nothing else spells it.
"""

import contextlib
import logging
import signal
import sys
import threading

__all__ = [
    "error_line",
    "reported_message",
    "reported_errors",
    "command_errors",
    "interrupted_message",
    "Terminated",
    "raise_terminated",
    "warnings_on_stderr",
]

_FORMAT = "{program}: error: {message}"


def error_line(program, message):
    """The line a command ends with when it fails: 'train_net.py: error: <message>'."""
    return _FORMAT.format(program=program, message=message)


@contextlib.contextmanager
def warnings_on_stderr():
    """While a study tool runs, the package's warnings (a damaged metrics.json, a run left out)
    as plain lines on stderr, whatever else configured logging: its stdout is the table."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    project = logging.getLogger("d2_focalstar")
    project.addHandler(handler)
    try:
        yield
    finally:
        project.removeHandler(handler)


def reported_message(line, program):
    """The message of ``program``'s error line ``line``, or None if it is not one."""
    prefix = error_line(program, "")
    line = line.strip()
    return line[len(prefix) :] if line.startswith(prefix) else None


def reported_errors():
    """The exception types that train_net.py reports in one line (their message says what to
    do), from any of its processes."""
    from ..config import ConfigError
    from ..data.mapper import EvaluationImageError
    from ..modeling.cached_trunk import FeatureCacheError
    from .checkpoint import CheckpointReadError, CheckpointWriteError, UnsafeCheckpointError
    from .processes import ProcessFailed
    from .training import EvaluationFailed, TrainingDiverged

    return (
        ConfigError,
        TrainingDiverged,
        EvaluationFailed,
        EvaluationImageError,
        UnsafeCheckpointError,
        CheckpointReadError,
        CheckpointWriteError,
        ProcessFailed,
        FeatureCacheError,
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler, timeout) raised the way Ctrl-C is, so that a command stops
    with a line saying where it stands instead of dying without a word."""


def raise_terminated(signum, frame):
    raise Terminated


def interrupted_message(cfg, eval_only, how="interrupted (Ctrl-C)"):
    """The line for Ctrl-C (or, with ``how``, SIGTERM): where the run stands and how to go on."""
    from .checkpoint import last_checkpoint

    if eval_only:
        return f"{how} before the evaluation finished: no results.json written"
    last = last_checkpoint(cfg.OUTPUT_DIR)
    return (
        f"{how}; the last checkpoint is {last}: continue with --resume"
        if last
        else f"{how} before the first checkpoint in {cfg.OUTPUT_DIR}: "
        "run the command again to start over"
    )


class _Command:
    cfg = None  # set once the config is loaded: the Ctrl-C line then says where the run stands


@contextlib.contextmanager
def command_errors(program, eval_only=False):
    """Around a command's work: an error of ``reported_errors()`` becomes its one line and exit
    status 1; Ctrl-C one line saying how to go on (set ``.cfg`` on what this yields once the
    config is loaded) and status 130; SIGTERM the same line and status 143 (128 + 15, as a
    process killed by it)."""
    command = _Command()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    # a background job of a non-interactive shell (`cmd &` in a script, a CI runner) starts with
    # SIGINT ignored, and Python then leaves it so: Ctrl-C, and the SIGINT by which a local
    # SLURM job stops its trainings, would do nothing while checkpoints pile up
    ignored_int = main_thread and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored_int:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield command
    except reported_errors() as e:
        sys.exit(error_line(program, e))
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        why = (
            interrupted_message(command.cfg, eval_only, how)
            if command.cfg is not None
            else how.split(" (")[0]
        )
        print(error_line(program, why), file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    finally:
        if main_thread:  # None: a handler not set from Python, i.e. the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if ignored_int:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
