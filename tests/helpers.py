"""Shared by the end-to-end tests: run the repo's commands, as processes or in this one."""

import contextlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = ["--config-file", "configs/quickstart_flstar.yaml"]
# A few seconds of CPU training: small batches, frequent checkpoints, no evaluation.
FAST = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "DATASETS.TEST",
    "()",
]


def run(script, *args, timeout=600, check=None):
    """Run a script of the repo (or tests/) with the venv's Python; returns CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    proc.output = proc.stdout + proc.stderr
    if check is not None:
        assert (proc.returncode == 0) == check, proc.output[-5000:]
    return proc


_ENTRY_POINTS = {}


def _entry_point(script):
    """The function a script's ``__main__`` calls, taking argv: train_net.py's command, demo.py's
    and every tool's main."""
    if script not in _ENTRY_POINTS:
        name = os.path.splitext(os.path.basename(script))[0]
        if os.path.dirname(script):  # tools/: loaded from its file
            spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, script))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            # the repo root is on sys.path (conftest.py): the module that spawned processes import
            module = importlib.import_module(name)
        if script == "train_net.py":
            _ENTRY_POINTS[script] = lambda argv: module.command(
                module.argument_parser().parse_args(argv)
            )
        else:
            _ENTRY_POINTS[script] = module.main
    return _ENTRY_POINTS[script]


# the loggers that detectron2's setup_logger and the commands set up: as in a new process, each
# call starts without their handlers, and those it makes are closed after it
_LOGGERS = ("detectron2", "d2", "fvcore", "d2_focalstar", "demo")


@contextlib.contextmanager
def _fresh_loggers():
    from detectron2.utils.logger import setup_logger

    saved = {name: logging.getLogger(name).handlers[:] for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).handlers.clear()
    setup_logger.cache_clear()
    try:
        yield
    finally:
        for name, handlers in saved.items():
            for handler in logging.getLogger(name).handlers:
                handler.close()
            logging.getLogger(name).handlers[:] = handlers
        setup_logger.cache_clear()


@contextlib.contextmanager
def _kernel_interpreter(on):
    """Whether the fused kernel runs in Triton's interpreter on CPU tensors during the call. This
    process has it on (conftest.py) for the kernel's own tests; a command run as a process of its
    own has it off (a user's CPU run computes the loss with the reference functions, ~100x
    faster than the interpreted kernel)."""
    fused = sys.modules.get("d2_focalstar.modeling.fused")
    if fused is None:
        yield
        return
    saved, fused.INTERPRETED = fused.INTERPRETED, on and fused.INTERPRETED
    try:
        yield
    finally:
        fused.INTERPRETED = saved


def run_here(script, *args, check=None, interpreter=False):
    """What ``run`` gives, but the script's entry point called in this process, from the repo
    root: for tests where a process of its own (~6 s of imports each) proves nothing more. What
    it prints, logs or passes to sys.exit is captured. ``interpreter``: let the fused kernel run
    in Triton's interpreter, as a command that sets TRITON_INTERPRET=1 itself does."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    # a command may set them for its process
    cwd, environ, argv = os.getcwd(), dict(os.environ), sys.argv
    os.chdir(REPO)
    sys.argv = [script, *args]  # argparse names the program after it
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            _fresh_loggers(),
            _kernel_interpreter(interpreter),
        ):
            try:
                _entry_point(script)(list(args))
            except SystemExit as e:
                if isinstance(e.code, str):  # sys.exit(message): Python prints it and exits 1
                    print(e.code, file=sys.stderr)
                    code = 1
                else:
                    code = e.code or 0
    finally:
        os.chdir(cwd)
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
    proc = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    proc.output = proc.stdout + proc.stderr
    if check is not None:
        assert (proc.returncode == 0) == check, proc.output[-5000:]
    return proc


def assert_one_line_error(proc, program, *needles):
    """The process failed with one line, '<program>: error: ...' holding every needle, and no
    traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.output, proc.output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error: "), proc.output[-2000:]
    for needle in needles:
        assert needle in last, last
