"""
The run machinery around detectron2's engine: a command line becoming one checked config
(``cli``), processes that launch, stop and die together (``processes``), one-line errors
(``errors``), the Trainer's pieces (``training``), checkpoints that are atomic and never run code
(``checkpoint``), a checkpoint on a scheduler's request (``preemption``), SLURM jobs (``slurm``),
the run's record, results.json (``results``), and inference on a checkpoint (``predictor``).
"""

from .checkpoint import (
    CheckpointReadError,
    SafeCheckpointer,
    UnsafeCheckpointError,
    last_checkpoint,
)
from .cli import check_output_dir, default_argument_parser_for, load_config, prepare_run
from .errors import command_errors, error_line, reported_errors
from .preemption import CheckpointOnSignal
from .processes import die_with_launcher, launch_processes
from .results import forget_divergence, load_run, read_metrics, run_state, write_results
from .training import (
    enable_cpu_ddp,
    project_hooks,
    quiet_reported_errors,
    setup_project_logger,
    training_errors,
)

__all__ = [
    "CheckpointReadError",
    "SafeCheckpointer",
    "UnsafeCheckpointError",
    "last_checkpoint",
    "check_output_dir",
    "default_argument_parser_for",
    "load_config",
    "prepare_run",
    "command_errors",
    "error_line",
    "reported_errors",
    "CheckpointOnSignal",
    "die_with_launcher",
    "launch_processes",
    "forget_divergence",
    "load_run",
    "read_metrics",
    "run_state",
    "write_results",
    "enable_cpu_ddp",
    "project_hooks",
    "quiet_reported_errors",
    "setup_project_logger",
    "training_errors",
]
