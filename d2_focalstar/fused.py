"""
A fused Triton kernel for the classification loss of RetinaNetFLStar (FL*, FL, CE and the
appendix FL*), forward and backward, taking the integer anchor labels directly.

Compared with the reference path (:func:`d2_focalstar.losses.sigmoid_classification_loss` on a
one-hot target), it builds no one-hot tensor and no boolean-masked copy of the logits: ignored
anchors (label -1) are masked inside the kernel. The forward reads the logits once and writes one
partial sum per block (summed in fp32 afterwards, in a fixed order: deterministic); the backward
reads them again and writes the gradient, so the whole costs three passes over the logits.

Runs on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how
the tests check it against the reference without a GPU. The per-element maths is the reference's:
x_t = x for the label's column and -x elsewhere; loss = a_t * factor(x_t) * softplus(-x_t).
"""
import math

import torch
import triton
import triton.language as tl

from .losses import LOSS_TYPES

__all__ = ["fused_classification_loss"]

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
def _tile(logits_ptr, labels_ptr, pid, R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Load one tile: x (fp32), sign s (+1 for the label's column), the mask of valid elements
    (in bounds, anchor not ignored), the offsets and the in-bounds mask."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    bounds = row_ok[:, None] & (cols < K)[None, :]
    mask = bounds & (labels >= 0)[:, None]
    offsets = rows[:, None] * K + cols[None, :]
    x = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    positive = cols[None, :] == labels[:, None]
    s = tl.where(positive, 1.0, -1.0)
    return x, s, positive, mask, offsets, bounds


@triton.jit
def _alpha_t(positive, alpha):
    return tl.where(alpha >= 0, tl.where(positive, alpha, 1.0 - alpha), 1.0)


@triton.jit
def _forward_kernel(logits_ptr, labels_ptr, partial_ptr, R, K, alpha, gamma, log_max_factor,
                    LOSS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    x, s, positive, mask, _, _ = _tile(logits_ptr, labels_ptr, pid, R, K, BLOCK_R, BLOCK_K)
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
    tl.store(partial_ptr + pid, tl.sum(tl.sum(loss, axis=1), axis=0))


@triton.jit
def _backward_kernel(logits_ptr, labels_ptr, grad_ptr, grad_out_ptr, R, K, alpha, gamma,
                     log_max_factor, LOSS: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    x, s, positive, mask, offsets, bounds = _tile(logits_ptr, labels_ptr, pid, R, K, BLOCK_R, BLOCK_K)
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
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=bounds)


_BLOCK_R = 16  # anchors per program
_NUM_WARPS = 4


def _launch_args(logits, loss_type, alpha, gamma, max_factor):
    loss = loss_type.upper()
    log_cap = math.log(max_factor) if (loss == "FLSTAR" and 0 < max_factor < math.inf) else 1e30
    R, K = logits.shape
    return dict(R=R, K=K, alpha=float(alpha), gamma=float(gamma), log_max_factor=log_cap,
                LOSS=_LOSS_CODES[loss], BLOCK_R=_BLOCK_R, BLOCK_K=triton.next_power_of_2(K),
                num_warps=_NUM_WARPS)


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, loss_type, alpha, gamma, max_factor):
        args = _launch_args(logits, loss_type, alpha, gamma, max_factor)
        grid = (triton.cdiv(args["R"], args["BLOCK_R"]),)
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
        grid = (triton.cdiv(ctx.args["R"], ctx.args["BLOCK_R"]),)
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
    return _FusedLoss.apply(logits.contiguous(), labels.contiguous().to(torch.int64),
                            loss_type, alpha, gamma, max_factor)
