"""
A fused Triton kernel for the classification loss of RetinaNetFLStar (FL*, FL, CE and the
appendix FL*), forward and backward, taking the integer anchor labels directly.

Compared with the reference path (:func:`d2_focalstar.losses.sigmoid_classification_loss` on a
one-hot target), it builds no one-hot tensor and no boolean-masked copy of the logits: ignored
anchors (label -1) are masked inside the kernel. The forward reads the logits once and writes one
partial sum per block (summed in fp32 afterwards, in a fixed order: deterministic); the backward
reads them again and writes the gradient, so the whole costs three passes over the logits. Each
program takes a block of consecutive elements of the flattened logits (not a tile of rows), so
that loads and stores are contiguous and no lanes are lost when K is not a power of two.

Runs on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how
the tests check it against the reference without a GPU. The per-element maths is the reference's:
x_t = x for the label's column and -x elsewhere; loss = a_t * factor(x_t) * softplus(-x_t).
"""
import math
import os

import torch
import triton
import triton.language as tl

from .losses import LOSS_TYPES

__all__ = ["fused_classification_loss", "INTERPRETED"]

#: The kernels below run in Triton's interpreter (on CPU tensors too): TRITON_INTERPRET=1 was set
#: when this module was imported, which is when triton.jit reads it.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOSS_CODES = {name: i for i, name in enumerate(LOSS_TYPES)}  # FLSTAR 0, FL 1, CE 2, APPENDIX 3


@triton.jit
def _log1p_exp_neg_abs(z):
    """log(1 + exp(-|z|)) accurate in fp32 also where exp(-|z|) is tiny (series below 0.05)."""
    u = tl.exp(-tl.abs(z))
    series = u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - u * (0.25 - u * (0.2 - u / 6.0)))))
    return tl.where(u < 0.05, series, tl.log(1.0 + u))


@triton.jit
def _softplus(z):
    return tl.maximum(z, 0.0) + _log1p_exp_neg_abs(z)


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _elements(logits_ptr, labels_ptr, pid, N, K: tl.constexpr, BLOCK: tl.constexpr,
              WIDE: tl.constexpr):
    """Load BLOCK consecutive elements of the flattened (R, K) logits: x (fp32), the sign s
    (+1 in the label's column), positive, the mask of elements that count (in bounds, anchor not
    ignored), the offsets and the in-bounds mask. Flat, contiguous offsets let the loads and
    stores be vectorised; each anchor's label is gathered (from cache) for its K elements."""
    if WIDE:  # more than 2**31 elements
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < N
    rows = offsets // K
    labels = tl.load(labels_ptr + rows, mask=in_bounds, other=-1)
    mask = in_bounds & (labels >= 0)
    x = tl.load(logits_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    positive = (offsets - rows * K) == labels
    s = tl.where(positive, 1.0, -1.0)
    return x, s, positive, mask, offsets, in_bounds


@triton.jit
def _alpha_t(positive, alpha):
    return tl.where(alpha >= 0, tl.where(positive, alpha, 1.0 - alpha), 1.0)


@triton.jit
def _forward_kernel(logits_ptr, labels_ptr, partial_ptr, N, alpha, gamma, log_max_factor,
                    K: tl.constexpr, LOSS: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    x, s, positive, mask, _, _ = _elements(logits_ptr, labels_ptr, pid, N, K, BLOCK, WIDE)
    x_t = s * x
    if LOSS == 3:  # appendix FL*: softplus(-gamma x_t) / gamma
        loss = _softplus(-gamma * x_t) / gamma
    else:
        loss = _softplus(-x_t)
        if LOSS == 0:  # FL*: factor exp(-gamma x_t), capped
            loss = loss * tl.exp(tl.minimum(-gamma * x_t, log_max_factor))
        elif LOSS == 1:  # FL: factor exp(-gamma softplus(x_t))
            loss = loss * tl.exp(-gamma * _softplus(x_t))
    loss = tl.where(mask, loss * _alpha_t(positive, alpha), 0.0)
    tl.store(partial_ptr + pid, tl.sum(loss, axis=0))


@triton.jit
def _backward_kernel(logits_ptr, labels_ptr, grad_ptr, grad_out_ptr, N, alpha, gamma,
                     log_max_factor, K: tl.constexpr, LOSS: tl.constexpr, BLOCK: tl.constexpr,
                     WIDE: tl.constexpr):
    pid = tl.program_id(0)
    x, s, positive, mask, offsets, in_bounds = _elements(logits_ptr, labels_ptr, pid, N, K, BLOCK, WIDE)
    x_t = s * x
    if LOSS == 3:
        d = -_sigmoid(-gamma * x_t)
    else:
        d = -_sigmoid(-x_t)  # d CE / d x_t
        if LOSS == 0:
            log_factor = -gamma * x_t
            capped = log_factor > log_max_factor
            factor = tl.exp(tl.minimum(log_factor, log_max_factor))
            d = factor * (d - tl.where(capped, 0.0, gamma) * _softplus(-x_t))
        elif LOSS == 1:
            factor = tl.exp(-gamma * _softplus(x_t))
            d = factor * (d - gamma * _sigmoid(x_t) * _softplus(-x_t))
    g_out = tl.load(grad_out_ptr).to(tl.float32)
    grad = tl.where(mask, g_out * s * d * _alpha_t(positive, alpha), 0.0)
    # ignored anchors get an explicit 0: the gradient tensor is not zero-initialised
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_bounds)


_BLOCK = 2048  # elements per program
_NUM_WARPS = 8
_INT32_LIMIT = 2**31  # above it, 64-bit offsets


def _launch_args(logits, loss_type, alpha, gamma, max_factor):
    loss = loss_type.upper()
    log_cap = math.log(max_factor) if (loss == "FLSTAR" and 0 < max_factor < math.inf) else 1e30
    N = logits.numel()
    return dict(N=N, K=logits.shape[1], alpha=float(alpha), gamma=float(gamma),
                log_max_factor=log_cap, LOSS=_LOSS_CODES[loss], BLOCK=_BLOCK,
                WIDE=N + _BLOCK >= _INT32_LIMIT, num_warps=_NUM_WARPS)


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, loss_type, alpha, gamma, max_factor):
        args = _launch_args(logits, loss_type, alpha, gamma, max_factor)
        grid = (triton.cdiv(args["N"], args["BLOCK"]),)
        partial = torch.empty(grid[0], dtype=torch.float32, device=logits.device)
        if grid[0] > 0:
            _forward_kernel[grid](logits, labels, partial, **args)
        ctx.save_for_backward(logits, labels)
        ctx.args = args
        return partial.sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        grid = (triton.cdiv(ctx.args["N"], ctx.args["BLOCK"]),)
        if grid[0] > 0:
            _backward_kernel[grid](logits, labels, grad, grad_out.float().contiguous(), **ctx.args)
        return grad, None, None, None, None, None


def fused_classification_loss(logits, labels, loss_type="FLSTAR", alpha=0.25, gamma=0.5,
                              max_factor=100.0):
    """
    Sum over anchors and classes of the classification loss, from integer labels.

    Args:
        logits: (R, K) logits, fp32/fp16/bf16, on CUDA (or any device under TRITON_INTERPRET=1).
        labels: (R,) integer labels: 0..K-1 a class, K background (all columns negative),
            -1 ignored (no loss, zero gradient).
        loss_type, alpha, gamma, max_factor: as in
            :func:`d2_focalstar.losses.sigmoid_classification_loss`.

    Returns:
        fp32 scalar, equal to ``sigmoid_classification_loss(logits[valid], one_hot(labels[valid])
        [:, :K], ..., reduction="sum")``.
    """
    if loss_type.upper() not in _LOSS_CODES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (R, K) and labels {tuple(labels.shape)} (R,)")
    return _FusedLoss.apply(logits.contiguous(), labels.contiguous().to(torch.int32),
                            loss_type, alpha, gamma, max_factor)
