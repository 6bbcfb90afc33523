"""
Fig. 6 of the proposal: the training curves of runs (losses and AP against iteration), from each
run's metrics.json; runs of one setting share a colour.
"""

import os

from ..run.results import read_metrics

__all__ = ["plot_training_curves"]


def plot_training_curves(folders, out_path, labels=None, groups=None):
    """Fig. 6: loss_cls, loss_box_reg, total_loss (and bbox/AP where evaluated) vs iteration.
    Runs of one group (a setting, over seeds) share a colour and differ in line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss_cls", "loss_box_reg", "total_loss", "bbox/AP"]
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
        rows = read_metrics(folder)
        for ax, key in zip(axes, keys):
            pts = [
                (r["iteration"], r[key])
                for r in rows
                if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
            ]
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
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
