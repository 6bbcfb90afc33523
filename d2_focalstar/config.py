"""
The config of d2-focalstar: every key it adds (``add_focalstar_config``) and the checks of their
values (``check_focalstar_config``). Loading a config from a command line is
``d2_focalstar.run.cli.load_config``.
"""

from typing import List, Optional

from detectron2.config import CfgNode as CN

from .modeling.losses import (
    ALPHA,
    DEFAULT_NODE,
    FL_GAMMA,
    LOSS_TYPES,
    config_value,
    loss_config_problems,
)

__all__ = ["ConfigError", "add_focalstar_config", "check_focalstar_config", "config_value"]


class ConfigError(ValueError):
    """A bad config value, command line or dataset, found at start-up; reported on one line."""


def add_focalstar_config(cfg: CN) -> None:
    """
    Add every config key of d2-focalstar, with its default. The loss parameters' keys and
    defaults come from the table of loss types (d2_focalstar/modeling/losses.py, LOSS_TYPES);
    alpha and FL's gamma are the detector's own keys (MODEL.RETINANET.FOCAL_LOSS_ALPHA / _GAMMA,
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
    # Compute the classification loss with the fused Triton kernel (d2_focalstar/modeling/fused.py)
    # on CUDA, for loss types that have a kernel branch: same values as the reference functions, no
    # one-hot tensor (speed and memory: docs/BENCHMARKS.md). False: the reference functions
    # everywhere. On the CPU the reference functions are always used.
    cfg.MODEL.FOCALSTAR.FUSED_KERNEL = True
    # On CUDA (MODEL.DEVICE "cuda..."), keep the detector's convolution weights in the
    # channels_last (NHWC) layout that tensor cores prefer: same maths, other cuDNN kernels
    # (rounding may differ), faster train steps (docs/BENCHMARKS.md). Ignored on the CPU.
    cfg.MODEL.FOCALSTAR.CHANNELS_LAST = True
    # On the CPU, compile the reference loss with torch.compile (inductor, which needs a C++
    # compiler; a few seconds at the first step): the same formula in fewer memory passes, a
    # CPU-scale study's speed lever (docs/BENCHMARKS.md). Where it cannot compile, one warning
    # and the uncompiled functions. CUDA uses the fused kernel instead.
    cfg.MODEL.FOCALSTAR.COMPILE_LOSS = False
    # A cache of the frozen ResNet trunk's features (tools/cache_features.py), read by the backbone
    # build_cached_trunk_retinanet_fpn_backbone instead of running the trunk: a CPU-scale study's
    # speed lever (docs/BENCHMARKS.md). "" = none.
    cfg.MODEL.FOCALSTAR.FEATURE_CACHE = ""

    # FCOSFLStar (d2_focalstar/modeling/fcos.py): detectron2's FCOS, whose keys its yacs config
    # lacks.
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

    # Safety metrics, computed beside COCO AP by d2_focalstar.evaluation.safety.SafetyEvaluator: for
    # these class names (those the dataset lacks are skipped), the log-average miss rate over false
    # positives per image in [1e-2, 1e0] and the recall at FP_PER_IMAGE false positives per image.
    cfg.TEST.SAFETY = CN()
    cfg.TEST.SAFETY.ENABLED = True
    cfg.TEST.SAFETY.CLASSES = [
        "person",
        "bicycle",
        "car",
        "motorcycle",
        "bus",
        "truck",
        "traffic light",
        "stop sign",
    ]
    cfg.TEST.SAFETY.FP_PER_IMAGE = 0.1
    # IoU at which a detection matches a ground-truth box for these metrics.
    cfg.TEST.SAFETY.IOU_THRESHOLD = 0.5
    # Which ground truth the miss rate counts (d2_focalstar.evaluation.safety.SAFETY_SETUPS):
    # "all", every box of the class (this project's); "reasonable", CityPersons' and Caltech's
    # published MR-2 subset (height >= 50 px, visibility >= 0.65 where annotations carry
    # "vis_ratio", "ignore" regions, as CityPersons' evaluation script); "reasonable_small",
    # "heavy_occlusion", "citypersons_all": that script's other setups.
    cfg.TEST.SAFETY.SETUP = "all"

    # More COCO-format datasets, registered by name at start-up without code:
    # a list of [name, json_file, image_root], e.g. [["mine_train", "a/train.json", "a/images"]].
    cfg.DATASETS.COCO_JSON = []
    # YOLO-format folders (one split each), as annotation tools export them: a list of
    # [name, images_dir, labels_dir, names], names being a file (one class a line, or a data.yaml
    # with 'names') or a comma-separated list; datasets/README.md.
    cfg.DATASETS.YOLO = []
    # Pascal VOC-style folders (root/Annotations/*.xml, root/JPEGImages/*.jpg,
    # root/ImageSets/Main/<image_set>.txt): a list of [name, root, image_set] or
    # [name, root, image_set, classes] (a file or a comma-separated list; without it, the sorted
    # object names of all of root/Annotations/*.xml); datasets/README.md.
    cfg.DATASETS.VOC_STYLE = []


#: The shapes of DATASETS.YOLO's and DATASETS.VOC_STYLE's entries: key -> (allowed lengths, fields).
FOLDER_DATASET_KEYS = {
    "YOLO": ((4,), "[name, images_dir, labels_dir, names]"),
    "VOC_STYLE": ((3, 4), "[name, root, image_set] or [name, root, image_set, classes]"),
}


def _folder_entry_problems(cfg: CN) -> List[str]:
    """What is wrong with the shape of DATASETS.YOLO's and DATASETS.VOC_STYLE's entries (their
    files are checked when they are registered)."""
    problems = []
    for key, (lengths, fields) in FOLDER_DATASET_KEYS.items():
        for i, item in enumerate(cfg.DATASETS[key]):
            if not (
                isinstance(item, (list, tuple))
                and len(item) in lengths
                and all(isinstance(s, str) and s for s in item)
            ):
                problems.append(
                    f"DATASETS.{key}[{i}]={item!r}: allowed {fields}, non-empty strings"
                )
    return problems


def check_focalstar_config(cfg: CN, node: Optional[str] = None) -> List[str]:
    """Raise ConfigError naming the key, the value and what is allowed, for a bad setting of ours.
    ``node``: the config node of the config's detector, where its alpha and FL gamma live
    (``d2_focalstar.modeling.loss_config_node(cfg)``; None: MODEL.RETINANET). Returns the
    warnings to show: a parameter that the loss type does not use, set away from its default."""
    problems, warnings = loss_config_problems(cfg, node or DEFAULT_NODE)
    for i, item in enumerate(cfg.DATASETS.COCO_JSON):
        if not (
            isinstance(item, (list, tuple))
            and len(item) == 3
            and all(isinstance(s, str) and s for s in item)
        ):
            problems.append(
                f"DATASETS.COCO_JSON[{i}]={item!r}: allowed "
                "[name, json_file, image_root], three non-empty strings"
            )
    problems += _folder_entry_problems(cfg)
    safety = cfg.TEST.SAFETY
    if not (
        isinstance(safety.CLASSES, (list, tuple))
        and all(isinstance(c, str) for c in safety.CLASSES)
    ):
        problems.append(f"TEST.SAFETY.CLASSES={safety.CLASSES!r}: allowed a list of class names")
    if not (isinstance(safety.FP_PER_IMAGE, (int, float)) and safety.FP_PER_IMAGE > 0):
        problems.append(f"TEST.SAFETY.FP_PER_IMAGE={safety.FP_PER_IMAGE!r}: allowed a number > 0")
    if not (isinstance(safety.IOU_THRESHOLD, (int, float)) and 0 < safety.IOU_THRESHOLD <= 1):
        problems.append(f"TEST.SAFETY.IOU_THRESHOLD={safety.IOU_THRESHOLD!r}: allowed (0, 1]")
    from .evaluation.safety import SAFETY_SETUPS  # the setups' one table

    if safety.SETUP not in SAFETY_SETUPS:
        problems.append(
            f"TEST.SAFETY.SETUP={safety.SETUP!r}: allowed {', '.join(map(repr, SAFETY_SETUPS))}"
        )
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return warnings
