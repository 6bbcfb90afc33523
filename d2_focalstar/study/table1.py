"""
RetinaNet's Table 1 (Lin et al., ICCV 2017) beside a proxy study's runs, and the three checks that
make the proxy count as calibrated.
"""

import math

import numpy as np

from ..run.results import check_one_recipe, check_one_starting_point
from .intervals import interval_rows
from .tables import group_by_setting, metrics_of

__all__ = [
    "TABLE1",
    "fl_versus_best_ce",
    "gamma_profile_check",
    "table1",
    "table1_rows",
    "sweep_args",
]

#: RetinaNet's Table 1 (Lin et al., ICCV 2017; ResNet-50, COCO minival AP): (loss type, gamma,
#: alpha, AP). (a) CE at three alphas; (b) FL at each gamma with the alpha the paper found best.
TABLE1 = (
    ("CE", None, 0.25, 10.8),
    ("CE", None, 0.5, 30.2),
    ("CE", None, 0.75, 31.1),
    ("FL", 0.5, 0.5, 32.9),
    ("FL", 1.0, 0.25, 33.7),
    ("FL", 2.0, 0.25, 34.0),
    ("FL", 5.0, 0.25, 32.2),
)


def _differ_only_in_rate(names, groups, suffixes, rate):
    """Whether settings ``names`` are one loss setting at distinct learning rates: one alpha, no
    knob but the rate differs."""

    def other_knobs(n):
        return [k for k in suffixes[n].split() if not k.startswith("lr=")]

    lrs = [rate(n) for n in names]
    return (
        None not in lrs
        and len(set(lrs)) == len(lrs)
        and len({groups[n][0].get("alpha") for n in names}) == 1
        and all(other_knobs(n) == other_knobs(names[0]) for n in names)
    )


def table1_rows(records):
    """
    Each row of Table 1 with the proxy's runs that match it (see ``table1``): dicts of loss,
    gamma, paper_alpha, paper_ap, name (setting name among ``records``' CE and FL runs, None:
    not run), alpha, lr (the row's rate), rates ([(rate, score, diverged, runs)] where several
    were tried), seeds (finished), diverged, mean, sd; and {setting name: its records}.
    RunRecordError (a ValueError) naming the runs where they started from different weights or
    were trained with different recipes (warm-up, clipping).
    """
    check_one_starting_point(records, "Comparing losses on one proxy")
    check_one_recipe(records, "Comparing losses on one proxy")

    def key(r):
        return r["loss_type"], (r.get("params") or {}).get("gamma"), r.get("alpha")

    def rate(name):
        return (groups[name][0].get("solver") or {}).get("base_lr")

    def ap_by_seed(name, failed_as=None):
        """{seed: AP} of a setting's finished runs with an AP; its diverged runs and those
        without an AP (no detections: COCO's NaN) at ``failed_as`` (None: left out)."""
        aps = {
            r.get("seed", 0): None if "diverged" in r else metrics_of(r).get("AP")
            for r in groups[name]
        }
        aps = {s: failed_as if v is None or math.isnan(v) else v for s, v in aps.items()}
        return {s: v for s, v in aps.items() if v is not None}

    def diverged(name):
        return sum(1 for r in groups[name] if "diverged" in r)

    ours = [r for r in records if r["loss_type"] in ("CE", "FL")]
    groups, suffixes = group_by_setting(ours)
    rows = []
    for loss, gamma, alpha, paper in TABLE1:
        found = [
            n
            for n, rs in groups.items()
            if key(rs[0])[0] == loss
            and key(rs[0])[1] == gamma
            and (loss == "FL" or key(rs[0])[2] == alpha)
        ]
        if len(found) > 1:  # several alphas of one FL gamma: the paper's, else the first's
            first = key(groups[found[0]][0])[2]
            found = [n for n in found if key(groups[n][0])[2] == alpha] or [
                n for n in found if key(groups[n][0])[2] == first
            ]
        rates = []
        if len(found) > 1 and _differ_only_in_rate(found, groups, suffixes, rate):
            # each loss at its own best rate: the one with the highest mean AP on the seeds all
            # its rates have (the rate grid's seed), else on each rate's own seeds; a seed that
            # diverged or detected nothing counts as AP 0. Ties (every rate diverged): the rate
            # with more finished seeds, then the lower rate, whatever other runs are given
            by_seed = {n: ap_by_seed(n, failed_as=0.0) for n in found}
            common = set.intersection(*(set(a) for a in by_seed.values()))

            def score(n, common=common, by_seed=by_seed):
                aps = [v for s, v in by_seed[n].items() if s in common or not common]
                return float(np.mean(aps)) if aps else -math.inf

            def best(n):
                return score(n), len(ap_by_seed(n)), -rate(n)

            rates = sorted((rate(n), score(n), diverged(n), len(groups[n])) for n in found)
            found = [max(found, key=best)]
        if len(found) > 1 or (found and len({r.get("alpha") for r in groups[found[0]]}) > 1):
            raise ValueError(
                f"Table 1's {loss} gamma={gamma} alpha={alpha} matches {found}: give one "
                "study's folders (runs that differ only in SOLVER.BASE_LR are fine: the best "
                "rate is picked)"
            )
        aps = list(ap_by_seed(found[0]).values()) if found else []
        rows.append(
            dict(
                loss=loss,
                gamma=gamma,
                paper_alpha=alpha,
                paper_ap=paper,
                name=found[0] if found else None,
                alpha=groups[found[0]][0].get("alpha") if found else None,
                lr=rate(found[0]) if found else None,
                rates=rates,
                seeds=len(aps),
                diverged=diverged(found[0]) if found else 0,
                mean=float(np.mean(aps)) if aps else math.nan,
                sd=float(np.std(aps, ddof=1)) if len(aps) > 1 else math.nan,
            )
        )
    return rows, groups


def _versus_best_ce(rows, groups, num_resamples, seed, warn):
    """The best CE row of ``table1_rows`` (highest mean AP) and {row name: (AP difference, low,
    high)} of every row against it: a paired bootstrap on the rows' finished runs alone. Renames
    each row's ``name`` to its setting's name among those runs (None: no finished run)."""
    # named again among themselves (a knob's usual value is the majority's)
    chosen = [r for row in rows if row["name"] for r in groups[row["name"]] if "diverged" not in r]
    renamed = {id(r): n for n, rs in group_by_setting(chosen)[0].items() for r in rs}
    for row in rows:
        finished = [r for r in groups.get(row["name"], ()) if "diverged" not in r]
        row["name"] = renamed[id(finished[0])] if finished else None
    ce = [r for r in rows if r["seeds"] and r["loss"] == "CE"]
    best_ce = max(ce, key=lambda r: r["mean"]) if ce else None
    intervals = {}
    if best_ce is not None:
        for row in interval_rows(chosen, best_ce["name"], num_resamples, seed, warn):
            intervals[row["setting"]] = (row["AP diff"], row["AP low"], row["AP high"])
    return best_ce, intervals


def fl_versus_best_ce(records, num_resamples=1000, seed=0, warn=None):
    """FL g=2 against the best CE among ``records`` (each row at its best rate, as in
    ``table1``): (best CE row, FL g=2 row, (AP difference, low, high) or None where either has
    no finished seed). The rows are ``table1_rows``' dicts; where no CE row finished a seed, the
    CE row is one whose seeds all diverged (None: no CE run)."""
    rows, groups = table1_rows(records)
    best_ce, intervals = _versus_best_ce(rows, groups, num_resamples, seed, warn)
    fl2 = next(r for r in rows if r["loss"] == "FL" and r["gamma"] == 2.0)
    gap = intervals.get(fl2["name"]) if fl2["name"] and best_ce is not None else None
    if best_ce is None:
        best_ce = next((r for r in rows if r["loss"] == "CE" and r["diverged"]), None)
    return best_ce, fl2, gap


def gamma_profile_check(rows):
    """Check 2 of ``table1`` on its rows: FL's best gamma (highest mean over finished seeds) is 1
    or 2. Measured only where the check could fail: a gamma of 1 or 2 and one outside them have
    finished seeds (gamma 1 and 2 alone always 'peak' inside); a gamma whose seeds all diverged
    is named in the detail, not counted as a finished row. (check, status, detail)."""
    name = "FL's gamma profile peaks at 1-2"
    fl = [r for r in rows if r["loss"] == "FL" and r["seeds"]]
    inside = [r for r in fl if r["gamma"] in (1.0, 2.0)]
    diverged = [r for r in rows if r["loss"] == "FL" and r["diverged"] and not r["seeds"]]
    why = "; ".join(
        f"gamma {r['gamma']:g} diverged at every rate tried"
        + " ("
        + ", ".join(f"{lr:g}" for lr in ([x[0] for x in r["rates"]] or [r["lr"]]) if lr)
        + ")"
        for r in diverged
    )
    if not inside or len(inside) == len(fl):
        missing = "no FL gamma 1 or 2" if not inside else "no FL gamma outside 1-2"
        return name, "not measured", f"{missing} has a finished seed" + (f"; {why}" if why else "")
    peak = max(fl, key=lambda r: r["mean"])
    return (
        name,
        "met" if peak["gamma"] in (1.0, 2.0) else "not met",
        f"best gamma {peak['gamma']:g} ({peak['mean']:.2f} AP) of "
        + ", ".join(f"{r['gamma']:g}" for r in fl)
        + (f"; {why}" if why else ""),
    )


def table1(records, num_resamples=1000, seed=0, warn=None):
    """
    The proxy's runs beside RetinaNet's Table 1, and the three checks that make the proxy count
    as calibrated: CE at alpha 0.75 above CE at 0.25; FL's best gamma 1 or 2; FL g=2 above the
    best CE with a 95% paired-bootstrap interval (``interval_rows``) that excludes 0.

    Runs are matched to a row by loss type and gamma (and alpha for CE; for FL the paper's alpha
    where such runs exist, else the runs' own). Other runs (FL*, other knobs) are ignored. Where a
    row has runs at several learning rates (tools/sweep.py --base-lrs), the rate with the highest
    mean AP on the seeds all its rates share is the row's (losses differ in their best rate: one
    shared rate can decide the comparison); the table names each row's rates and the pick.
    Records of diverged runs (load_run's RunDiverged.record) count as that seed's failure: 0 AP
    when a rate is picked, '+ k diverged' in the row, left out of its mean and interval.
    Returns (markdown table, [(check, 'met' / 'not met' / 'not measured', detail)]).
    """
    rows, groups = table1_rows(records)
    best_ce, intervals = _versus_best_ce(rows, groups, num_resamples, seed, warn)
    paper_best_ce = max(p[3] for p in TABLE1 if p[0] == "CE")

    def cell(r):
        if not r["seeds"]:
            return ("all diverged" if r["diverged"] else "not run"), ""
        ours_ = f"{r['mean']:.2f}" + ("" if math.isnan(r["sd"]) else f" ± {r['sd']:.2f}")
        d = intervals.get(r["name"])
        return ours_, (
            "best CE"
            if r is best_ce
            else ""
            if d is None
            else f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"
        )

    lines = [
        "| loss | gamma | paper: alpha | paper: AP (COCO) | paper: vs best CE | proxy: alpha | "
        "proxy: lr | proxy: seeds | proxy: AP mean ± sd | proxy: vs best CE [95% interval] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours_, vs = cell(r)
        gamma = "" if r["gamma"] is None else f"{r['gamma']:g}"
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        lr = "" if r["lr"] is None else f"{r['lr']:g}"
        seeds = f"{r['seeds']}" + (f" + {r['diverged']} diverged" if r["diverged"] else "")
        lines.append(
            f"| {r['loss']} | {gamma} | {r['paper_alpha']:g} | {r['paper_ap']:.1f} | "
            f"{r['paper_ap'] - paper_best_ce:+.1f} | {alpha} | {lr} | {seeds} | {ours_} | {vs} |"
        )
    picked = [r for r in rows if r["rates"]]
    if picked:

        def tried(r):
            return ", ".join(
                ("**{}**" if lr == r["lr"] else "{}").format(
                    f"{lr:g}: "
                    + ("no AP" if math.isinf(ap) else f"{ap:.2f}")
                    + (f" ({d} of {n} diverged)" if d else "")
                )
                for lr, ap, d, n in r["rates"]
            )

        def setting(r):
            gamma = "" if r["gamma"] is None else f" g={r['gamma']:g}"
            alpha = "" if r["alpha"] is None else f" alpha {r['alpha']:g}"
            return f"{r['loss']}{gamma}{alpha}"

        lines.append("")
        lines.append(
            "Rates tried, mean AP on the seeds they share, a diverged seed as 0 (the row's in "
            "bold): "
            + "; ".join(f"{setting(r)}: {tried(r)}" for r in picked)
            + ". The rates were picked on the test images the table reports (the proxy has no "
            "separate validation split): rows with more rates tried have a small advantage."
        )

    if any(r["diverged"] for r in rows):
        lines.append("")
        lines.append(
            "Diverged seeds (the training's loss or weights stopped being finite; recorded in "
            "their results.json, never retried) are counted in 'proxy: seeds'; the means, sds "
            "and intervals are over the finished seeds, what a run that survives gives."
        )

    def row_of(loss, gamma=None, alpha=None):
        return next(
            r
            for r in rows
            if r["loss"] == loss
            and r["gamma"] == gamma
            and (alpha is None or r["paper_alpha"] == alpha)
        )

    checks = []
    lo, hi = row_of("CE", alpha=0.25), row_of("CE", alpha=0.75)
    if lo["seeds"] and hi["seeds"]:
        d = intervals.get(lo["name"]) if hi is best_ce else None
        detail = f"{hi['mean']:.2f} vs {lo['mean']:.2f} AP" + (
            f" (CE alpha 0.25 vs best CE: {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}])" if d else ""
        )
        checks.append(
            (
                "CE alpha 0.75 above CE alpha 0.25",
                "met" if hi["mean"] > lo["mean"] else "not met",
                detail,
            )
        )
    else:
        checks.append(("CE alpha 0.75 above CE alpha 0.25", "not measured", ""))
    checks.append(gamma_profile_check(rows))
    fl2 = row_of("FL", 2.0)
    d = intervals.get(fl2["name"]) if fl2["seeds"] else None
    if d is None or best_ce is None:
        checks.append(("FL g=2 above the best CE, interval excluding 0", "not measured", ""))
    else:
        checks.append(
            (
                "FL g=2 above the best CE, interval excluding 0",
                "met" if d[1] > 0 else "not met",
                f"{d[0]:+.2f} AP [{d[1]:+.2f}, {d[2]:+.2f}] against {best_ce['name']}",
            )
        )
    return "\n".join(lines) + "\n", checks


def sweep_args(rows):
    """Per row that was run, the tools/sweep.py arguments that run its setting at its rate (for
    more seeds: add --seeds), e.g. ['--loss-types', 'FL', '--param', 'FL.gamma=2', '--alphas',
    '0.25', '--base-lrs', '0.02']."""
    out = []
    for r in rows:
        if r["name"] is None:
            continue  # not run
        args = ["--loss-types", r["loss"]]
        args += ["--param", f"FL.gamma={r['gamma']:g}"] if r["gamma"] is not None else []
        # repr: the exact value (":g" keeps 6 digits, another setting than the grid's run)
        args += ["--alphas", repr(float(r["alpha"]))] if r["alpha"] is not None else []
        args += ["--base-lrs", repr(float(r["lr"]))] if r["lr"] is not None else []
        out.append(args)
    return out
