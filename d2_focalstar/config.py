"""
The config of d2-focalstar: every key it adds (``add_focalstar_config``), their checks, and
loading a config from a command line (``load_config``), bad input becoming one ConfigError line.
"""
import difflib
import logging
import os
import re
import tempfile

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .losses import ALPHA, FL_GAMMA, LOSS_TYPES, loss_type

__all__ = ["ConfigError", "add_focalstar_config", "check_focalstar_config", "config_value",
           "load_config", "fall_back_to_cpu", "loss_config_node", "check_output_dir", "cpu_cores"]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad config value, command line or dataset, found at start-up; reported on one line."""


def add_focalstar_config(cfg):
    """
    Add every config key of d2-focalstar, with its default. The loss parameters' keys and
    defaults come from the table of loss types (d2_focalstar/losses.py, LOSS_TYPES); alpha and
    FL's gamma are the detector's own keys (MODEL.RETINANET.FOCAL_LOSS_ALPHA / _GAMMA,
    detectron2's; MODEL.FCOS.*, added here).
    """
    cfg.MODEL.FOCALSTAR = CN()
    # Classification loss of RetinaNetFLStar and FCOSFLStar, a name of the loss table (FLSTAR,
    # FL, CE, FLSTAR_APPENDIX, ...; docs/CONFIG.md lists them with their formulas).
    cfg.MODEL.FOCALSTAR.LOSS_TYPE = "FLSTAR"
    # The loss types' own parameters (GAMMA, MAX_FACTOR, APPENDIX_GAMMA, ...), from the table.
    for entry in LOSS_TYPES.values():
        for param in entry.params:
            if param.key.startswith("MODEL.FOCALSTAR."):
                cfg.MODEL.FOCALSTAR[param.key.rsplit(".", 1)[1]] = float(param.default)
    # Compute the classification loss with the fused Triton kernel (d2_focalstar/fused.py) on
    # CUDA, for loss types that have a kernel branch: same values as the reference functions, no
    # one-hot tensor (speed and memory: docs/BENCHMARKS.md). False: the reference functions
    # everywhere. On the CPU the reference functions are always used.
    cfg.MODEL.FOCALSTAR.FUSED_KERNEL = True
    # On CUDA (MODEL.DEVICE "cuda..."), keep the detector's convolution weights in the
    # channels_last (NHWC) layout that tensor cores prefer: same maths, other cuDNN kernels
    # (rounding may differ), faster train steps (docs/BENCHMARKS.md). Ignored on the CPU.
    cfg.MODEL.FOCALSTAR.CHANNELS_LAST = True

    # FCOSFLStar (d2_focalstar/fcos.py): detectron2's FCOS, whose keys its yacs config lacks.
    # Defaults are those of detectron2's COCO-Detection/fcos_R_50_FPN_1x.py.
    cfg.MODEL.FCOS = CN()
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.FCOS.NUM_CONVS = 4  # convolutions in each of the head's two towers
    cfg.MODEL.FCOS.HEAD_NORM = "GN"  # norm of the head's convolutions ("", "GN", "BN", ...)
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01  # initial foreground probability of the class logits
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = ALPHA.default  # a in a_t, every loss type
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = FL_GAMMA.default  # FL's g
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5  # in strides: anchor points this near a centre
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.2  # on sqrt(class score x centerness)
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6

    # Safety metrics, computed beside COCO AP by d2_focalstar.safety.SafetyEvaluator: for these
    # class names (those the dataset lacks are skipped), the log-average miss rate over false
    # positives per image in [1e-2, 1e0] and the recall at FP_PER_IMAGE false positives per image.
    cfg.TEST.SAFETY = CN()
    cfg.TEST.SAFETY.ENABLED = True
    cfg.TEST.SAFETY.CLASSES = ["person", "bicycle", "car", "motorcycle", "bus", "truck",
                               "traffic light", "stop sign"]
    cfg.TEST.SAFETY.FP_PER_IMAGE = 0.1
    # IoU at which a detection matches a ground-truth box for these metrics.
    cfg.TEST.SAFETY.IOU_THRESHOLD = 0.5

    # More COCO-format datasets, registered by name at start-up without code:
    # a list of [name, json_file, image_root], e.g. [["mine_train", "a/train.json", "a/images"]].
    cfg.DATASETS.COCO_JSON = []


def config_value(cfg, key):
    """cfg's value at a dotted key ('MODEL.FOCALSTAR.GAMMA'); KeyError if it has none."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def loss_config_node(cfg):
    """The config node of the detector whose loss the config sets ('MODEL.RETINANET' for
    RetinaNetFLStar): the meta-architecture's ``loss_config_node``; None for another one."""
    from detectron2.modeling import META_ARCH_REGISTRY

    try:
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    except KeyError:
        return None
    return getattr(arch, "loss_config_node", None)


def _loss_params(head):
    """Every (config key, LossParam) of the table for a detector's node, each key once."""
    found = {ALPHA.config_key(head): ALPHA} if head else {}
    for entry in LOSS_TYPES.values():
        for param in entry.params:
            if head or "{head}" not in param.key:
                found.setdefault(param.config_key(head), param)
    return found


def check_focalstar_config(cfg):
    """Raise ConfigError naming the key, the value and what is allowed, for a bad setting of ours.
    Returns the warnings to show once: a parameter that the loss type does not use, set away
    from its default."""
    problems, warnings = [], []
    fs = cfg.MODEL.FOCALSTAR
    head = loss_config_node(cfg)
    try:
        entry = loss_type(fs.LOSS_TYPE)
    except ValueError:
        entry = None
        problems.append(f"MODEL.FOCALSTAR.LOSS_TYPE={fs.LOSS_TYPE!r}: allowed {', '.join(LOSS_TYPES)}")
    for key, param in _loss_params(head).items():
        value = config_value(cfg, key)
        why = param.validate(value)
        if why:
            problems.append(f"{key}={value!r}: allowed {param.allowed}")
        elif (entry is not None and param is not ALPHA and param not in entry.params
              and value != param.default):
            used = ", ".join(p.config_key(head) for p in entry.params) or "none of them"
            warnings.append(f"{key}={value!r} is set but LOSS_TYPE {entry.name} does not use it "
                            f"(it uses {used})")
    for i, item in enumerate(cfg.DATASETS.COCO_JSON):
        if not (isinstance(item, (list, tuple)) and len(item) == 3
                and all(isinstance(s, str) and s for s in item)):
            problems.append(f"DATASETS.COCO_JSON[{i}]={item!r}: allowed "
                            "[name, json_file, image_root], three non-empty strings")
    safety = cfg.TEST.SAFETY
    if not (isinstance(safety.CLASSES, (list, tuple)) and all(isinstance(c, str) for c in safety.CLASSES)):
        problems.append(f"TEST.SAFETY.CLASSES={safety.CLASSES!r}: allowed a list of class names")
    if not (isinstance(safety.FP_PER_IMAGE, (int, float)) and safety.FP_PER_IMAGE > 0):
        problems.append(f"TEST.SAFETY.FP_PER_IMAGE={safety.FP_PER_IMAGE!r}: allowed a number > 0")
    if not (isinstance(safety.IOU_THRESHOLD, (int, float)) and 0 < safety.IOU_THRESHOLD <= 1):
        problems.append(f"TEST.SAFETY.IOU_THRESHOLD={safety.IOU_THRESHOLD!r}: allowed (0, 1]")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return warnings


# ---- loading from a command line ---------------------------------------------------------------

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
        if (isinstance(config_value(cfg, opts[i]), float) and isinstance(value, str)
                and re.fullmatch(r"\s*[+-]?\d+\s*", value)):
            opts[i + 1] = value.strip() + ".0"
    return opts


_warned = set()


def _warn_once(message):
    if message not in _warned:  # the config is loaded in the launcher and in each process
        _warned.add(message)
        logger.warning(message)


def fall_back_to_cpu(cfg):
    """Switch a CUDA config to MODEL.DEVICE=cpu, with a warning (once per process), on a machine
    without CUDA."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        _warn_once(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available: using the CPU")
        cfg.MODEL.DEVICE = "cpu"


def load_config(config_file, opts=(), num_gpus=1, eval_only=False, resume=False, num_machines=1):
    """
    The config of a run, checked; a ConfigError (one line) for bad input.

    Args:
        config_file: YAML file (detectron2's format, ``_BASE_`` allowed).
        opts: KEY VALUE pairs that override it.
        num_gpus: processes per machine (GPUs; CPU processes without CUDA).
        eval_only: the run only evaluates MODEL.WEIGHTS (or, with ``resume``, the last checkpoint
            of OUTPUT_DIR); its files go to OUTPUT_DIR/eval_<checkpoint>/ when OUTPUT_DIR holds a
            training.
        resume: the run continues from OUTPUT_DIR's last checkpoint.
        num_machines: machines of ``num_gpus`` processes each (the batch is split over all).
    """
    from .checkpoint import last_checkpoint  # the checkpointer reads last_checkpoint

    if not config_file:
        raise ConfigError("--config-file is required, e.g. --config-file configs/quickstart_flstar.yaml")
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file}: no such file")
    _check_num_processes(num_gpus)  # before anything starts: a process each is memory each
    _check_config_files(config_file)
    opts = list(opts)
    cfg = get_cfg()
    add_focalstar_config(cfg)
    try:
        cfg.merge_from_file(config_file)
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
    fall_back_to_cpu(cfg)
    for warning in check_focalstar_config(cfg):
        _warn_once(warning)
    _check_detectron2_values(cfg, num_gpus, num_machines, eval_only)
    last = last_checkpoint(cfg.OUTPUT_DIR) if resume else None
    _check_weights(cfg, eval_only, resume, last)
    if eval_only:
        _separate_evaluation_folder(cfg, resume, "MODEL.WEIGHTS" in opts[0::2])
    return cfg


def cpu_cores():
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
            raise ConfigError(f"--num-gpus {num_gpus}: this machine has {gpus} GPU(s) visible "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                              f"allowed 1 to {gpus}")
    elif not 1 <= num_gpus <= cpu_cores():
        raise ConfigError(f"--num-gpus {num_gpus}: without CUDA each is a CPU process, and this "
                          f"machine has {cpu_cores()} CPU core(s): allowed 1 to {cpu_cores()}")


def _base_files(config_file, data):
    """The files that ``data`` (the YAML of ``config_file``) names in _BASE_, resolved as
    fvcore's load_yaml_with_base resolves them; URLs are left out."""
    bases = data.get("_BASE_", [])
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str):
            raise ConfigError(f"{config_file}: _BASE_ {base!r}: allowed a file name or a list of them")
        base = os.path.expanduser(base) if base.startswith("~") else base
        if base.startswith(("https://", "http://")):
            continue
        yield base if base.startswith("/") else os.path.join(os.path.dirname(config_file), base)


def _check_config_files(config_file, chain=()):
    """Each file of the _BASE_ chain is a YAML mapping of config keys and the chain has no loop;
    a ConfigError naming the file otherwise (fvcore would raise a TypeError, or recurse until
    Python's limit)."""
    chain = chain + (os.path.realpath(config_file),)
    where = config_file if len(chain) == 1 else f"{config_file} (a _BASE_ of {chain[0]})"
    try:
        with open(config_file, "rb") as f:
            text = f.read().decode("utf-8")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a YAML config (not UTF-8 text)") from None
    except yaml.constructor.ConstructorError:
        return  # Python tags: detectron2 loads it with a warning (docs/RELIABILITY.md)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: "
                          f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read: {e.strerror or e}") from None
    if data is None:
        raise ConfigError(f"{where}: empty; a config sets keys or a _BASE_, e.g. "
                          "_BASE_: \"quickstart_flstar.yaml\"")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a YAML {type(data).__name__}, where a mapping of config keys "
                          "(KEY: value) is expected")
    for base in _base_files(config_file, data):
        if os.path.realpath(base) in chain:
            loop = " -> ".join(list(chain[chain.index(os.path.realpath(base)):]) + [os.path.realpath(base)])
            raise ConfigError(f"{chain[0]}: its _BASE_ chain loops ({loop})")
        _check_config_files(base, chain)


def _yacs_message(e):
    """yacs's message for a value of the wrong type, without its dump of a whole config node."""
    found = re.match(r"Type mismatch \((.*?) vs\. (.*?)\) with values .* for config key: (\S+)$",
                     str(e), re.S)
    if not found:
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    want, got, key = (re.sub(r"<class '(?:.*\.)?(\w+)'>", r"\1", t) for t in found.groups())
    want = "a section of keys" if want == "CfgNode" else f"a {want}"
    return f"{key} has type {got}, where {want} is expected"


# detectron2's own keys that it uses without a check: a bad value is an error deep in training
_DETECTRON2_RANGES = (("SOLVER.MAX_ITER", 1, "a whole number >= 1"),
                      ("SOLVER.IMS_PER_BATCH", 1, "a whole number >= 1"),
                      ("SOLVER.CHECKPOINT_PERIOD", 1, "a whole number >= 1"),
                      ("DATALOADER.NUM_WORKERS", 0, "a whole number >= 0"))


def _check_detectron2_values(cfg, num_gpus, num_machines, eval_only):
    keys = [k for k in _DETECTRON2_RANGES if not (eval_only and k[0].startswith("SOLVER."))]
    head = loss_config_node(cfg)
    if head:  # the detector's class count: RetinaNet's or FCOS's node
        keys.append((f"{head}.NUM_CLASSES", 1, "a whole number >= 1"))
    problems = [f"{key}={config_value(cfg, key)!r}: allowed {allowed}" for key, least, allowed in keys
                if not (isinstance(config_value(cfg, key), int) and config_value(cfg, key) >= least)]
    batch = cfg.SOLVER.IMS_PER_BATCH
    processes = num_gpus * num_machines
    if not problems and not eval_only and batch % processes:
        where = "(--num-gpus)" if num_machines == 1 else f"({num_gpus} per machine x {num_machines} machines)"
        problems.append(f"SOLVER.IMS_PER_BATCH={batch!r}: allowed a multiple of the {processes} "
                        f"processes {where}, each takes an equal share")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def check_output_dir(cfg):
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
        raise ConfigError(f"OUTPUT_DIR={out!r} cannot be created: {existing} is a file, not a folder")
    try:  # os.access says yes to root on a read-only folder; creating something is the test
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR={out!r}: cannot write into {existing} "
                          f"({e.strerror or e}): choose a folder you can write to") from None


def _check_weights(cfg, eval_only, resume, last):
    if last is not None and not os.path.isfile(last):
        others = sorted(f for f in os.listdir(cfg.OUTPUT_DIR) if f.endswith(".pth"))
        raise ConfigError(
            f"--resume: {os.path.join(cfg.OUTPUT_DIR, 'last_checkpoint')} names {last}, which "
            f"does not exist (checkpoints in {cfg.OUTPUT_DIR}: {', '.join(others) or 'none'}); "
            f"write the name of one of them into last_checkpoint, or run without --resume to "
            f"start again")
    weights = cfg.MODEL.WEIGHTS
    if eval_only and not weights and last is None:
        raise ConfigError("--eval-only needs weights to evaluate: add MODEL.WEIGHTS "
                          "path/to/model_final.pth (or --resume with an OUTPUT_DIR that has one)")
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
            _warn_once(f"--eval-only --resume evaluates {last}, the last checkpoint of "
                       f"{cfg.OUTPUT_DIR}, not MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: to evaluate "
                       "that file, leave out --resume")
        cfg.MODEL.WEIGHTS = last
    stem = os.path.splitext(os.path.basename(cfg.MODEL.WEIGHTS))[0]
    folder = os.path.join(cfg.OUTPUT_DIR, f"eval_{stem}")
    if folder not in _warned:  # once per process (the config is loaded twice)
        _warned.add(folder)
        logger.info(f"--eval-only in the folder of a training: writing to {folder}")
    cfg.OUTPUT_DIR = folder
