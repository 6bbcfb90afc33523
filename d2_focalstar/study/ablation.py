"""
An ablation of the FL-vs-CE gap between two proxies: a chain of steps, each changing one thing,
with FL g=2's AP difference from the best CE (each at its best rate among the step's runs, as in
RetinaNet's Table 1, ``table1.py``) and its paired-bootstrap interval at every step.
"""

from .table1 import fl_versus_best_ce

__all__ = ["ablation", "ablation_rows"]


def ablation_rows(steps, num_resamples=1000, seed=0, warn=None):
    """
    ``steps``: [(label, records)] in the chain's order; a step with no records was not run.
    Returns per step a dict of label, ce and fl (``table1_rows``' rows of the best CE and of FL
    g=2; None: not run) and gap ((AP difference, low, high) of FL g=2 - best CE, None where
    either has no finished run).
    """
    out = []
    for label, records in steps:
        ce = fl = gap = None
        if records:
            try:
                ce, fl, gap = fl_versus_best_ce(records, num_resamples, seed, warn)
            except ValueError as e:
                raise ValueError(f"step {label!r}: {e}") from e
        if fl is not None and not (fl["seeds"] or fl["diverged"]):
            fl = None  # no FL g=2 run in this step
        out.append(dict(label=label, ce=ce, fl=fl, gap=gap))
    return out


def _cell(row, what):
    if row is None:
        return "not run"
    ap = "all diverged" if not row["seeds"] else f"{row['mean']:.2f}"
    if row["seeds"] > 1:
        ap += f" ± {row['sd']:.2f}"
    alpha = f"alpha {row['alpha']:g}, " if what == "CE" and row["alpha"] is not None else ""
    lr = f"lr {row['lr']:g}, " if row["lr"] is not None else ""
    if len(row["rates"]) > 1:  # the picked rate among those tried
        tried = [r[0] for r in row["rates"]]
        lr = f"lr {row['lr']:g} of {len(tried)} tried ({min(tried):g}-{max(tried):g}), "
    n = row["seeds"] + row["diverged"]
    seeds = f"{row['seeds']}" + (f" + {row['diverged']} diverged" if row["diverged"] else "")
    if not row["seeds"]:
        seeds = f"{row['diverged']}"  # all diverged: the AP cell says so
    return f"{ap} ({alpha}{lr}{seeds} seed{'s' if n > 1 else ''})"


def ablation(steps, num_resamples=1000, seed=0, warn=None):
    """The markdown table of ``ablation_rows``: per step the best CE, FL g=2, the gap with its
    95% interval, and how much the gap moved from the step before (the difference of two gaps,
    with no interval: the steps' test images may differ)."""
    rows = ablation_rows(steps, num_resamples, seed, warn)
    lines = [
        "| step | best CE: AP (setting, seeds) | FL g=2: AP (setting, seeds) | "
        "FL g=2 - best CE [95% interval] | gap moved by the step |",
        "|---|---|---|---|---|",
    ]
    before = None
    for r in rows:
        gap, moved = "", ""
        if r["gap"] is not None:
            d, lo, hi = r["gap"]
            gap = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            if lo > 0 or hi < 0:
                gap = f"**{gap}**"
            if before is not None:
                moved = f"{d - before:+.2f}"
            before = d
        elif r["ce"] is None and r["fl"] is None:
            gap = "not run"
            before = None  # the next step's move is not from this one
        else:
            before = None
        lines.append(
            f"| {r['label']} | {_cell(r['ce'], 'CE')} | {_cell(r['fl'], 'FL')} | {gap} | {moved} |"
        )
    note = (
        "\nEach loss at its best rate among the step's runs (highest mean AP on the seeds its "
        "rates share, a diverged seed as 0), picked on the test images the table reports; the "
        f"interval is a paired bootstrap over the step's test images ({num_resamples} "
        f"resamples, seed {seed}), over the finished seeds. Bold: the interval excludes 0. "
        "'Gap moved' is the difference from the step before, where both were run (no interval: "
        "a step may change the test images).\n"
    )
    return "\n".join(lines) + "\n" + note, rows
