"""
A checkpoint on request: what a SLURM job (d2_focalstar/run/slurm.py) asks of the training it runs
when the scheduler is about to stop it (preemption, the time limit), so that the requeued job
loses no more than the iteration under way.

The request is submitit's preemption signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says
otherwise), sent to the training's processes. The hook below sets a flag when it arrives; after
the step under way, the main process saves ``model_<iteration>.pth`` and ``last_checkpoint`` the
way the periodic checkpointer does (whole files, renamed into place). The training goes on
until the scheduler stops it; the requeued job resumes from that checkpoint
(docs/CLUSTER.md).
"""

import logging
import os
import signal
import threading

from detectron2.engine import HookBase

__all__ = ["CheckpointOnSignal", "preemption_signal"]

logger = logging.getLogger(__name__)


def preemption_signal():
    """The signal submitit sends before a job is stopped (its SUBMITIT_PREEMPT_SIGNAL, default
    USR2); a ConfigError for a value that names no signal."""
    from ..config import ConfigError

    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    found = getattr(signal, "SIG" + name, None)
    if (
        not isinstance(found, signal.Signals)
        or name.startswith("_")
        or found in (signal.SIGKILL, signal.SIGSTOP)
    ):
        raise ConfigError(
            f"SUBMITIT_PREEMPT_SIGNAL={name!r} names no signal a job can catch: allowed a name "
            "without SIG, e.g. USR2 (the default), USR1, TERM"
        )
    return found


class CheckpointOnSignal(HookBase):
    """Save a checkpoint after the step during which the preemption signal arrived."""

    def __init__(self, checkpointer, signum=None):
        self.checkpointer = checkpointer
        self.signum = signum or preemption_signal()
        self._requested = False
        self._previous = None

    def _request(self, signum, frame):
        self._requested = True

    def before_train(self):
        # before the data loader's workers are forked: they inherit the handler and, receiving
        # the signal with the rest of the job's processes, set their own flag instead of dying
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._request)

    def after_train(self):
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def after_step(self):
        if not self._requested:
            return
        self._requested = False
        iteration = self.trainer.iter
        if iteration + 1 >= self.trainer.max_iter:
            return  # the last step: model_final.pth is being written anyway
        name = f"model_{iteration:07d}"
        last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""
        if os.path.basename(last) != f"{name}.pth":  # not just saved by the periodic checkpointer
            self.checkpointer.save(name, iteration=iteration)  # only the main process writes
        what = (
            "the job is being stopped; it is requeued and resumes from it"
            if os.environ.get("SLURM_JOB_ID")
            else "not a SLURM job: nothing stops it, the training goes on; "
            "--resume would continue from it"
        )
        logger.info(
            f"Checkpoint {name}.pth saved at iteration {iteration} on "
            f"{signal.Signals(self.signum).name} ({what})"
        )
