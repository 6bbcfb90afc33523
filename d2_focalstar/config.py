import math

from detectron2.config import CfgNode as CN

from .losses import LOSS_TYPES


class ConfigError(ValueError):
    """A bad config value, command line or dataset, found at start-up; reported on one line."""


def add_focalstar_config(cfg):
    """
    Add every config key of d2-focalstar, with its default. Alpha is detectron2's
    MODEL.RETINANET.FOCAL_LOSS_ALPHA and FL's gamma MODEL.RETINANET.FOCAL_LOSS_GAMMA.
    """
    cfg.MODEL.FOCALSTAR = CN()
    # Classification loss of RetinaNetFLStar: "FLSTAR" (modified focal loss), "FL" (focal loss,
    # gamma = MODEL.RETINANET.FOCAL_LOSS_GAMMA), "CE" (alpha-balanced cross-entropy) or
    # "FLSTAR_APPENDIX" (the RetinaNet paper appendix's FL*, fvcore's sigmoid_focal_loss_star).
    cfg.MODEL.FOCALSTAR.LOSS_TYPE = "FLSTAR"
    # FL*'s gamma: the factor is ((1 - p_t) / p_t) ** GAMMA. The proposal's values: 0.125, 0.25, 0.5.
    cfg.MODEL.FOCALSTAR.GAMMA = 0.25
    # Cap on FL*'s factor for very hard examples (p_t -> 0); past it the gradient is MAX_FACTOR
    # times CE's. 0 = no cap (the exact, unbounded formula).
    cfg.MODEL.FOCALSTAR.MAX_FACTOR = 100.0
    # Compute the classification loss with the fused Triton kernel (d2_focalstar/fused.py) on
    # CUDA: same values as the reference functions, no one-hot tensor (~20x faster and ~10 GiB
    # less than stock detectron2's loss for COCO-sized batches on one H100, docs/BENCHMARKS.md).
    # False: the reference functions everywhere.
    # On the CPU the reference functions are always used.
    cfg.MODEL.FOCALSTAR.FUSED_KERNEL = True
    # On CUDA (MODEL.DEVICE "cuda..."), keep RetinaNetFLStar's convolution weights in the
    # channels_last (NHWC) layout that tensor cores prefer: the activations follow, and the head's
    # outputs reach the loss without a copy. Same maths, different cuDNN kernels (rounding may
    # differ). Measured 1.13x (cudnn.benchmark off) and 1.28x (on) the train throughput of
    # the NCHW layout on one H100 (docs/BENCHMARKS.md). Ignored on the CPU.
    cfg.MODEL.FOCALSTAR.CHANNELS_LAST = True
    # Gamma of LOSS_TYPE "FLSTAR_APPENDIX": -log(sigmoid(gamma * x_t)) / gamma (> 0).
    cfg.MODEL.FOCALSTAR.APPENDIX_GAMMA = 2.0

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


def check_focalstar_config(cfg):
    """Raise ConfigError naming the key, the value and what is allowed, for a bad setting of ours."""
    fs, rn = cfg.MODEL.FOCALSTAR, cfg.MODEL.RETINANET
    problems = []
    if str(fs.LOSS_TYPE).upper() not in LOSS_TYPES:
        problems.append(f"MODEL.FOCALSTAR.LOSS_TYPE={fs.LOSS_TYPE!r}: allowed {', '.join(LOSS_TYPES)}")
    for key, value in (("MODEL.FOCALSTAR.GAMMA", fs.GAMMA),
                       ("MODEL.RETINANET.FOCAL_LOSS_GAMMA", rn.FOCAL_LOSS_GAMMA)):
        if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
            problems.append(f"{key}={value!r}: allowed a finite number >= 0")
    if not (isinstance(fs.APPENDIX_GAMMA, (int, float)) and 0 < fs.APPENDIX_GAMMA < math.inf):
        problems.append(f"MODEL.FOCALSTAR.APPENDIX_GAMMA={fs.APPENDIX_GAMMA!r}: allowed a finite number > 0")
    alpha = rn.FOCAL_LOSS_ALPHA
    if not (isinstance(alpha, (int, float)) and (0 <= alpha <= 1 or alpha == -1)):
        problems.append(f"MODEL.RETINANET.FOCAL_LOSS_ALPHA={alpha!r}: allowed [0, 1], "
                        "or -1 for no class weighting")
    cap = fs.MAX_FACTOR
    if not (isinstance(cap, (int, float)) and (cap == 0 or cap >= 1)):
        problems.append(f"MODEL.FOCALSTAR.MAX_FACTOR={cap!r}: allowed 0 (no cap) or a number >= 1")
    for i, entry in enumerate(cfg.DATASETS.COCO_JSON):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3
                and all(isinstance(s, str) and s for s in entry)):
            problems.append(f"DATASETS.COCO_JSON[{i}]={entry!r}: allowed "
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
