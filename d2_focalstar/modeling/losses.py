"""
Sigmoid classification losses for one-stage detectors, and the one table of loss types.

FL* here is the *modified focal loss* of the d2-focalstar proposal,

    FL*(p_t) = -a_t ((1 - p_t) / p_t)^gamma log(p_t),

whose modulating factor is 1 at p_t = 0.5, below 1 for easy examples and above 1 (without bound)
for hard ones. It is NOT ``fvcore.nn.sigmoid_focal_loss_star``, which is the different "FL*" of the
RetinaNet paper's appendix (Lin et al., ICCV 2017): -log(sigmoid(gamma * x_t)) / gamma, here
``FLSTAR_APPENDIX``.

Every loss is computed in logit space. With x the logit and x_t = x for a positive target and -x
for a negative one (so p_t = sigmoid(x_t)):

    -log(p_t)                  = softplus(-x_t)
    (1 - p_t)^g                = exp(-g * softplus(x_t))
    ((1 - p_t) / p_t)^g        = exp(-g * x_t)

so nothing takes log(0) or a negative power of 0, whatever the logit.

:data:`LOSS_TYPES` is the table: each entry gives a type's name, its formula, its per-element
function in logit space, the parameters it takes (each with its config key and default), whether
FL*'s cap applies, and its fused-kernel code. The config keys and their checks, the kernel's
dispatch, the divergence message, sweep plans and the comparison's setting names all read it;
``docs/ADDING_A_LOSS.md`` says how to add a type.
"""

import enum
import math
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from detectron2.config import CfgNode

__all__ = [
    "LossParam",
    "LossType",
    "KernelCode",
    "LOSS_TYPES",
    "ALPHA",
    "DEFAULT_NODE",
    "loss_type",
    "check_loss_arguments",
    "LossSetting",
    "loss_setting",
    "loss_config_problems",
    "config_value",
    "sigmoid_classification_loss",
    "sigmoid_flstar_loss",
    "sigmoid_focal_loss",
    "sigmoid_ce_loss",
    "sigmoid_poly1_focal_loss",
    "config_table",
]

_REDUCTIONS = ("none", "mean", "sum")


@dataclass(frozen=True)
class LossParam:
    """A parameter of a loss type. ``key`` is its config key; ``{node}`` in it stands for the
    config node of the detector that owns the loss (MODEL.RETINANET, MODEL.FCOS)."""

    name: str  # keyword argument of the loss functions
    key: str
    default: float  # the one default: config and functions
    allowed: str  # what is allowed, in words, for error messages
    check: Callable[[float], bool]  # whether a value is allowed (NaN never is)
    short: str  # in run and setting names: "g" -> flstar_g0.25
    help: str  # one line, for the config and the docs

    def config_key(self, node: str) -> str:
        return self.key.format(node=node)

    def validate(self, value: Any) -> Optional[str]:
        """None if ``value`` is allowed, else 'name=value must be ...'."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        return None if ok and self.check(value) else f"{self.name}={value!r} must be {self.allowed}"


class KernelCode(enum.IntEnum):
    """The branches of the fused kernel (d2_focalstar/modeling/fused.py), by name."""

    FLSTAR = 0
    FL = 1
    CE = 2
    FLSTAR_APPENDIX = 3


@dataclass(frozen=True)
class LossType:
    name: str  # MODEL.FOCALSTAR.LOSS_TYPE
    formula: str  # in p_t, as papers write it
    per_element: Callable[..., torch.Tensor]  # (x_t, **params) -> loss before a_t, in logit space
    params: Tuple[LossParam, ...] = ()
    # (x_t, **params) -> a term added after a_t
    unweighted: Optional[Callable[..., torch.Tensor]] = None
    capped: bool = False  # MODEL.FOCALSTAR.MAX_FACTOR caps the factor (one of params)
    kernel: Optional[KernelCode] = None  # None: the reference functions on the GPU too
    sweep: Dict[str, Tuple[float, ...]] = field(default_factory=dict)  # values a sweep tries
    reference: str = ""  # the paper

    def param(self, name: str) -> LossParam:
        return next(p for p in self.params if p.name == name)

    def defaults(self) -> Dict[str, float]:
        return {p.name: p.default for p in self.params}


def _finite_at_least(low: float, strict: bool = False) -> Callable[[float], bool]:
    return lambda v: (v > low if strict else v >= low) and v < math.inf


#: alpha: the positives' weight a in a_t (negatives 1 - a), for every type; detectron2's key.
ALPHA = LossParam(
    "alpha",
    "{node}.FOCAL_LOSS_ALPHA",
    0.25,
    "in [0, 1], or -1 for no weighting",
    lambda v: 0 <= v <= 1 or v == -1,
    "a",
    "a in a_t for every loss type (negatives get 1 - a); -1 = no weighting",
)

FLSTAR_GAMMA = LossParam(
    "gamma",
    "MODEL.FOCALSTAR.GAMMA",
    0.25,
    "a finite number >= 0",
    _finite_at_least(0),
    "g",
    "FL*'s g: the factor is ((1 - p_t) / p_t)^g",
)
MAX_FACTOR = LossParam(
    "max_factor",
    "MODEL.FOCALSTAR.MAX_FACTOR",
    100.0,
    "0 (no cap) or a number >= 1",
    lambda v: v == 0 or v >= 1,
    "cap",
    "cap on FL*'s factor for very hard examples; past it the gradient is "
    "MAX_FACTOR x CE's; 0 = none",
)
FL_GAMMA = LossParam(
    "gamma",
    "{node}.FOCAL_LOSS_GAMMA",
    2.0,
    "a finite number >= 0",
    _finite_at_least(0),
    "g",
    "FL's g (detectron2's key): the factor is (1 - p_t)^g",
)
APPENDIX_GAMMA = LossParam(
    "gamma",
    "MODEL.FOCALSTAR.APPENDIX_GAMMA",
    2.0,
    "a finite number > 0",
    _finite_at_least(0, strict=True),
    "g",
    "g of FLSTAR_APPENDIX, -log(sigmoid(g x_t)) / g",
)
POLY1_EPS = LossParam(
    "eps",
    "MODEL.FOCALSTAR.POLY1_EPS",
    1.0,
    "a finite number >= -1 (Leng et al.'s range)",
    _finite_at_least(-1),
    "eps",
    "Poly-1's eps: FL + eps (1 - p_t)^(g+1)",
)


# ---- the per-element formulas, in logit space, before a_t -------------------------------------


def _ce(x_t: torch.Tensor) -> torch.Tensor:
    return F.softplus(-x_t)  # -log(p_t)


def _fl(x_t: torch.Tensor, gamma: float) -> torch.Tensor:
    return F.softplus(-x_t) * torch.exp(-gamma * F.softplus(x_t)) if gamma > 0 else _ce(x_t)


def _flstar(x_t: torch.Tensor, gamma: float, max_factor: float) -> torch.Tensor:
    log_factor = -gamma * x_t  # log ((1 - p_t) / p_t)^gamma
    if 0 < max_factor < math.inf:
        log_factor = log_factor.clamp(max=math.log(max_factor))
    return F.softplus(-x_t) * torch.exp(log_factor) if gamma > 0 else _ce(x_t)


def _flstar_appendix(x_t: torch.Tensor, gamma: float) -> torch.Tensor:
    return F.softplus(-gamma * x_t) / gamma


def _fl_of_poly1(x_t: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    return _fl(x_t, gamma)  # the a_t-weighted part; eps enters through _poly1_term


def _poly1_term(x_t: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    # (1 - p_t)^(g + 1) = exp(-(g + 1) softplus(x_t)): finite and in [0, 1] for any logit.
    # Not weighted by a_t: Leng et al. add it to the alpha-balanced FL.
    return eps * torch.exp(-(gamma + 1) * F.softplus(x_t))


#: The table of loss types, by name (MODEL.FOCALSTAR.LOSS_TYPE).
LOSS_TYPES: Dict[str, LossType] = {
    t.name: t
    for t in [
        LossType(
            "FLSTAR",
            "-a_t ((1 - p_t) / p_t)^g log(p_t)",
            _flstar,
            (FLSTAR_GAMMA, MAX_FACTOR),
            capped=True,
            kernel=KernelCode.FLSTAR,
            sweep={"gamma": (0.125, 0.25, 0.5)},
            reference="the d2-focalstar proposal (modified focal loss)",
        ),
        LossType(
            "FL",
            "-a_t (1 - p_t)^g log(p_t)",
            _fl,
            (FL_GAMMA,),
            kernel=KernelCode.FL,
            reference="Lin et al., ICCV 2017 (RetinaNet)",
        ),
        LossType(
            "CE",
            "-a_t log(p_t)",
            _ce,
            (),
            kernel=KernelCode.CE,
            reference="alpha-balanced cross-entropy",
        ),
        LossType(
            "FLSTAR_APPENDIX",
            "-a_t log(sigmoid(g x_t)) / g",
            _flstar_appendix,
            (APPENDIX_GAMMA,),
            kernel=KernelCode.FLSTAR_APPENDIX,
            reference="Lin et al., ICCV 2017, appendix (fvcore's sigmoid_focal_loss_star)",
        ),
        LossType(
            "POLY1_FL",
            "-a_t (1 - p_t)^g log(p_t) + eps (1 - p_t)^(g+1)",
            _fl_of_poly1,
            (FL_GAMMA, POLY1_EPS),
            unweighted=_poly1_term,
            reference="Leng et al., ICLR 2022 (PolyLoss, Poly-1 focal loss)",
        ),
    ]
}


def loss_type(name: str) -> LossType:
    """The :class:`LossType` of ``name`` (any case); a ValueError listing the table's names."""
    entry = LOSS_TYPES.get(str(name).upper())
    if entry is None:
        raise ValueError(f"loss_type={name!r} is not one of {', '.join(LOSS_TYPES)}")
    return entry


def check_loss_arguments(
    name: str, alpha: float, params: Mapping[str, Optional[float]]
) -> Tuple[LossType, Dict[str, float]]:
    """(LossType, every parameter of the type with defaults filled in); a ValueError naming the
    argument and what is allowed if one is bad or is not the type's. Shared by the reference
    functions and the fused kernel (d2_focalstar/modeling/fused.py)."""
    entry = loss_type(name)
    unknown = sorted(set(params) - {p.name for p in entry.params})
    if unknown:
        takes = ", ".join(p.name for p in entry.params) or "no parameter but alpha"
        raise ValueError(f"{entry.name} takes {takes}; not {', '.join(unknown)}")
    values = {**entry.defaults(), **{k: v for k, v in params.items() if v is not None}}
    # alpha: the functions also take any negative number for "no weighting", as fvcore does
    problems = [p.validate(values[p.name]) for p in entry.params]
    if not (isinstance(alpha, (int, float)) and alpha == alpha and alpha <= 1):
        problems.append(f"alpha={alpha!r} must be in [0, 1], or < 0 for no weighting")
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{entry.name}: " + "; ".join(problems))
    return entry, values


#: The config node whose FOCAL_LOSS_* keys a detector reads when it does not say
#: (``loss_config_node``): detectron2's RetinaNet's.
DEFAULT_NODE: str = "MODEL.RETINANET"


def config_value(cfg: "CfgNode", key: str) -> Any:
    """cfg's value at a dotted key ('MODEL.FOCALSTAR.GAMMA'); KeyError if it has none."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


@dataclass(frozen=True)
class LossSetting:
    """The classification loss a config sets for one detector: what every reader of a config's
    loss uses (the detectors, results.json, the divergence message, sweeps)."""

    loss_type: str  # the table's name, upper case
    alpha: float
    params: Dict[str, float]  # every parameter of the type, from its config key
    node: str  # the detector's config node ('{node}' in the keys)

    def keys(self) -> Dict[str, str]:
        """{parameter name: its config key} of the type's parameters."""
        entry = LOSS_TYPES[self.loss_type]
        return {p.name: p.config_key(self.node) for p in entry.params}


def loss_config_problems(cfg: "CfgNode", node: str) -> Tuple[List[str], List[str]]:
    """(problems, warnings) of the loss keys of ``cfg`` for the detector whose config node is
    ``node``: MODEL.FOCALSTAR.LOSS_TYPE, alpha and every parameter of the table (those of other
    types too: a bad value is a mistake wherever it is). A problem names the key, the value and
    what is allowed; a warning, a parameter the loss type does not use, set away from its
    default."""
    problems, warnings = [], []
    name = cfg.MODEL.FOCALSTAR.LOSS_TYPE
    entry = LOSS_TYPES.get(str(name).upper())
    if entry is None:
        problems.append(f"MODEL.FOCALSTAR.LOSS_TYPE={name!r}: allowed {', '.join(LOSS_TYPES)}")
    keys = {ALPHA.config_key(node): ALPHA}
    for other in LOSS_TYPES.values():
        for param in other.params:
            keys.setdefault(param.config_key(node), param)
    for key, param in keys.items():
        value = config_value(cfg, key)
        if param.validate(value):
            problems.append(f"{key}={value!r}: allowed {param.allowed}")
        elif (
            entry is not None
            and param is not ALPHA
            and param not in entry.params
            and value != param.default
        ):
            used = ", ".join(p.config_key(node) for p in entry.params) or "none of them"
            warnings.append(
                f"{key}={value!r} is set but LOSS_TYPE {entry.name} does not use it "
                f"(it uses {used})"
            )
    return problems, warnings


def loss_setting(cfg: "CfgNode", node: Optional[str] = None) -> LossSetting:
    """The :class:`LossSetting` of ``cfg`` for the detector whose config node is ``node``
    (MODEL.RETINANET, MODEL.FCOS; None: :data:`DEFAULT_NODE`): MODEL.FOCALSTAR.LOSS_TYPE, alpha
    from ``node``.FOCAL_LOSS_ALPHA, each parameter from its key in the table. A ValueError naming
    each bad key, its value and what is allowed (:func:`loss_config_problems`)."""
    node = node or DEFAULT_NODE
    problems, _ = loss_config_problems(cfg, node)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    entry = loss_type(cfg.MODEL.FOCALSTAR.LOSS_TYPE)
    params = {p.name: config_value(cfg, p.config_key(node)) for p in entry.params}
    return LossSetting(entry.name, config_value(cfg, ALPHA.config_key(node)), params, node)


def sigmoid_classification_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_type: str = "FLSTAR",
    alpha: float = ALPHA.default,
    reduction: str = "none",
    **params: Optional[float],
) -> torch.Tensor:
    """
    The one implementation of every type in :data:`LOSS_TYPES`, so that runs comparing them
    differ only in the loss.

    Args:
        inputs: logits of any shape, fp32, fp16 or bf16 (or fp64). Half-precision logits are
            computed on, and the loss returned, in fp32: FL*'s factor overflows fp16.
        targets: same shape as ``inputs``, binary (0 or 1) classification labels. Soft labels
            are not supported: x_t needs a sign.
        loss_type: a name of :data:`LOSS_TYPES`: "FLSTAR" (modified focal loss), "FL" (focal
            loss), "CE" (alpha-balanced cross-entropy), "FLSTAR_APPENDIX" (the RetinaNet
            appendix's FL*, fvcore's ``sigmoid_focal_loss_star``), "POLY1_FL" (Poly-1 focal loss).
        alpha: weight of positives in [0, 1] (negatives get 1 - alpha); alpha < 0 means no
            weighting, as in fvcore.
        reduction: "none" (per element), "mean" (NaN for empty inputs, as torch's mean) or "sum".
        params: the type's parameters (its table entry; defaults from there), e.g. ``gamma``,
            ``max_factor`` (FLSTAR: cap on the factor ((1-p_t)/p_t)^gamma, which is unbounded as
            p_t -> 0. Where the cap binds (x_t < -ln(max_factor)/gamma) the factor is constant
            and the gradient is ``max_factor`` times CE's; its magnitude never exceeds
            a_t * max_factor * (1 + ln(max_factor) + gamma ln 2). 0 means no cap: the exact
            formula, whose gradient overflows fp32 for gamma * |x_t| > ~88), ``eps`` (POLY1_FL).

    Returns:
        loss tensor (fp32, or fp64 for fp64 inputs), shape of ``inputs`` for "none", a scalar
        otherwise.
    """
    entry, values = check_loss_arguments(loss_type, alpha, params)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {_REDUCTIONS}")
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ")

    x = inputs.to(torch.promote_types(inputs.dtype, torch.float32))  # fp16/bf16 -> fp32
    pos = targets > 0.5
    x_t = raw_x_t = torch.where(pos, x, -x)
    if alpha in (0, 1):
        # a term weighted 0 (alpha 1: the negatives; 0: the positives) is computed at x_t = 0, so
        # that an uncapped factor's overflow there gives 0 * finite, not 0 * inf = NaN
        x_t = torch.where(pos if alpha == 0 else ~pos, torch.zeros_like(x_t), x_t)
    loss = entry.per_element(x_t, **values)
    if alpha >= 0:
        loss = loss * torch.where(pos, alpha, 1.0 - alpha)
    if entry.unweighted is not None:
        loss = loss + entry.unweighted(raw_x_t, **values)

    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sigmoid_flstar_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = ALPHA.default,
    gamma: float = FLSTAR_GAMMA.default,
    reduction: str = "none",
    max_factor: float = MAX_FACTOR.default,
) -> torch.Tensor:
    """
    Modified focal loss of the d2-focalstar proposal (not fvcore's ``sigmoid_focal_loss_star``):

        FL*(p_t) = -a_t ((1 - p_t) / p_t)^gamma log(p_t),  p = sigmoid(inputs).

    The factor is 1 at p_t = 0.5, < 1 for easy examples, > 1 and unbounded for hard ones;
    ``max_factor`` caps it (see :func:`sigmoid_classification_loss` for its effect on the
    gradient). Arguments and return value as in :func:`sigmoid_classification_loss`.
    """
    return sigmoid_classification_loss(
        inputs, targets, "FLSTAR", alpha, reduction, gamma=gamma, max_factor=max_factor
    )


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = ALPHA.default,
    gamma: float = FL_GAMMA.default,
    reduction: str = "none",
) -> torch.Tensor:
    """
    Focal loss of RetinaNet (Lin et al., ICCV 2017), FL(p_t) = -a_t (1 - p_t)^gamma log(p_t),
    in logit space; equal to ``fvcore.nn.sigmoid_focal_loss`` up to rounding.
    Arguments and return value as in :func:`sigmoid_classification_loss`.
    """
    return sigmoid_classification_loss(inputs, targets, "FL", alpha, reduction, gamma=gamma)


def sigmoid_ce_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = ALPHA.default,
    reduction: str = "none",
) -> torch.Tensor:
    """
    Alpha-balanced sigmoid cross-entropy, CE(p_t) = -a_t log(p_t).
    Arguments and return value as in :func:`sigmoid_classification_loss`.
    """
    return sigmoid_classification_loss(inputs, targets, "CE", alpha, reduction)


def sigmoid_poly1_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = ALPHA.default,
    gamma: float = FL_GAMMA.default,
    eps: float = POLY1_EPS.default,
    reduction: str = "none",
) -> torch.Tensor:
    """
    Poly-1 focal loss (Leng et al., "PolyLoss", ICLR 2022): FL(p_t) + eps (1 - p_t)^(gamma + 1),
    where FL is alpha-balanced and the eps term is not, as in the paper's code.
    Arguments and return value as in :func:`sigmoid_classification_loss`.
    """
    return sigmoid_classification_loss(
        inputs, targets, "POLY1_FL", alpha, reduction, gamma=gamma, eps=eps
    )


def config_table(nodes: Sequence[str] = ("MODEL.RETINANET", "MODEL.FCOS")) -> str:
    """The Markdown key table of the loss types and their parameters, for docs/CONFIG.md (a test
    checks that it holds this table; ``tools/loss_table.py --write`` puts it there). ``nodes``:
    the detectors' config nodes, where a key is the detector's own ('{node}' in the table)."""
    rows = [
        "| key | default | meaning |",
        "| --- | --- | --- |",
        '| `MODEL.FOCALSTAR.LOSS_TYPE` | `"FLSTAR"` | one of '
        + ", ".join(f"`{t.name}` ({t.formula})" for t in LOSS_TYPES.values())
        + " |",
    ]
    seen = set()
    for param in [ALPHA] + [p for t in LOSS_TYPES.values() for p in t.params]:
        if param.key in seen:
            continue
        seen.add(param.key)
        keys = [param.config_key(n) for n in nodes] if "{node}" in param.key else [param.key]
        users = (
            "all"
            if param is ALPHA
            else ", ".join(t.name for t in LOSS_TYPES.values() if param in t.params)
        )
        rows.append(
            f"| {' / '.join(f'`{k}`' for k in keys)} | `{param.default!r}` | {param.help} "
            f"(used by {users}; allowed: {param.allowed}) |"
        )
    return "\n".join(rows) + "\n"
