"""
From a command line to a checked config: ``load_config`` (the file, its _BASE_ chain and the
KEY VALUE opts, each bad input one ConfigError line naming the file or key), the checks of the
detectron2 keys a run relies on, the process count, the weights to load and the output folder,
and ``prepare_run``: all of it once, in the process that launches the others.
"""

import argparse
import contextlib
import difflib
import logging
import os
import re
import tempfile
from typing import Optional, Sequence, Tuple

import torch
import yaml
from detectron2.config import CfgNode, get_cfg

from ..config import ConfigError, add_focalstar_config, check_focalstar_config, config_value
from ..modeling import loss_config_node

__all__ = [
    "UNSAFE_CONFIG_FLAG",
    "add_unsafe_config_argument",
    "load_config",
    "check_output_dir",
    "check_batch_split",
    "check_weights_file",
    "cpu_cores",
    "default_argument_parser_for",
    "detector_classes",
    "draw_seed",
    "prepare_run",
]

logger = logging.getLogger(__name__)


def _all_keys(node, prefix=""):
    for k, v in node.items():
        full = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _all_keys(v, full + ".")
        else:
            yield full


def _unknown_key_message(key, cfg, where):
    keys = list(_all_keys(cfg))
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{where}: unknown config key {key!r}{hint}"


def _check_opts_keys(cfg, opts):
    if len(opts) % 2:
        raise ConfigError(f"command-line opts must be KEY VALUE pairs; {opts[-1]!r} has no value")
    for key in opts[0::2]:
        try:
            config_value(cfg, key)
        except (KeyError, TypeError):
            raise ConfigError(_unknown_key_message(key, cfg, "command line")) from None


def _coerce_opts(cfg, opts):
    """Opts with a whole number for a float key written as a float: yacs refuses
    'MODEL.FOCALSTAR.MAX_FACTOR 10' (int vs float); it means 10.0."""
    opts = list(opts)
    for i in range(0, len(opts) - 1, 2):
        value = opts[i + 1]
        if (
            isinstance(config_value(cfg, opts[i]), float)
            and isinstance(value, str)
            and re.fullmatch(r"\s*[+-]?\d+\s*", value)
        ):
            opts[i + 1] = value.strip() + ".0"
    return opts


def _fall_back_to_cpu(cfg, warn=True):
    """Switch a CUDA config to MODEL.DEVICE=cpu, with a warning, on a machine without CUDA."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        if warn:
            logger.warning(
                f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available: using the CPU"
            )
        cfg.MODEL.DEVICE = "cpu"


# the flag of every command that loads a config, named by the refusal of a Python tag
UNSAFE_CONFIG_FLAG = "--unsafe-config"


def add_unsafe_config_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--unsafe-config`` flag of a command that loads configs (args.unsafe_config)."""
    parser.add_argument(
        UNSAFE_CONFIG_FLAG,
        action="store_true",
        help="allow Python tags (!!python/...) in the config and its _BASE_ files: "
        "they run code when the file is loaded; only for files you trust",
    )


def load_config(
    config_file: str,
    opts: Sequence[str] = (),
    num_gpus: int = 1,
    eval_only: bool = False,
    resume: bool = False,
    num_machines: int = 1,
    warn_no_cuda: bool = True,
    allow_unsafe: bool = False,
) -> CfgNode:
    """
    The config of a run, checked; a ConfigError (one line) for bad input. Warnings (a CUDA config
    on a machine without CUDA, a loss parameter the loss type does not use) are logged here.

    Args:
        config_file: YAML file (detectron2's format, ``_BASE_`` allowed).
        opts: KEY VALUE pairs that override it.
        num_gpus: processes per machine (GPUs; CPU processes without CUDA).
        eval_only: the run only evaluates MODEL.WEIGHTS (or, with ``resume``, the last checkpoint
            of OUTPUT_DIR); its files go to OUTPUT_DIR/eval_<checkpoint>/ when OUTPUT_DIR holds a
            training.
        resume: the run continues from OUTPUT_DIR's last checkpoint.
        num_machines: machines of ``num_gpus`` processes each (the batch is split over all).
        warn_no_cuda: warn when MODEL.DEVICE is CUDA and this machine has none (a SLURM login
            node need not have the GPUs the job gets).
        allow_unsafe: construct the Python tags of the files (``--unsafe-config``); without it a
            tag in any file of the _BASE_ chain is a ConfigError and nothing is constructed.
    """
    from .checkpoint import last_checkpoint  # the checkpointer reads last_checkpoint

    if not config_file:
        raise ConfigError(
            "--config-file is required, e.g. --config-file configs/quickstart_flstar.yaml"
        )
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file}: no such file")
    _check_num_processes(num_gpus)  # before anything starts: a process each is memory each
    # the whole chain, before any tag runs
    _check_config_files(config_file, allow_unsafe=allow_unsafe)
    opts = list(opts)
    cfg = get_cfg()
    add_focalstar_config(cfg)
    try:
        cfg.merge_from_file(config_file, allow_unsafe=allow_unsafe)
    except KeyError as e:  # yacs: "Non-existent config key: A.B"
        key = str(e.args[0]).rsplit(" ", 1)[-1]
        raise ConfigError(_unknown_key_message(key, cfg, config_file)) from None
    except (ValueError, TypeError, AttributeError, AssertionError, yaml.YAMLError) as e:
        raise ConfigError(f"{config_file}: {_yacs_message(e)}") from None
    _check_opts_keys(cfg, opts)
    try:
        cfg.merge_from_list(_coerce_opts(cfg, opts))
    except (ValueError, AssertionError) as e:  # yacs: a value of the wrong type
        raise ConfigError(f"command line: {_yacs_message(e)}") from None
    _fall_back_to_cpu(cfg, warn_no_cuda)
    for warning in check_focalstar_config(cfg, loss_config_node(cfg)):
        logger.warning(warning)
    _check_detectron2_values(cfg, num_gpus, num_machines, eval_only)
    last = last_checkpoint(cfg.OUTPUT_DIR) if resume else None
    _check_weights(cfg, eval_only, resume, last)
    if eval_only:
        _separate_evaluation_folder(cfg, resume, "MODEL.WEIGHTS" in opts[0::2])
    return cfg


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_num_processes(num_gpus):
    """--num-gpus is processes per machine: GPUs with CUDA (detectron2's launch then requires as
    many visible GPUs, whatever MODEL.DEVICE says), CPU processes without. More CPU processes than
    cores only share the cores, each holding a model and a data loader in memory."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if not 1 <= num_gpus <= gpus:
            raise ConfigError(
                f"--num-gpus {num_gpus}: this machine has {gpus} GPU(s) visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"allowed 1 to {gpus}"
            )
    elif not 1 <= num_gpus <= cpu_cores():
        raise ConfigError(
            f"--num-gpus {num_gpus}: without CUDA each is a CPU process, and this "
            f"machine has {cpu_cores()} CPU core(s): allowed 1 to {cpu_cores()}"
        )


def _base_files(config_file, data):
    """The files that ``data`` (the YAML of ``config_file``) names in _BASE_, resolved as
    fvcore's load_yaml_with_base resolves them; URLs are left out."""
    bases = data.get("_BASE_", [])
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str):
            raise ConfigError(
                f"{config_file}: _BASE_ {base!r}: allowed a file name or a list of them"
            )
        base = os.path.expanduser(base) if base.startswith("~") else base
        if base.startswith(("https://", "http://")):
            continue
        yield base if base.startswith("/") else os.path.join(os.path.dirname(config_file), base)


class _InertLoader(yaml.SafeLoader):
    """safe_load that reads a Python tag as None and remembers where the first one is: the _BASE_
    chain is checked (loops included) before anything a tag names is constructed."""

    def __init__(self, stream):
        super().__init__(stream)
        self.first_tag = None


def _inert_python_tag(loader, suffix, node):
    if loader.first_tag is None:
        loader.first_tag = (node.tag.replace("tag:yaml.org,2002:", "!!"), node.start_mark.line + 1)
    return None


_InertLoader.add_multi_constructor("tag:yaml.org,2002:python/", _inert_python_tag)


def _check_config_files(config_file, chain=(), allow_unsafe=False):
    """Each file of the _BASE_ chain is a YAML mapping of config keys, holds no Python tag (unless
    ``allow_unsafe``) and the chain has no loop; a ConfigError naming the file otherwise (fvcore
    would raise a TypeError, run the tags, or recurse until Python's limit)."""
    chain = chain + (os.path.realpath(config_file),)
    where = config_file if len(chain) == 1 else f"{config_file} (a _BASE_ of {chain[0]})"
    try:
        with open(config_file, "rb") as f:
            text = f.read().decode("utf-8")
        loader = _InertLoader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a YAML config (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"
        ) from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read: {e.strerror or e}") from None
    if loader.first_tag and not allow_unsafe:
        tag, line = loader.first_tag
        raise ConfigError(
            f"{where}: line {line} holds a Python tag ({tag}), which would run code when "
            f"loaded: refused, nothing was run; {UNSAFE_CONFIG_FLAG} allows tags in "
            "files you trust"
        )
    if data is None:
        raise ConfigError(
            f'{where}: empty; a config sets keys or a _BASE_, e.g. _BASE_: "quickstart_flstar.yaml"'
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: a YAML {type(data).__name__}, where a mapping of config keys "
            "(KEY: value) is expected"
        )
    for base in _base_files(config_file, data):
        if os.path.realpath(base) in chain:
            loop = " -> ".join(
                list(chain[chain.index(os.path.realpath(base)) :]) + [os.path.realpath(base)]
            )
            raise ConfigError(f"{chain[0]}: its _BASE_ chain loops ({loop})")
        _check_config_files(base, chain, allow_unsafe)


def _yacs_message(e):
    """yacs's message for a value of the wrong type, without its dump of a whole config node."""
    found = re.match(
        r"Type mismatch \((.*?) vs\. (.*?)\) with values .* for config key: (\S+)$", str(e), re.S
    )
    if not found:
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    want, got, key = (re.sub(r"<class '(?:.*\.)?(\w+)'>", r"\1", t) for t in found.groups())
    want = "a section of keys" if want == "CfgNode" else f"a {want}"
    return f"{key} has type {got}, where {want} is expected"


# detectron2's own keys that it uses without a check: a bad value is an error deep in training
_DETECTRON2_RANGES = (
    ("SOLVER.MAX_ITER", 1, "a whole number >= 1"),
    ("SOLVER.IMS_PER_BATCH", 1, "a whole number >= 1"),
    ("SOLVER.CHECKPOINT_PERIOD", 1, "a whole number >= 1"),
    ("DATALOADER.NUM_WORKERS", 0, "a whole number >= 0"),
)


def _check_detectron2_values(cfg, num_gpus, num_machines, eval_only):
    keys = [k for k in _DETECTRON2_RANGES if not (eval_only and k[0].startswith("SOLVER."))]
    keys.append((detector_classes(cfg)[0], 1, "a whole number >= 1"))  # RetinaNet's or FCOS's
    problems = [
        f"{key}={config_value(cfg, key)!r}: allowed {allowed}"
        for key, least, allowed in keys
        if not (isinstance(config_value(cfg, key), int) and config_value(cfg, key) >= least)
    ]
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    if not eval_only:
        where = (
            "(--num-gpus)"
            if num_machines == 1
            else f"({num_gpus} per machine x {num_machines} machines)"
        )
        check_batch_split(cfg, num_gpus * num_machines, where)


def check_batch_split(cfg: CfgNode, processes: int, where: str) -> None:
    """ConfigError unless SOLVER.IMS_PER_BATCH splits evenly over ``processes`` (``where`` says
    what made that number, e.g. '(--num-gpus)')."""
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch % processes:
        raise ConfigError(
            f"invalid config: SOLVER.IMS_PER_BATCH={batch!r}: allowed a multiple of the "
            f"{processes} processes {where}, each takes an equal share"
        )


def check_output_dir(cfg: CfgNode) -> None:
    """OUTPUT_DIR can hold the run's files: it is a folder, or can be made one, and a file can be
    created there. Checked before any process starts, without creating it (a run that is
    refused later leaves nothing behind)."""
    out = cfg.OUTPUT_DIR
    if not out:
        raise ConfigError("OUTPUT_DIR='': allowed a folder for the run's files")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"OUTPUT_DIR={out!r} is a file, not a folder: choose another OUTPUT_DIR")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"OUTPUT_DIR={out!r} cannot be created: {existing} is a file, not a folder"
        )
    try:  # os.access says yes to root on a read-only folder; creating something is the test
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as e:
        raise ConfigError(
            f"OUTPUT_DIR={out!r}: cannot write into {existing} "
            f"({e.strerror or e}): choose a folder you can write to"
        ) from None


def _check_weights(cfg, eval_only, resume, last):
    if last is not None and not os.path.isfile(last):
        others = sorted(f for f in os.listdir(cfg.OUTPUT_DIR) if f.endswith(".pth"))
        raise ConfigError(
            f"--resume: {os.path.join(cfg.OUTPUT_DIR, 'last_checkpoint')} names {last}, which "
            f"does not exist (checkpoints in {cfg.OUTPUT_DIR}: {', '.join(others) or 'none'}); "
            f"write the name of one of them into last_checkpoint, or run without --resume to "
            f"start again"
        )
    weights = cfg.MODEL.WEIGHTS
    if eval_only and not weights and last is None:
        raise ConfigError(
            "--eval-only needs weights to evaluate: add MODEL.WEIGHTS "
            "path/to/model_final.pth (or --resume with an OUTPUT_DIR that has one)"
        )
    if weights and "://" not in weights and last is None and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS={weights!r}: no such file")


def _separate_evaluation_folder(cfg, resume, weights_given=False):
    """--eval-only into the folder of a training writes into OUTPUT_DIR/eval_<checkpoint>/, so
    that the training's config.yaml, results.json, inference/ and safety metrics stay its own
    (and a sweep does not take an unfinished run for a finished one). With --resume the
    checkpoint is the training's last one (``weights_given``: MODEL.WEIGHTS on the command line,
    which it replaces: said in a warning)."""
    from .checkpoint import last_checkpoint

    last = last_checkpoint(cfg.OUTPUT_DIR)
    if last is None:
        return
    if resume:  # named before OUTPUT_DIR moves: the evaluation folder has no last_checkpoint
        if weights_given and os.path.abspath(cfg.MODEL.WEIGHTS) != os.path.abspath(last):
            logger.warning(
                f"--eval-only --resume evaluates {last}, the last checkpoint of "
                f"{cfg.OUTPUT_DIR}, not MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: to evaluate "
                "that file, leave out --resume"
            )
        cfg.MODEL.WEIGHTS = last
    stem = os.path.splitext(os.path.basename(cfg.MODEL.WEIGHTS))[0]
    folder = os.path.join(cfg.OUTPUT_DIR, f"eval_{stem}")
    logger.info(f"--eval-only in the folder of a training: writing to {folder}")
    cfg.OUTPUT_DIR = folder


def check_weights_file(cfg: CfgNode, eval_only: bool, resume: bool, num_processes: int) -> None:
    """Before any process starts, read the weights the run will load (the last checkpoint with
    --resume, else MODEL.WEIGHTS) through the same safe loaders; for --eval-only also load them
    into the model (on the CPU) and require all of its weights. A bad file is then one line with
    nothing written, however many processes. Training in one process skips it (it reports a bad
    file in one line anyway, and need not read a large file twice). URLs are left to
    detectron2's download in the run."""
    from .checkpoint import SafeCheckpointer, check_checkpoint_file, last_checkpoint

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


def draw_seed(cfg: CfgNode, num_machines: int = 1) -> None:
    """With SEED < 0 (detectron2's "a different seed each run"), draw the seed here, once, for
    every process, so that config.yaml and results.json record the seed the run used instead of
    -1. Not on several machines: each would draw its own, and the one recorded would not repeat
    the run; there SEED stays -1 (detectron2's own draw)."""
    if cfg.SEED < 0 and num_machines == 1:
        cfg.SEED = int.from_bytes(os.urandom(4), "little") % 2**31


def default_argument_parser_for(doc: str) -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` for train_net.py: its description and examples
    from ``doc`` (the script's docstring: a first line, a blank line, the examples), and help
    texts that fit this project."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser(epilog=doc.split("\n\n", 1)[1])
    parser.description = doc.strip().splitlines()[0]
    for action in parser._actions:
        if action.dest == "opts":
            action.help = (
                "config KEY VALUE pairs, last, e.g. MODEL.FOCALSTAR.GAMMA 0.5 OUTPUT_DIR out/g0.5"
            )
        elif action.dest == "num_gpus":
            action.help = "GPUs per machine (without CUDA: this many CPU processes)"
    add_unsafe_config_argument(parser)
    return parser


def detector_classes(cfg: CfgNode) -> Tuple[str, int]:
    """(key, value) of the class count of the detector that ``cfg`` builds, e.g.
    ("MODEL.FCOS.NUM_CLASSES", 80)."""
    key = f"{loss_config_node(cfg)}.NUM_CLASSES"
    return key, config_value(cfg, key)


def prepare_run(args: argparse.Namespace, held: Optional[contextlib.ExitStack] = None) -> CfgNode:
    """train_net.py's checks before any process starts, each done once: the config (loaded and
    checked), the output folder, the seed, the datasets and the weights; the partial files of a
    killed run are removed. Returns the frozen config that every process runs; a ConfigError or a
    checkpoint error (one line) for bad input. ``held``: a contextlib.ExitStack that keeps the
    output folder's lock (run/lock.py) until the command ends (machine 0 only: the machines of one
    run share the folder)."""
    from ..data import check_datasets, register_config_datasets
    from ..evaluation import EvaluatorTypeError, evaluator_type_of
    from ..fileio import remove_partial_writes
    from .lock import run_folder_lock
    from .preemption import preemption_signal

    cfg = load_config(
        args.config_file,
        args.opts,
        num_gpus=args.num_gpus,
        eval_only=args.eval_only,
        resume=args.resume,
        num_machines=args.num_machines,
        allow_unsafe=getattr(args, "unsafe_config", False),
    )
    check_output_dir(cfg)
    # a SUBMITIT_PREEMPT_SIGNAL that names no signal: one line now, not in every process
    preemption_signal()
    # SEED -1: one seed for all processes, recorded in the run's files
    draw_seed(cfg, args.num_machines)
    register_config_datasets(cfg)
    # evaluation needs only DATASETS.TEST
    check_datasets(cfg, train=not args.eval_only, num_classes=detector_classes(cfg))
    for name in cfg.DATASETS.TEST:  # an evaluator for each, known before the training
        try:
            evaluator_type_of(name)
        except EvaluatorTypeError as e:
            raise ConfigError(f"DATASETS.TEST: {e}") from None
    # several processes: a bad weights file is one line, not N tracebacks
    check_weights_file(cfg, args.eval_only, args.resume, args.num_gpus * args.num_machines)
    # before removing files another run may be writing
    if held is not None and args.machine_rank == 0:
        held.enter_context(run_folder_lock(cfg.OUTPUT_DIR))
    remove_partial_writes(cfg.OUTPUT_DIR)  # left by a run killed while saving
    cfg.freeze()
    return cfg
