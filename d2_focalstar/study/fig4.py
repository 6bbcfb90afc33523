"""
Fig. 4 of the proposal: the loss and the magnitude of its gradient against p_t for CE, FL and
FL*, computed by the project's own loss functions (autograd), so the figure shows what trains.
"""

from collections import OrderedDict

import numpy as np
import torch

from ..modeling.losses import LOSS_TYPES, sigmoid_classification_loss

__all__ = ["FIG4_CURVES", "loss_curves", "plot_fig4"]

#: (label, loss type, gamma) of the proposal's Fig. 4, alpha = 1.
FIG4_CURVES = [
    ("CE", "CE", 0.0),
    ("FL, g=2", "FL", 2.0),
    ("FL*, g=0.125", "FLSTAR", 0.125),
    ("FL*, g=0.25", "FLSTAR", 0.25),
    ("FL*, g=0.5", "FLSTAR", 0.5),
]


def loss_curves(p_t, curves=FIG4_CURVES, alpha=1.0, max_factor=0.0):
    """
    For each (label, loss_type, gamma): the loss of a positive with probability p_t and the
    magnitude of its gradient with respect to the logit, both from
    :func:`sigmoid_classification_loss` (autograd), uncapped by default.
    Returns {label: (loss, |dloss/dx|)} as float64 numpy arrays.
    """
    x = torch.logit(torch.as_tensor(p_t, dtype=torch.float64))
    out = OrderedDict()
    for label, loss_type, gamma in curves:
        xg = x.clone().requires_grad_()
        params = (
            {"gamma": gamma, "max_factor": max_factor}
            if LOSS_TYPES[loss_type].capped
            else ({"gamma": gamma} if gamma else {})
        )
        loss = sigmoid_classification_loss(xg, torch.ones_like(xg), loss_type, alpha, **params)
        loss.sum().backward()
        out[label] = (loss.detach().numpy(), xg.grad.abs().numpy())
    return out


def plot_fig4(out_prefix, num=2000):
    """Write <out_prefix>.png and .svg: loss (left) and gradient magnitude (right) vs p_t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p_t = np.linspace(1e-3, 1.0 - 1e-6, num)
    curves = loss_curves(p_t)
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, (loss, grad) in curves.items():
        style = "--" if label.startswith(("CE", "FL,")) else "-"
        ax_loss.plot(p_t, loss, style, label=label)
        ax_grad.plot(p_t, grad, style, label=label)
    ax_loss.set(
        xlabel="probability of ground-truth class $p_t$",
        ylabel="loss",
        ylim=(0, 5),
        title="Loss (alpha = 1)",
    )
    ax_grad.set(
        xlabel="probability of ground-truth class $p_t$",
        yscale="log",
        ylim=(1e-4, 1e2),
        ylabel="|d loss / d logit|",
        title="Gradient magnitude: FL* up-weights hard examples",
    )
    for ax in (ax_loss, ax_grad):
        ax.axvline(0.5, color="gray", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths = [f"{out_prefix}.png", f"{out_prefix}.svg"]
    # the same figure gives the same files: no date, fixed SVG ids (committed figures diff clean)
    with matplotlib.rc_context({"svg.hashsalt": "fig4"}):
        fig.savefig(paths[0], dpi=120, metadata={"Software": None})
        fig.savefig(paths[1], dpi=120, metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return paths
