"""
Sigmoid classification losses for one-stage detectors: FL*, FL and CE on one code path.

FL* here is the *modified focal loss* of the d2-focalstar proposal,

    FL*(p_t) = -a_t ((1 - p_t) / p_t)^gamma log(p_t),

whose modulating factor is 1 at p_t = 0.5, below 1 for easy examples and above 1 (without bound)
for hard ones. It is NOT ``fvcore.nn.sigmoid_focal_loss_star``, which is the different "FL*" of the
RetinaNet paper's appendix (Lin et al., ICCV 2017): -log(sigmoid(gamma * x_t)) / gamma.

All three losses are computed in logit space. With x the logit and x_t = x for a positive target
and -x for a negative one (so p_t = sigmoid(x_t)):

    -log(p_t)                 = softplus(-x_t)
    FL  factor (1 - p_t)^g    = exp(-g * softplus(x_t))
    FL* factor ((1-p_t)/p_t)^g = exp(-g * x_t)

so nothing takes log(0) or a negative power of 0, whatever the logit.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["LOSS_TYPES", "sigmoid_flstar_loss", "sigmoid_focal_loss", "sigmoid_ce_loss",
           "sigmoid_classification_loss", "check_loss_arguments", "gamma_for"]

#: Loss types accepted by :func:`sigmoid_classification_loss` (and MODEL.FOCALSTAR.LOSS_TYPE).
#: "FLSTAR_APPENDIX" is the other FL*, of the RetinaNet paper's appendix (fvcore's
#: ``sigmoid_focal_loss_star``), so that a study can put both side by side.
LOSS_TYPES = ("FLSTAR", "FL", "CE", "FLSTAR_APPENDIX")
_REDUCTIONS = ("none", "mean", "sum")


def check_loss_arguments(loss_type: str, alpha: float, gamma: float, max_factor: float) -> str:
    """The loss type, upper-cased; a ValueError naming the argument and what is allowed if one of
    them is bad. Shared by this module and the fused kernel (d2_focalstar/fused.py)."""
    loss_type = loss_type.upper()
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if not 0 <= gamma < math.inf:  # also catches NaN
        raise ValueError(f"gamma={gamma} must be a finite number >= 0")
    if loss_type == "FLSTAR_APPENDIX" and gamma == 0:
        raise ValueError("gamma=0 is not allowed for FLSTAR_APPENDIX (it divides by gamma)")
    if alpha > 1 or alpha != alpha:
        raise ValueError(f"alpha={alpha} must be in [0, 1], or < 0 for no weighting")
    if not (max_factor == 0 or max_factor >= 1):
        raise ValueError(f"max_factor={max_factor} must be 0 (no cap) or >= 1")
    return loss_type


def sigmoid_classification_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_type: str = "FLSTAR",
    alpha: float = 0.25,
    gamma: float = 0.5,
    max_factor: float = 100.0,
    reduction: str = "none",
) -> torch.Tensor:
    """
    The one implementation behind :func:`sigmoid_flstar_loss`, :func:`sigmoid_focal_loss` and
    :func:`sigmoid_ce_loss`, so that runs comparing them differ only in the loss.

    Args:
        inputs: logits of any shape, fp32, fp16 or bf16 (or fp64). Half-precision logits are
            computed on, and the loss returned, in fp32: FL*'s factor overflows fp16.
        targets: same shape as ``inputs``, binary (0 or 1) classification labels. Soft labels
            are not supported: x_t needs a sign.
        loss_type: "FLSTAR" (modified focal loss), "FL" (focal loss), "CE"
            (alpha-balanced cross-entropy; gamma is ignored) or "FLSTAR_APPENDIX" (the RetinaNet
            appendix's FL*, -log(sigmoid(gamma * x_t)) / gamma, as fvcore's
            ``sigmoid_focal_loss_star``; gamma must be > 0).
        alpha: weight of positives in [0, 1] (negatives get 1 - alpha); alpha < 0 means no
            weighting, as in fvcore.
        gamma: exponent of the modulating factor, finite and >= 0. gamma = 0 gives CE for FL
            and FL*.
        max_factor: FLSTAR only. Cap on the modulating factor ((1-p_t)/p_t)^gamma, which is
            unbounded as p_t -> 0. Where the cap binds (x_t < -ln(max_factor)/gamma) the factor
            is the constant ``max_factor`` and the gradient is ``max_factor`` times CE's,
            -a_t * max_factor * sigmoid(-x_t). The gradient's magnitude is largest just before
            the cap binds and never exceeds a_t * max_factor * (1 + ln(max_factor) + gamma ln 2).
            0 (or inf) means no cap: the exact formula,
            whose gradient grows like exp(gamma * |x_t|) and overflows fp32 for
            gamma * |x_t| > ~88.
        reduction: "none" (per element), "mean" (NaN for empty inputs, as torch's mean) or "sum".

    Returns:
        loss tensor (fp32, or fp64 for fp64 inputs), shape of ``inputs`` for "none", a scalar
        otherwise.
    """
    loss_type = check_loss_arguments(loss_type, alpha, gamma, max_factor)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {_REDUCTIONS}")
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ")

    x = inputs.to(torch.promote_types(inputs.dtype, torch.float32))  # fp16/bf16 -> fp32
    pos = targets > 0.5
    x_t = torch.where(pos, x, -x)
    if alpha in (0, 1):
        # a term weighted 0 (alpha 1: the negatives; 0: the positives) is computed at x_t = 0, so
        # that an uncapped factor's overflow there gives 0 * finite, not 0 * inf = NaN
        x_t = torch.where(pos if alpha == 0 else ~pos, torch.zeros_like(x_t), x_t)
    loss = F.softplus(-x_t)  # -log(p_t), the cross-entropy
    if loss_type == "FLSTAR_APPENDIX":
        loss = F.softplus(-gamma * x_t) / gamma
    elif loss_type == "FL" and gamma > 0:
        loss = loss * torch.exp(-gamma * F.softplus(x_t))
    elif loss_type == "FLSTAR" and gamma > 0:
        log_factor = -gamma * x_t
        if 0 < max_factor < math.inf:
            log_factor = log_factor.clamp(max=math.log(max_factor))
        loss = loss * torch.exp(log_factor)
    if alpha >= 0:
        loss = loss * torch.where(pos, alpha, 1.0 - alpha)

    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sigmoid_flstar_loss(inputs, targets, alpha=0.25, gamma=0.5, reduction="none", max_factor=100.0):
    """
    Modified focal loss of the d2-focalstar proposal (not fvcore's ``sigmoid_focal_loss_star``):

        FL*(p_t) = -a_t ((1 - p_t) / p_t)^gamma log(p_t),  p = sigmoid(inputs).

    The factor is 1 at p_t = 0.5, < 1 for easy examples, > 1 and unbounded for hard ones;
    ``max_factor`` caps it (see :func:`sigmoid_classification_loss` for its effect on the
    gradient). Arguments and return value as in :func:`sigmoid_classification_loss`.
    """
    return sigmoid_classification_loss(inputs, targets, "FLSTAR", alpha, gamma, max_factor, reduction)


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """
    Focal loss of RetinaNet (Lin et al., ICCV 2017), FL(p_t) = -a_t (1 - p_t)^gamma log(p_t),
    in logit space; equal to ``fvcore.nn.sigmoid_focal_loss`` up to rounding.
    Arguments and return value as in :func:`sigmoid_classification_loss`.
    """
    return sigmoid_classification_loss(inputs, targets, "FL", alpha, gamma, 0.0, reduction)


def sigmoid_ce_loss(inputs, targets, alpha=0.25, reduction="none"):
    """
    Alpha-balanced sigmoid cross-entropy, CE(p_t) = -a_t log(p_t).
    Arguments and return value as in :func:`sigmoid_classification_loss`.
    """
    return sigmoid_classification_loss(inputs, targets, "CE", alpha, 0.0, 0.0, reduction)


def gamma_for(loss_type, flstar_gamma, focal_gamma, appendix_gamma):
    """The gamma that ``loss_type`` uses, out of the config's three (CE ignores it)."""
    return {"FLSTAR": flstar_gamma, "FL": focal_gamma, "CE": 0.0,
            "FLSTAR_APPENDIX": appendix_gamma}[loss_type.upper()]
