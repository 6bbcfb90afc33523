"""
A fused Triton kernel for the classification loss of RetinaNetFLStar (FL*, FL, CE and the
appendix FL*), forward and backward, taking the integer anchor labels directly.

Compared with the reference path
(:func:`d2_focalstar.modeling.losses.sigmoid_classification_loss` on a one-hot target), it builds
no one-hot tensor and no boolean-masked copy of the logits: ignored anchors (label -1) are masked
inside the kernel. The forward reads the logits once and writes one partial sum per block (summed
in fp32 afterwards, in a fixed order: deterministic); the backward reads them again and writes the
gradient, so the whole costs three passes over the logits. The
work is cut into blocks of consecutive elements of the flattened logits (not tiles of rows), so
that loads and stores are contiguous and no lanes are lost when K is not a power of two; a block
is read in groups of gcd(K, 16) elements, which lie in one row and share one label load. A
forward program sums several blocks one after another before its one reduction.

Runs on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how
the tests check it against the reference without a GPU. The per-element maths is the reference's:
x_t = x for the label's column and -x elsewhere; loss = a_t * factor(x_t) * softplus(-x_t), written
in base 2 so that each exp is one exp2 instruction on the GPU and the one log is a short
polynomial (``_log2_1p``). The forward kernel is bound by instruction issue, not memory, so this
matters: ``tools/fused_sass_stats.py`` counts the instructions per element without a GPU.
"""

import logging
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .losses import KernelCode, check_loss_arguments

__all__ = [
    "fused_classification_loss",
    "checked_fused_loss",
    "agrees_with_reference",
    "INTERPRETED",
]

logger = logging.getLogger(__name__)

#: The kernels below run in Triton's interpreter (on CPU tensors too): TRITON_INTERPRET=1 was set
#: when this module was imported, which is when triton.jit reads it.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The kernel's branches, named after the loss table's kernel codes (d2_focalstar/modeling/losses.py)
_FLSTAR = tl.constexpr(int(KernelCode.FLSTAR))
_FL = tl.constexpr(int(KernelCode.FL))
_APPENDIX = tl.constexpr(int(KernelCode.FLSTAR_APPENDIX))  # CE: none of these, the plain -log(p_t)

# Constants the kernels use; the kernels work in base 2 (exp2 is one GPU instruction, exp three).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log2_1p(u):
    """log2(1 + u) for u in [0, 1], tiny u included: u times a degree-8 polynomial, the Chebyshev
    interpolant of log2(1 + u) / u on [0, 1] (numpy.polynomial.chebyshev.Chebyshev.interpolate,
    converted to powers). Relative error below 2e-7 in fp32 (tests/test_fused.py checks it against
    float64). A polynomial instead of a log: on the GPU a log is ~20 instructions, this is 9."""
    q = 0.0073954020626842976 * u - 0.04194501042366028
    q = q * u + 0.11183207482099533
    q = q * u - 0.1962389498949051
    q = q * u + 0.27522119879722595
    q = q * u - 0.3582990765571594
    q = q * u + 0.48067888617515564
    q = q * u - 0.7213395237922668
    q = q * u + 1.4426950216293335
    return u * q


@triton.jit
def _neg_log2_sigmoid(z):
    """-log2(sigmoid(z)) for z in base-2 units (z = x log2(e)), without overflow or log(0):
    max(-z, 0) + log2(1 + 2^-|z|)."""
    return tl.maximum(-z, 0.0) + _log2_1p(tl.exp2(-tl.abs(z)))


@triton.jit
def _neg_log2_pt(x_t):
    """In base-2 units: y_t = x_t log2(e), -log2(p_t) and -log2(1 - p_t), sharing one exp2 and
    one polynomial (|y_t| is the same for both)."""
    y_t = x_t * _LOG2E
    shared = _log2_1p(tl.exp2(-tl.abs(y_t)))
    return y_t, tl.maximum(-y_t, 0.0) + shared, tl.maximum(y_t, 0.0) + shared


@triton.jit
def _elements(
    logits_ptr,
    labels_ptr,
    pid,
    N,
    K: tl.constexpr,
    G: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
):
    """Load BLOCK consecutive elements of the flattened (R, K) logits, as BLOCK // G groups of G
    (G divides K, so a group lies in one row and shares its anchor's label: one label load per
    group, not per element). Returns x_t = x for the label's column and -x elsewhere (fp32),
    positive, valid (per group: in bounds, anchor not ignored), the offsets and the in-bounds
    mask. Contiguous groups let the loads and stores be vectorised. The logits of an ignored
    anchor are not loaded (x = 0 in their place), so whatever they hold, inf or nan, the maths
    on them stays finite; the callers still leave them out of the sum and the gradient."""
    if INT64_OFFSETS:  # 2**31 elements or more: 32-bit offsets would wrap
        starts = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK // G) * G
    else:
        starts = pid * BLOCK + tl.arange(0, BLOCK // G) * G
    rows = starts // K
    labels = tl.load(labels_ptr + rows, mask=starts < N, other=-1)
    valid = (labels >= 0)[:, None]
    offsets = starts[:, None] + tl.arange(0, G)[None, :]
    in_bounds = offsets < N
    x = tl.load(logits_ptr + offsets, mask=in_bounds & valid, other=0.0).to(tl.float32)
    # the label's column relative to the group's first column, compared with the constants
    # 0..G-1 (background, K, and ignored, -1, fall outside: no column is positive)
    positive = tl.arange(0, G)[None, :] == (labels - (starts - rows * K))[:, None]
    return tl.where(positive, x, -x), positive, valid, offsets, in_bounds


@triton.jit
def _zero_weight_at_0(
    x_t, positive, NEG_WEIGHT_IS_ZERO: tl.constexpr, POS_WEIGHT_IS_ZERO: tl.constexpr
):
    """With alpha 1 (the negatives weigh 0) or 0 (the positives weigh 0), the terms that weigh 0
    are computed at x_t = 0, so that an uncapped factor's overflow there gives 0, not
    0 * inf = NaN (as the reference does). Compiled in only then: alpha in (0, 1) costs nothing."""
    if NEG_WEIGHT_IS_ZERO:
        x_t = tl.where(positive, x_t, 0.0)
    if POS_WEIGHT_IS_ZERO:
        x_t = tl.where(positive, 0.0, x_t)
    return x_t


@triton.jit
def _forward_kernel(
    logits_ptr,
    labels_ptr,
    partial_ptr,
    N,
    w_pos,
    w_neg,
    gamma,
    log2_max_factor,
    K: tl.constexpr,
    G: tl.constexpr,
    LOSS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    NEG_WEIGHT_IS_ZERO: tl.constexpr,
    POS_WEIGHT_IS_ZERO: tl.constexpr,
):
    # the loss is computed in bits (log2): w_pos and w_neg are alpha_t times the conversion to
    # the loss's units (ln 2, over gamma for the appendix's FL*)
    # each program sums ITERS consecutive blocks (unrolled), then reduces once: the reduction
    # across the program's threads (shuffles, shared memory, a barrier) is paid once per ITERS
    # blocks
    acc = tl.zeros([BLOCK // G, G], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        x_t, positive, valid, _, _ = _elements(
            logits_ptr, labels_ptr, tl.program_id(0) * ITERS + i, N, K, G, BLOCK, INT64_OFFSETS
        )
        x_t = _zero_weight_at_0(x_t, positive, NEG_WEIGHT_IS_ZERO, POS_WEIGHT_IS_ZERO)
        # appendix FL*: softplus(-gamma x_t) / gamma = -log(sigmoid(gamma x_t)) / gamma
        if LOSS == _APPENDIX:
            loss = _neg_log2_sigmoid(x_t * (gamma * _LOG2E))
        else:
            y_t, nl2_pt, nl2_qt = _neg_log2_pt(x_t)
            loss = nl2_pt  # CE = -log(p_t) = softplus(-x_t)
            if LOSS == _FLSTAR:  # FL*: factor ((1 - p_t) / p_t)^gamma = exp(-gamma x_t), capped
                loss = loss * tl.exp2(tl.minimum(-gamma * y_t, log2_max_factor))
            elif LOSS == _FL:  # FL: factor (1 - p_t)^gamma
                loss = loss * tl.exp2(-gamma * nl2_qt)
        # 0 for an ignored anchor (its logits were not loaded: the loss is finite, whatever they
        # hold)
        acc += loss * tl.where(positive, tl.where(valid, w_pos, 0.0), tl.where(valid, w_neg, 0.0))
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc))


@triton.jit
def _backward_kernel(
    logits_ptr,
    labels_ptr,
    grad_ptr,
    grad_out_ptr,
    N,
    w_pos,
    w_neg,
    gamma,
    log2_max_factor,
    K: tl.constexpr,
    G: tl.constexpr,
    LOSS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    NEG_WEIGHT_IS_ZERO: tl.constexpr,
    POS_WEIGHT_IS_ZERO: tl.constexpr,
):
    # w_pos and w_neg are alpha_t; with d x_t / d x = +1 or -1 and the incoming gradient: two
    # scalars
    g_out = tl.load(grad_out_ptr).to(tl.float32)
    w_pos = w_pos * g_out
    w_neg = -(w_neg * g_out)
    for i in tl.static_range(ITERS):
        x_t, positive, valid, offsets, in_bounds = _elements(
            logits_ptr, labels_ptr, tl.program_id(0) * ITERS + i, N, K, G, BLOCK, INT64_OFFSETS
        )
        x_t = _zero_weight_at_0(x_t, positive, NEG_WEIGHT_IS_ZERO, POS_WEIGHT_IS_ZERO)
        if LOSS == _APPENDIX:  # d/dx_t: -sigmoid(-gamma x_t) = -2^(log2 sigmoid(-gamma x_t))
            d = -tl.exp2(-_neg_log2_sigmoid(x_t * (-gamma * _LOG2E)))
        else:
            y_t, nl2_pt, nl2_qt = _neg_log2_pt(x_t)
            d = -tl.exp2(-nl2_qt)  # d CE / d x_t = -(1 - p_t)
            # FL* = factor * CE with d factor / d x_t = -gamma factor (0 past the cap)
            if LOSS == _FLSTAR:
                log2_factor = -gamma * y_t
                capped = log2_factor > log2_max_factor
                factor = tl.exp2(tl.minimum(log2_factor, log2_max_factor))
                d = factor * (d - tl.where(capped, 0.0, gamma * _LN2) * nl2_pt)
            elif LOSS == _FL:  # FL = factor * CE with d factor / d x_t = -gamma p_t factor
                factor = tl.exp2(-gamma * nl2_qt)
                d = factor * (d - (gamma * _LN2) * tl.exp2(-nl2_pt) * nl2_pt)
        # an ignored anchor gets an explicit 0 (its x was not loaded, so d is finite): the
        # gradient tensor is not zero-initialised
        grad = d * tl.where(positive, tl.where(valid, w_pos, 0.0), tl.where(valid, w_neg, 0.0))
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_bounds)


class Launch(NamedTuple):
    """How the kernels are launched for logits of one element size."""

    block: int  # elements per block
    num_warps: int
    forward_iters: int  # blocks per forward program, one after another: its reduction is then
    backward_iters: int  # paid once per that many blocks; the backward has no reduction
    maxnreg: Optional[int]  # registers per thread at most (None: the compiler's choice)


# Chosen per element size by tools/fused_block_sweep.py on an H100 (docs/BENCHMARKS.md). fp32: a
# cap of 32 registers lets an SM hold 2048 threads (8 programs), enough loads in flight; the
# kernels fit without spilling, except the appendix FL*'s fp32 forward (a few spill stores, in a
# pass bound by memory; tools/fused_sass_stats.py shows both). fp16/bf16: 4 warps, 4 blocks per
# forward program and no cap were 3% faster than the fp32 setting.
_LAUNCH = {4: Launch(2048, 8, 2, 1, 32), 2: Launch(2048, 4, 4, 1, None)}
# maxnreg is a launch option since Triton 3.0 (which torch 2.4 brings); older Tritons go without
_HAS_MAXNREG = int(triton.__version__.split(".")[0]) >= 3
_INT32_LIMIT = 2**31  # above it, 64-bit offsets


def _kernel_entry(loss_type, alpha, params):
    """(LossType, every parameter with defaults filled in): the table entry's checks, and a
    ValueError for a type without a kernel branch."""
    entry, values = check_loss_arguments(loss_type, alpha, params)
    if entry.kernel is None:
        raise ValueError(
            f"{entry.name} has no fused-kernel branch: use "
            "d2_focalstar.modeling.losses.sigmoid_classification_loss"
        )
    return entry, values


def _launch_args(logits, entry, alpha, params, which="forward"):
    """The keyword arguments of the forward or backward kernel's launch, grid excluded, for
    checked arguments (``_kernel_entry``)."""
    gamma = params.get("gamma", 0.0)
    max_factor = params.get("max_factor", 0.0) if entry.capped else 0.0
    log2_cap = math.log2(max_factor) if 0 < max_factor < math.inf else 1e30
    N = logits.numel()
    K = logits.shape[1]
    w_pos, w_neg = (float(alpha), 1.0 - float(alpha)) if alpha >= 0 else (1.0, 1.0)  # alpha_t
    if which == "forward":  # the forward computes in bits: the conversion goes into the weights
        unit = math.log(2) / (gamma if entry.kernel == KernelCode.FLSTAR_APPENDIX else 1.0)
        w_pos, w_neg = w_pos * unit, w_neg * unit
    launch = launch_setting(logits.dtype)
    iters = launch.forward_iters if which == "forward" else launch.backward_iters
    args = dict(
        N=N,
        K=K,
        G=math.gcd(K, 16),
        w_pos=w_pos,
        w_neg=w_neg,
        gamma=float(gamma),
        log2_max_factor=log2_cap,
        LOSS=int(entry.kernel),
        BLOCK=launch.block,
        ITERS=iters,
        INT64_OFFSETS=N + launch.block * iters >= _INT32_LIMIT,
        NEG_WEIGHT_IS_ZERO=float(alpha) == 1.0,
        POS_WEIGHT_IS_ZERO=float(alpha) == 0.0,
        num_warps=launch.num_warps,
    )
    if _HAS_MAXNREG and launch.maxnreg is not None:
        args["maxnreg"] = launch.maxnreg
    return args


def launch_setting(dtype):
    """The :class:`Launch` used for logits of this dtype."""
    return _LAUNCH[torch.finfo(dtype).bits // 8]


def _grid(args):
    return (triton.cdiv(args["N"], args["BLOCK"] * args["ITERS"]),)


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, entry, alpha, params):
        args = _launch_args(logits, entry, alpha, params, "forward")
        grid = _grid(args)
        partial = torch.empty(grid[0], dtype=torch.float32, device=logits.device)
        if grid[0] > 0:
            _forward_kernel[grid](logits, labels, partial, **args)
        ctx.save_for_backward(logits, labels)
        ctx.loss_args = (entry, alpha, params)
        return partial.sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        args = _launch_args(logits, *ctx.loss_args, "backward")
        grad = torch.empty_like(logits)
        if args["N"] > 0:
            _backward_kernel[_grid(args)](
                logits, labels, grad, grad_out.float().contiguous(), **args
            )
        return grad, None, None, None, None


def fused_classification_loss(logits, labels, loss_type="FLSTAR", alpha=0.25, **params):
    """
    Sum over anchors and classes of the classification loss, from integer labels.

    Args:
        logits: (R, K) logits, fp32/fp16/bf16, on CUDA (or any device under TRITON_INTERPRET=1).
        labels: (R,) integer labels: 0..K-1 a class, K background (all columns negative),
            -1 ignored (no loss, zero gradient).
        loss_type, alpha, params: as in
            :func:`d2_focalstar.modeling.losses.sigmoid_classification_loss`; a type whose table
            entry has a kernel code (ValueError otherwise).

    Returns:
        fp32 scalar, equal to ``sigmoid_classification_loss(logits[valid], one_hot(labels[valid])
        [:, :K], ..., reduction="sum")``.
    """
    entry, values = _kernel_entry(loss_type, alpha, params)
    return checked_fused_loss(logits, labels, entry, alpha, values)


def checked_fused_loss(logits, labels, entry, alpha, params):
    """:func:`fused_classification_loss` for arguments already checked (``entry`` a LossType
    with a kernel code, ``params`` all of its parameters): what ClassificationLoss calls every
    step, after checking its setting once."""
    if logits.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"the fused kernel needs CUDA tensors, not {logits.device.type} (or Triton's "
            "interpreter, TRITON_INTERPRET=1); on the CPU use "
            "d2_focalstar.modeling.losses.sigmoid_classification_loss"
        )
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (R, K) and labels {tuple(labels.shape)} (R,)"
        )
    return _FusedLoss.apply(
        logits.contiguous(), labels.contiguous().to(torch.int32), entry, alpha, params
    )


_verdicts = {}  # (device, dtype, loss arguments) -> None (agrees) or what disagreed


# tolerances of the self-check per dtype, element by element: a few ulps of the stored gradient
# (the relative error of the kernel's maths is ~1e-6), and below that an absolute floor at the
# bottom of the dtype's range (fp32/bf16 subnormals may be flushed to 0 on a GPU)
_CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 2**-9, torch.bfloat16: 2**-6}
_CHECK_ATOL = {torch.float32: 1.2e-38, torch.float16: 2**-23, torch.bfloat16: 1.2e-38}


def agrees_with_reference(device, dtype, num_classes, loss_type, alpha, params):
    """
    Whether the kernel, compiled for this device and dtype, gives the reference's loss and
    gradient on a small batch (positive, background and ignored anchors; logits in [-20, 20])
    there, every element of the gradient within a few ulps. Checked once per process and
    setting, before the kernel's first use in training (RetinaNetFLStar): a kernel that a GPU,
    driver or Triton version gets wrong is not used; it says why, once, and training goes on
    with the reference functions. The reference is the float64 formula on the CPU, from the
    same (rounded) logits.
    """
    key = (str(device), dtype, num_classes, loss_type, alpha, tuple(sorted(params.items())))
    if key not in _verdicts:
        # the losses may be computed under no_grad (a validation loss) or inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            verdict = _self_check(device, dtype, num_classes, loss_type, alpha, params)
        if verdict is not None:
            logger.warning(
                f"The fused loss kernel disagrees with the reference on {device} ({dtype}, "
                f"{loss_type}): {verdict}. Using the reference functions instead (slower, same "
                f"values); please report it with your GPU, driver and Triton versions. "
                f"MODEL.FOCALSTAR.FUSED_KERNEL False skips this check."
            )
        _verdicts[key] = verdict
    return _verdicts[key] is None


def _self_check(device, dtype, num_classes, loss_type, alpha, params):
    """None if the kernel agrees with the reference, else what differed."""
    from .losses import sigmoid_classification_loss

    g = torch.Generator().manual_seed(0)
    rows = 64
    x = (torch.randn(rows, num_classes, generator=g) * 4 - 2).clamp(-20, 20)
    x[0, :] = 20.0  # saturated, on both sides of the label
    x[1, :] = -20.0
    labels = torch.randint(0, num_classes + 1, (rows,), generator=g)
    labels[::5] = -1
    x = x.to(dtype)
    ref = x.double().requires_grad_(True)
    valid = labels >= 0
    target = torch.nn.functional.one_hot(labels.clamp(min=0), num_classes + 1)[:, :num_classes]
    ref_loss = sigmoid_classification_loss(
        ref[valid], target[valid].double(), loss_type, alpha, "sum", **params
    )
    ref_loss.backward()
    # the kernel stores the gradient in the logits' dtype: rounded (to inf past fp16's range)
    want_loss, want_grad = float(ref_loss.detach()), ref.grad.to(dtype).double().flatten()
    try:
        with torch.autocast(str(device).split(":")[0], enabled=False):
            xd = x.to(device, copy=True).requires_grad_(True)
            loss = fused_classification_loss(xd, labels.to(device), loss_type, alpha, **params)
            loss.backward()
        got_loss, got_grad = float(loss.detach()), xd.grad.double().cpu().flatten()
    except Exception as e:  # a compile or launch failure on this device
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    if not math.isclose(got_loss, want_loss, rel_tol=1e-4):  # summed in fp32 from the same logits
        return f"loss {got_loss:.6g} instead of {want_loss:.6g}"
    bad = ~torch.isclose(got_grad, want_grad, rtol=_CHECK_RTOL[dtype], atol=_CHECK_ATOL[dtype])
    if bad.any():
        i = int(bad.nonzero()[0])
        return (
            f"gradient {float(got_grad[i]):.6g} instead of {float(want_grad[i]):.6g} at element "
            f"{i} (and {int(bad.sum()) - 1} more)"
        )
    return None
