"""
What train_net.py needs around detectron2's engine: loading and checking the config from the
command line (bad input becomes a one-line ConfigError), the CPU fall-back, multi-process CPU
runs, and an informative stop when training diverges.
"""
import difflib
import logging
import os
import re

import torch
from detectron2.config import get_cfg
from detectron2.engine import defaults
from detectron2.utils.logger import setup_logger

from .checkpoint import SafeCheckpointer, check_checkpoint_file, write_json
from .config import ConfigError, add_focalstar_config, check_focalstar_config
from .losses import gamma_for

logger = logging.getLogger(__name__)

__all__ = ["ConfigError", "TrainingDiverged", "load_config", "fall_back_to_cpu", "enable_cpu_ddp",
           "divergence_message", "write_results", "setup_project_logger", "draw_seed",
           "check_weights_file", "RESULTS_FILE"]

#: Where train_net.py leaves the final metrics of a run, for tools/compare.py and tools/sweep.py.
RESULTS_FILE = "results.json"


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the message says where and what to change."""


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
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(_unknown_key_message(key, cfg, "command line"))
            node = node[part]


def _coerce_opts(cfg, opts):
    """Opts with a whole number for a float key written as a float: yacs refuses
    'MODEL.FOCALSTAR.MAX_FACTOR 10' (int vs float); it means 10.0."""
    opts = list(opts)
    for i in range(0, len(opts) - 1, 2):
        node = cfg
        for part in opts[i].split("."):
            node = node[part]
        value = opts[i + 1]
        if isinstance(node, float) and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            opts[i + 1] = value.strip() + ".0"
    return opts


def load_config(args):
    """The config for ``args`` (train_net's command line), checked: raises ConfigError."""
    if not args.config_file:
        raise ConfigError("--config-file is required, e.g. --config-file configs/quickstart_flstar.yaml")
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"--config-file {args.config_file}: no such file")
    cfg = get_cfg()
    add_focalstar_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
    except KeyError as e:  # yacs: "Non-existent config key: A.B"
        key = str(e.args[0]).rsplit(" ", 1)[-1]
        raise ConfigError(_unknown_key_message(key, cfg, args.config_file)) from None
    _check_opts_keys(cfg, args.opts)
    try:
        cfg.merge_from_list(_coerce_opts(cfg, args.opts))
    except (ValueError, AssertionError) as e:  # yacs: a value of the wrong type
        raise ConfigError(f"command line: {e}") from None
    fall_back_to_cpu(cfg)
    if cfg.MODEL.DEVICE.startswith("cuda") and args.num_gpus > torch.cuda.device_count():
        raise ConfigError(f"--num-gpus {args.num_gpus}: this machine has {torch.cuda.device_count()} "
                          f"GPU(s) visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    check_focalstar_config(cfg)
    _check_weights(cfg, args)
    if args.eval_only:
        _separate_evaluation_folder(cfg, args)
    return cfg


def _last_checkpoint(output_dir):
    """The checkpoint OUTPUT_DIR/last_checkpoint names, as a path; None without that file."""
    tag = os.path.join(output_dir, "last_checkpoint")
    if not os.path.isfile(tag):
        return None
    with open(tag) as f:
        return os.path.join(output_dir, f.read().strip())


def _check_weights(cfg, args):
    weights = cfg.MODEL.WEIGHTS
    last = _last_checkpoint(cfg.OUTPUT_DIR) if args.resume else None
    if last is not None and not os.path.isfile(last):
        others = sorted(f for f in os.listdir(cfg.OUTPUT_DIR) if f.endswith(".pth"))
        raise ConfigError(
            f"--resume: {os.path.join(cfg.OUTPUT_DIR, 'last_checkpoint')} names {last}, which "
            f"does not exist (checkpoints in {cfg.OUTPUT_DIR}: {', '.join(others) or 'none'}); "
            f"write the name of one of them into last_checkpoint, or run without --resume to "
            f"start again")
    if args.eval_only and not weights and last is None:
        raise ConfigError("--eval-only needs weights to evaluate: add MODEL.WEIGHTS "
                          "path/to/model_final.pth (or --resume with an OUTPUT_DIR that has one)")
    if weights and "://" not in weights and last is None and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS={weights!r}: no such file")


def check_weights_file(cfg, args):
    """Before any process starts, read the weights the run will load (the last checkpoint with
    --resume, else MODEL.WEIGHTS) through the same safe loaders; for --eval-only also load them
    into the model (on the CPU) and require all of its weights. A bad file is then one line with
    nothing written, however many processes. Training in one process skips it (it reports a bad
    file in one line anyway, and need not read a large file twice). URLs are left to
    detectron2's download in the run."""
    last = _last_checkpoint(cfg.OUTPUT_DIR) if args.resume else None
    path = last or cfg.MODEL.WEIGHTS
    if not path or "://" in path:
        return
    if args.eval_only:
        from detectron2.modeling import build_model

        cpu = cfg.clone()
        cpu.defrost()
        cpu.MODEL.DEVICE = "cpu"
        checkpointer = SafeCheckpointer(build_model(cpu))
        checkpointer.logger = _quiet  # the run itself logs what it loads
        checkpointer.load(path)
        checkpointer.require_all_weights()
    elif args.num_gpus * args.num_machines > 1:
        check_checkpoint_file(path)


_quiet = logging.getLogger(__name__ + ".precheck")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


_told_eval_folder = set()


def _separate_evaluation_folder(cfg, args):
    """--eval-only into the folder of a training writes into OUTPUT_DIR/eval_<checkpoint>/, so
    that the training's config.yaml, results.json, inference/ and safety metrics stay its own
    (and a sweep does not take an unfinished run for a finished one). With --resume the
    checkpoint is the training's last one."""
    last = _last_checkpoint(cfg.OUTPUT_DIR)
    if last is None:
        return
    if args.resume:  # named before OUTPUT_DIR moves: the evaluation folder has no last_checkpoint
        cfg.MODEL.WEIGHTS = last
    stem = os.path.splitext(os.path.basename(cfg.MODEL.WEIGHTS))[0]
    folder = os.path.join(cfg.OUTPUT_DIR, f"eval_{stem}")
    if folder not in _told_eval_folder:  # once per process (the config is loaded twice)
        logger.info(f"--eval-only in the folder of a training: writing to {folder}")
        _told_eval_folder.add(folder)
    cfg.OUTPUT_DIR = folder


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


_warned_cpu = []


def fall_back_to_cpu(cfg):
    """Switch a CUDA config to MODEL.DEVICE=cpu, with a warning (once per process), on a machine
    without CUDA."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        if not _warned_cpu:
            logger.warning(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available: using the CPU")
            _warned_cpu.append(True)
        cfg.MODEL.DEVICE = "cpu"


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
    control the growth for this loss type, and what to change."""
    fs, solver, clip = cfg.MODEL.FOCALSTAR, cfg.SOLVER, cfg.SOLVER.CLIP_GRADIENTS
    loss_type = fs.LOSS_TYPE.upper()
    loss_keys = {
        "FLSTAR": f"MODEL.FOCALSTAR.GAMMA={fs.GAMMA}, MODEL.FOCALSTAR.MAX_FACTOR={fs.MAX_FACTOR} "
                  "(0 = uncapped), ",
        "FL": f"MODEL.RETINANET.FOCAL_LOSS_GAMMA={cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA}, ",
        "FLSTAR_APPENDIX": f"MODEL.FOCALSTAR.APPENDIX_GAMMA={fs.APPENDIX_GAMMA}, ",
    }.get(loss_type, "")
    advice = ["lower SOLVER.BASE_LR or lengthen SOLVER.WARMUP_ITERS"]
    if loss_type == "FLSTAR":
        advice.append("lower MODEL.FOCALSTAR.MAX_FACTOR or GAMMA (FL*'s factor grows with both)")
    advice.append("lower SOLVER.CLIP_GRADIENTS.CLIP_VALUE" if clip.ENABLED
                  else "enable gradient clipping (SOLVER.CLIP_GRADIENTS.ENABLED True)")
    return (
        f"Training diverged at iteration {iteration}: {error}\n"
        f"  Settings that control the growth: MODEL.FOCALSTAR.LOSS_TYPE={fs.LOSS_TYPE}, {loss_keys}"
        f"SOLVER.BASE_LR={solver.BASE_LR}, SOLVER.WARMUP_ITERS={solver.WARMUP_ITERS}, "
        f"SOLVER.CLIP_GRADIENTS.ENABLED={clip.ENABLED} (CLIP_VALUE={clip.CLIP_VALUE}), "
        f"SOLVER.AMP.ENABLED={solver.AMP.ENABLED}.\n"
        f"  Last good checkpoint: {last_checkpoint or 'none yet'}. Then: {'; '.join(advice)}; and "
        f"continue with --resume.")


def write_results(cfg, results, iteration):
    """Write the final metrics and the settings that identify the run to OUTPUT_DIR/results.json
    (``iteration`` None: an evaluation only)."""
    fs = cfg.MODEL.FOCALSTAR
    record = {
        "loss_type": fs.LOSS_TYPE.upper(),
        "gamma": gamma_for(fs.LOSS_TYPE, fs.GAMMA, cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
                           fs.APPENDIX_GAMMA),
        "alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
        "max_factor": fs.MAX_FACTOR,
        "seed": cfg.SEED,
        "weights": cfg.MODEL.WEIGHTS,
        "iteration": iteration,
        "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        "solver": {"base_lr": cfg.SOLVER.BASE_LR, "max_iter": cfg.SOLVER.MAX_ITER,
                   "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "amp": cfg.SOLVER.AMP.ENABLED},
        "results": {task: dict(metrics) for task, metrics in results.items()},
    }
    path = os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    write_json(path, record)
    logger.info(f"Final metrics written to {path}")
