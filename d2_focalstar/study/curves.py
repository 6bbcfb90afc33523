"""
Fig. 6 of the proposal: the training curves of runs (losses and AP against iteration), from each
run's metrics.json; runs of one setting share a colour.
"""

import os

from ..run.results import read_metrics

__all__ = ["plot_training_curves"]


def plot_training_curves(folders, out_path, labels=None, groups=None):
    """Fig. 6: loss_cls, loss_box_reg, total_loss (and bbox/AP where evaluated) vs iteration.
    Runs of one group (a setting, over seeds) share a colour and differ in line style.
    Returns out_path, or None (and writes nothing) where no run has a curve to draw (runs of
    ``--eval-only``, which write no metrics.json)."""
    keys = ["loss_cls", "loss_box_reg", "total_loss", "bbox/AP"]
    curves = [
        {
            key: [
                (r["iteration"], r[key])
                for r in rows
                if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
            ]
            for key in keys
        }
        for rows in (read_metrics(folder) for folder in folders)
    ]
    if not any(pts for run in curves for pts in run.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups or list(range(len(folders)))
    distinct = list(dict.fromkeys(groups))
    colors = plt.get_cmap("tab10" if len(distinct) <= 10 else "tab20")
    styles, seen = ["-", "--", ":", "-."], {}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for i, folder in enumerate(folders):
        label = labels[i] if labels else os.path.basename(os.path.normpath(folder))
        color = colors(distinct.index(groups[i]) % colors.N)
        style = styles[seen.setdefault(groups[i], []).__len__() % len(styles)]
        seen[groups[i]].append(folder)
        for ax, key in zip(axes, keys):
            pts = curves[i][key]
            if pts:
                it, v = zip(*pts)
                ax.plot(
                    it,
                    v,
                    style,
                    color=color,
                    marker="o" if key == "bbox/AP" else None,
                    ms=3,
                    label=label,
                )
    for ax, key in zip(axes, keys):
        ax.set(xlabel="iteration", title=key)
        if key != "bbox/AP":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    # the legend on the first panel that has lines (a run may log no loss_cls)
    next((ax for ax in axes if ax.get_lines()), axes[0]).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
