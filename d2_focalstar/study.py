"""
The FL vs FL* study: what tools/plot_losses.py, tools/sweep.py and tools/compare.py share.

- Fig. 4 of the proposal: loss and gradient magnitude against p_t, from the project's own losses.
- Sweeps: the list of runs (loss type x gamma x seed) and the state of each run's folder.
- Comparison: Table 2 (AP, AP50, AP75, APs, APm, APl, and the safety metrics) per run and per
  setting, with the difference to the FL baseline and the spread over seeds; Fig. 6, the
  training curves from metrics.json.
"""
import csv
import io
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import yaml

from .losses import ALPHA, LOSS_TYPES, sigmoid_classification_loss
from .results import load_run, read_metrics, run_state  # noqa: F401  (part of this module's interface)

__all__ = ["setting_names", "FIG4_CURVES", "loss_curves", "plot_fig4", "SweepRun", "plan_sweep", "run_state",
           "load_run", "comparison_rows", "to_markdown", "to_csv", "plot_training_curves"]

# ---- Fig. 4 --------------------------------------------------------------------------------------

#: (label, loss type, gamma) of the proposal's Fig. 4, alpha = 1.
FIG4_CURVES = [("CE", "CE", 0.0), ("FL, g=2", "FL", 2.0), ("FL*, g=0.125", "FLSTAR", 0.125),
               ("FL*, g=0.25", "FLSTAR", 0.25), ("FL*, g=0.5", "FLSTAR", 0.5)]


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
        params = {"gamma": gamma, "max_factor": max_factor} if LOSS_TYPES[loss_type].capped else (
            {"gamma": gamma} if gamma else {})
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
    ax_loss.set(xlabel="probability of ground-truth class $p_t$", ylabel="loss", ylim=(0, 5),
                title="Loss (alpha = 1)")
    ax_grad.set(xlabel="probability of ground-truth class $p_t$", yscale="log", ylim=(1e-4, 1e2),
                ylabel="|d loss / d logit|", title="Gradient magnitude: FL* up-weights hard examples")
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


# ---- sweeps ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepRun:
    loss_type: str
    params: Tuple[Tuple[str, float], ...]  # (name, value) of the loss parameters it sets
    seed: int
    alpha: Optional[float] = None  # None: the config's

    @property
    def name(self):
        """'flstar_g0.25_s0', 'ce_a0.75_s1': the type, the parameters it sets, alpha, seed."""
        entry = LOSS_TYPES[self.loss_type]
        parts = [self.loss_type.lower()] + [f"{entry.param(n).short}{v:g}" for n, v in self.params]
        parts += [f"a{self.alpha:g}"] if self.alpha is not None else []
        return "_".join(parts + [f"s{self.seed}"])

    def opts(self, head="MODEL.RETINANET"):
        """train_net.py opts that select this run's loss, parameters, alpha and seed; ``head`` is
        the config node of the config's detector (config.loss_config_node)."""
        entry = LOSS_TYPES[self.loss_type]
        opts = ["MODEL.FOCALSTAR.LOSS_TYPE", self.loss_type, "SEED", str(self.seed)]
        for name, value in self.params:
            opts += [entry.param(name).config_key(head), str(float(value))]
        if self.alpha is not None:
            opts += [ALPHA.config_key(head), str(float(self.alpha))]
        return opts


def plan_sweep(loss_types, seeds, values=None, alphas=None):
    """
    Every run of loss type x parameter values x alpha x seed.

    Args:
        loss_types: names of the loss table.
        seeds: the seeds of every setting.
        values: {(loss type, parameter name): values} to try. Without it, a type tries its
            table entry's ``sweep`` values (FL*: the proposal's gammas), else its first
            parameter's default (FL: g = 2); its other parameters keep the config's value.
        alphas: alphas to try for every type (None: the config's alpha).
    """
    values = {(t.upper(), n): v for (t, n), v in (values or {}).items()}
    runs = []
    for loss_type in (t.upper() for t in loss_types):
        entry = LOSS_TYPES[loss_type]
        grid = [()]
        for i, param in enumerate(entry.params):
            tried = values.get((loss_type, param.name))
            if tried is None and i == 0:
                tried = entry.sweep.get(param.name, (param.default,))
            if tried is not None:
                grid = [g + ((param.name, float(v)),) for g in grid for v in tried]
        runs += [SweepRun(loss_type, g, int(s), None if a is None else float(a))
                 for a in (alphas or [None]) for g in grid for s in seeds]
    return runs


# ---- comparison -----------------------------------------------------------------------------------

COCO_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def _metrics(record):
    res = record["results"]
    if "bbox" not in res and res and all(isinstance(v, dict) and "bbox" in v for v in res.values()):
        # several DATASETS.TEST: detectron2 nests the results by dataset; the first one counts
        first = (record.get("datasets", {}).get("test") or list(res))[0]
        res = res.get(first, next(iter(res.values())))
    out = OrderedDict((k, res.get("bbox", {}).get(k)) for k in COCO_METRICS)
    for k, v in res.get("safety", {}).items():
        if "-" not in k:  # the means; per-class values stay in the run's own files
            out[k] = v
    # null in results.json (or missing): a metric without a value, NaN in the table's maths
    return OrderedDict((k, math.nan if v is None else float(v)) for k, v in out.items())


def _setting(record):
    """'FLSTAR g=0.25': the loss type, its first parameter, and its others where they are not the
    table's default ('FLSTAR g=0.5 cap=10')."""
    entry = LOSS_TYPES.get(record["loss_type"])
    params = record.get("params") or {}
    parts = [record["loss_type"]]
    for i, param in enumerate(entry.params if entry else ()):
        value = params.get(param.name)
        if value is not None and (i == 0 or value != param.default):
            parts.append(f"{param.short}={value:g}")
    return " ".join(parts)


def _solver(key):
    return lambda r: (r.get("solver") or {}).get(key)


def _datasets(split):
    def get(record):
        names = (record.get("datasets") or {}).get(split)
        return None if names is None else tuple(names)  # results.json's list, made hashable
    return get


def _show(value):
    """A knob's value in a setting name: 0.005, 'on'/'off', 'a_train+b_train', a string as it is."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "+".join(map(str, value))
    return str(value)


def _show_weights(path):
    # the file's name is enough to tell initialisations apart, a URL's too; '' is no weights at all
    return (os.path.basename(path.rstrip("/")) or path) if path else "none"


def _initial_weights(record):
    # an evaluation's weights are the checkpoint it evaluated, one per run: not a setting
    return None if "iteration" in record and record["iteration"] is None else record.get("weights")


# settings besides the loss that make runs not comparable as seeds of one setting:
# (name, value in a record or None where it does not say, how the value reads in a setting name)
_KNOBS = (("lr", _solver("base_lr"), _show),
          ("iters", _solver("max_iter"), _show),
          ("batch", _solver("ims_per_batch"), _show),
          ("amp", _solver("amp"), _show),  # results.json written before it was recorded: None
          ("alpha", lambda r: r.get("alpha"), _show),
          ("weights", lambda r: _initial_weights(r), _show_weights),
          ("train", _datasets("train"), _show),
          ("test", _datasets("test"), _show))


def _knob_suffixes(records):
    """Per record, ' lr=0.005 amp=on'-like: each knob whose value differs from the one most of
    ``records`` have (None, unknown, never differs)."""
    suffixes = [""] * len(records)
    for knob, get, show in _KNOBS:
        values = [get(r) for r in records]
        known = [v for v in values if v is not None]
        if len(set(known)) < 2:
            continue
        usual = max(set(known), key=lambda v: (known.count(v), -known.index(v)))
        labels = {v: show(v) for v in set(known)}
        if len(set(labels.values())) < len(labels):  # weights files of one name: show them whole
            labels = {v: _show(v) for v in labels}
        suffixes = [s if v is None or v == usual else f"{s} {knob}={labels[v]}"
                    for s, v in zip(suffixes, values)]
    return suffixes


def setting_names(records):
    """The setting of each record: loss type, gamma and cap (see ``_setting``), plus 'lr=..',
    'iters=..', 'batch=..', 'amp=on/off', 'alpha=..', 'weights=<file name>', 'train=..' or
    'test=..' (datasets joined with '+') where a run's value differs from the one most of
    ``records`` have, so that runs differing in more than the seed are never averaged. A record
    that does not say (an older results.json) takes the usual value."""
    return [_setting(r) + s for r, s in zip(records, _knob_suffixes(records))]


def _nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _fl_baselines(groups, suffixes):
    """{knob suffix: the FL setting of that suffix}: FL g=2 where there is one, else the first FL
    setting in name order."""
    baselines = {}
    for name, rs in groups.items():  # in name order
        if rs[0]["loss_type"] != "FL":
            continue
        current = baselines.get(suffixes[name])
        if current is None or (rs[0]["gamma"] == 2 and groups[current][0]["gamma"] != 2):
            baselines[suffixes[name]] = name
    return baselines


def comparison_rows(records):
    """
    Table 2: one row per run, then one row per setting (loss type + gamma) over its seeds with
    mean and sample standard deviation, each with the difference of the mean to FL's.
    The FL baseline of a setting is the FL setting with the same knobs (' lr=0.005' and the like,
    see ``setting_names``), FL g=2 if there are several, else the first by name; a setting
    without one has NaN differences, so that runs at different knobs are never compared.
    Returns (columns, rows) where rows are dicts of column -> value (numbers or strings).
    """
    metric_names = list(OrderedDict.fromkeys(k for r in records for k in _metrics(r)))
    groups, suffixes = OrderedDict(), {}
    named = zip(setting_names(records), _knob_suffixes(records), records)
    for name, suffix, r in sorted(named, key=lambda nsr: (nsr[0], nsr[2].get("seed", 0))):
        groups.setdefault(name, []).append(r)
        suffixes[name] = suffix
    means = {s: {m: _nanmean([_metrics(r).get(m, math.nan) for r in rs]) for m in metric_names}
             for s, rs in groups.items()}
    baselines = _fl_baselines(groups, suffixes)

    rows = []
    for setting, rs in groups.items():
        for r in rs:
            row = OrderedDict(run=os.path.basename(os.path.normpath(r["folder"])), setting=setting,
                              seeds=str(r.get("seed")))
            row.update(_metrics(r))
            rows.append(row)
    for setting, rs in groups.items():
        row = OrderedDict(run="mean", setting=setting, seeds=str(len(rs)))
        for m in metric_names:
            values = [v for v in (_metrics(r).get(m, math.nan) for r in rs) if not math.isnan(v)]
            row[m] = means[setting][m]
            row[f"{m} sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            row[f"{m} n"] = len(values)  # seeds with a value (NaN: e.g. no detections at all)
            baseline = baselines.get(suffixes[setting])
            row[f"{m} vs FL"] = (means[setting][m] - means[baseline][m]) if baseline else math.nan
        rows.append(row)
    columns = ["run", "setting", "seeds"] + metric_names
    return columns, rows


def _fmt(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else (
        f"{v:.2f}" if isinstance(v, float) else str(v))


def to_markdown(columns, rows):
    """Per-run rows as they are; per-setting rows as 'mean ± sd (+diff vs FL)' (no difference
    where it is NaN: no FL baseline), with '[n of N seeds]' where some seeds have no value for
    that metric."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            if row["run"] == "mean" and c not in ("run", "setting", "seeds"):
                cell = _fmt(v)
                if _fmt(row.get(f"{c} sd")):
                    cell += f" ± {_fmt(row[f'{c} sd'])}"
                if _fmt(row.get(f"{c} vs FL")):
                    cell += f" ({row[f'{c} vs FL']:+.2f})"
                if 0 < row.get(f"{c} n", 0) < int(row["seeds"]):
                    cell += f" [{row[f'{c} n']} of {row['seeds']} seeds]"
                cells.append(cell)
            else:
                cells.append(_fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(columns, rows):
    extra = [k for row in rows for k in row if k not in columns]
    fields = columns + list(OrderedDict.fromkeys(extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in fields})
    return buf.getvalue()


# ---- intervals: paired bootstrap over images -------------------------------------------------------

def _ground_truth(record):
    """The COCO ground-truth dict of a run's (first) test dataset: an embedded dataset (made
    again from its seed if absent), a detectron2 builtin, or one of the run's DATASETS.COCO_JSON
    (its config.yaml). BootstrapError naming the run if none can be found."""
    from detectron2.data import MetadataCatalog

    from .bootstrap import BootstrapError
    from .data import EMBEDDED_DATASETS, ensure_shapes_dataset

    name = ((record.get("datasets") or {}).get("test") or [None])[0]
    if name is None:
        raise BootstrapError(f"{record['folder']}: results.json does not name its test dataset")
    base = name.rsplit("_", 1)[0]
    if base in EMBEDDED_DATASETS:
        ensure_shapes_dataset(base)
    json_file = MetadataCatalog.get(name).get("json_file") if name in MetadataCatalog.list() else None
    if json_file is None:
        config = os.path.join(record["folder"], "config.yaml")
        if os.path.isfile(config):
            with open(config) as f:
                entries = ((yaml.safe_load(f) or {}).get("DATASETS") or {}).get("COCO_JSON") or []
            json_file = next((e[1] for e in entries if e and e[0] == name), None)
    if not json_file or not os.path.isfile(json_file):
        raise BootstrapError(f"{record['folder']}: the ground truth of its test dataset {name!r} is "
                             f"not here ({json_file or 'not registered'}): put the dataset where it "
                             "was (DETECTRON2_DATASETS) to compute intervals")
    with open(json_file) as f:
        return name, json.load(f)


def interval_rows(records, versus=None, num_resamples=1000, seed=0, warn=None):
    """
    The difference of each setting to a reference setting in AP, AP50, APs and LAMR, with a 95%
    interval from a paired bootstrap over the test images (d2_focalstar/bootstrap.py), computed
    from each run's saved detections (OUTPUT_DIR/inference/coco_instances_results.json[.gz]).

    Args:
        records: load_run() records.
        versus: the reference setting's name (as in the table, e.g. 'CE alpha=0.75'); None: each
            setting's FL baseline, as the table's "vs FL".
        warn: called with a line for each run left out (no saved detections).
    Returns:
        rows (dicts: setting, versus, runs, images, resamples and per metric its diff, low, high),
        in the table's setting order. BootstrapError (one line) for runs of other datasets or
        image sets, and for an unknown ``versus``.
    """
    from .bootstrap import (BOOTSTRAP_METRICS, BootstrapError, RunEvaluation, detections_file, load_detections,
                            paired_bootstrap)

    warn = warn or (lambda line: None)
    names, suffixes = setting_names(records), _knob_suffixes(records)
    groups, suffix_of = OrderedDict(), {}
    for name, suffix, r in sorted(zip(names, suffixes, records), key=lambda nsr: (nsr[0], nsr[2].get("seed", 0))):
        groups.setdefault(name, []).append(r)
        suffix_of[name] = suffix
    if versus is not None and versus not in groups:
        raise BootstrapError(f"--versus {versus!r} is not one of the settings: {', '.join(groups)}")
    baselines = _fl_baselines(groups, suffix_of)
    gts, evaluations = {}, {}

    def evaluation(record):
        folder = record["folder"]
        if folder not in evaluations:
            test = list((record.get("datasets") or {}).get("test") or [])
            path = detections_file(folder, test[0] if len(test) > 1 else None)
            if path is None:
                warn(f"{folder}: no saved detections (inference/coco_instances_results.json): left "
                     "out of the intervals")
                evaluations[folder] = None
                return None
            if tuple(test) not in gts:
                try:
                    gts[tuple(test)] = _ground_truth(record)
                except BootstrapError as e:
                    gts[tuple(test)] = e
            if isinstance(gts[tuple(test)], BootstrapError):
                warn(f"{gts[tuple(test)]}: left out of the intervals")
                evaluations[folder] = None
            else:
                dataset, gt = gts[tuple(test)]
                config = _run_config(folder)
                safety = config.get("TEST", {}).get("SAFETY", {})
                classes = safety.get("CLASSES", []) if safety.get("ENABLED", True) else []
                evaluations[folder] = (dataset, RunEvaluation(gt, load_detections(path), classes,
                                                              safety.get("IOU_THRESHOLD", 0.5), name=folder))
        return evaluations[folder]

    rows = []
    for name, rs in groups.items():
        reference = versus or baselines.get(suffix_of[name])
        if reference is None or reference == name:
            continue
        a = [e for e in map(evaluation, rs) if e is not None]
        b = [e for e in map(evaluation, groups[reference]) if e is not None]
        if not a or not b:
            continue
        datasets = {d for d, _ in a + b}
        if len(datasets) > 1:
            raise BootstrapError(f"{name} and {reference} were evaluated on different datasets "
                                 f"({', '.join(sorted(datasets))}): their difference has no interval")
        res = paired_bootstrap([e for _, e in a], [e for _, e in b], num_resamples=num_resamples, seed=seed,
                               metrics=BOOTSTRAP_METRICS)
        row = OrderedDict(setting=name, versus=reference, runs=f"{len(a)} vs {len(b)}",
                          images=len(a[0][1].image_ids), resamples=num_resamples)
        for m, v in res.items():
            row.update({f"{m} diff": v["diff"], f"{m} low": v["low"], f"{m} high": v["high"]})
        rows.append(row)
    return rows


def _run_config(folder):
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def intervals_to_markdown(rows):
    """'| setting | vs | runs | ΔAP [95% interval] | ... |', differences signed, lower LAMR better."""
    from .bootstrap import BOOTSTRAP_METRICS

    head = "| setting | vs | runs | " + " | ".join(f"Δ{m} [95% interval]" for m in BOOTSTRAP_METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + len(BOOTSTRAP_METRICS))]
    for r in rows:
        cells = [r["setting"], r["versus"], r["runs"]]
        for m in BOOTSTRAP_METRICS:
            d, lo, hi = r[f"{m} diff"], r[f"{m} low"], r[f"{m} high"]
            cells.append("" if math.isnan(d) else f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    images = {r["images"] for r in rows}
    note = (f"\nPaired bootstrap over the {', '.join(map(str, sorted(images)))} test images, "
            f"{rows[0]['resamples']} resamples; an interval that excludes 0 is a difference the "
            "test images support (seed-to-seed spread: the table's ± sd).\n") if rows else ""
    return "\n".join(lines) + "\n" + note


#: RetinaNet's Table 1 (Lin et al., ICCV 2017; ResNet-50, COCO minival AP): (loss type, gamma,
#: alpha, AP). (a) CE at three alphas; (b) FL at each gamma with the alpha the paper found best.
TABLE1 = (("CE", None, 0.25, 10.8), ("CE", None, 0.5, 30.2), ("CE", None, 0.75, 31.1),
          ("FL", 0.5, 0.5, 32.9), ("FL", 1.0, 0.25, 33.7), ("FL", 2.0, 0.25, 34.0), ("FL", 5.0, 0.25, 32.2))


def table1(records, num_resamples=1000, seed=0, warn=None):
    """
    The proxy's runs beside RetinaNet's Table 1, and the three checks that make the proxy count
    as calibrated: CE at alpha 0.75 above CE at 0.25; FL's best gamma 1 or 2; FL g=2 above the
    best CE with a 95% paired-bootstrap interval (``interval_rows``) that excludes 0.

    Runs are matched to a row by loss type and gamma (and alpha for CE; for FL the paper's alpha
    where such runs exist, else the runs' own). Other runs (FL*, other knobs) are ignored.
    Returns (markdown table, [(check, 'met' / 'not met' / 'not measured', detail)]).
    """
    def key(r):
        return r["loss_type"], (r.get("params") or {}).get("gamma"), r.get("alpha")

    ours = [r for r in records if r["loss_type"] in ("CE", "FL")]
    names = setting_names(ours)
    groups = OrderedDict()
    for name, r in zip(names, ours):
        groups.setdefault(name, []).append(r)
    rows = []
    for loss, gamma, alpha, paper in TABLE1:
        found = [n for n, rs in groups.items() if key(rs[0])[0] == loss and key(rs[0])[1] == gamma
                 and (loss == "FL" or key(rs[0])[2] == alpha)]
        if len(found) > 1:  # several alphas of one FL gamma: the paper's
            found = [n for n in found if key(groups[n][0])[2] == alpha] or found[:1]
        if len(found) > 1 or (found and len({r.get("alpha") for r in groups[found[0]]}) > 1):
            raise ValueError(f"Table 1's {loss} gamma={gamma} alpha={alpha} matches {found}: give one "
                             "study's folders")
        aps = [_metrics(r).get("AP", math.nan) for r in groups[found[0]]] if found else []
        aps = [v for v in aps if not math.isnan(v)]
        rows.append(dict(loss=loss, gamma=gamma, paper_alpha=alpha, paper_ap=paper,
                         name=found[0] if found else None,
                         alpha=groups[found[0]][0].get("alpha") if found else None, seeds=len(aps),
                         mean=float(np.mean(aps)) if aps else math.nan,
                         sd=float(np.std(aps, ddof=1)) if len(aps) > 1 else math.nan))
    measured = [r for r in rows if r["seeds"]]
    ce = [r for r in measured if r["loss"] == "CE"]
    best_ce = max(ce, key=lambda r: r["mean"]) if ce else None
    intervals = {}
    if best_ce is not None:
        for row in interval_rows(ours, best_ce["name"], num_resamples, seed, warn):
            intervals[row["setting"]] = (row["AP diff"], row["AP low"], row["AP high"])
    paper_best_ce = max(p[3] for p in TABLE1 if p[0] == "CE")

    def cell(r):
        if not r["seeds"]:
            return "not run", ""
        ours_ = f"{r['mean']:.2f}" + ("" if math.isnan(r["sd"]) else f" ± {r['sd']:.2f}")
        d = intervals.get(r["name"])
        return ours_, ("best CE" if r is best_ce else
                       "" if d is None else f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]")

    lines = ["| loss | gamma | paper: alpha | paper: AP (COCO) | paper: vs best CE | proxy: alpha | "
             "proxy: seeds | proxy: AP mean ± sd | proxy: vs best CE [95% interval] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours_, vs = cell(r)
        gamma = "" if r["gamma"] is None else f"{r['gamma']:g}"
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"| {r['loss']} | {gamma} | {r['paper_alpha']:g} | {r['paper_ap']:.1f} | "
                     f"{r['paper_ap'] - paper_best_ce:+.1f} | {alpha} | {r['seeds']} | {ours_} | {vs} |")

    def row_of(loss, gamma=None, alpha=None):
        return next(r for r in rows if r["loss"] == loss and r["gamma"] == gamma
                    and (alpha is None or r["paper_alpha"] == alpha))

    checks = []
    lo, hi = row_of("CE", alpha=0.25), row_of("CE", alpha=0.75)
    if lo["seeds"] and hi["seeds"]:
        d = intervals.get(lo["name"]) if hi is best_ce else None
        detail = f"{hi['mean']:.2f} vs {lo['mean']:.2f} AP" + (
            f" (CE alpha 0.25 vs best CE: {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}])" if d else "")
        checks.append(("CE alpha 0.75 above CE alpha 0.25", "met" if hi["mean"] > lo["mean"] else "not met", detail))
    else:
        checks.append(("CE alpha 0.75 above CE alpha 0.25", "not measured", ""))
    fl = [r for r in rows if r["loss"] == "FL" and r["seeds"]]
    if len(fl) >= 2:
        peak = max(fl, key=lambda r: r["mean"])
        checks.append(("FL's gamma profile peaks at 1-2", "met" if peak["gamma"] in (1.0, 2.0) else "not met",
                       f"best gamma {peak['gamma']:g} ({peak['mean']:.2f} AP) of " +
                       ", ".join(f"{r['gamma']:g}" for r in fl)))
    else:
        checks.append(("FL's gamma profile peaks at 1-2", "not measured", "fewer than two FL gammas run"))
    fl2 = row_of("FL", 2.0)
    d = intervals.get(fl2["name"]) if fl2["seeds"] else None
    if d is None or best_ce is None:
        checks.append(("FL g=2 above the best CE, interval excluding 0", "not measured", ""))
    else:
        checks.append(("FL g=2 above the best CE, interval excluding 0", "met" if d[1] > 0 else "not met",
                       f"{d[0]:+.2f} AP [{d[1]:+.2f}, {d[2]:+.2f}] against {best_ce['name']}"))
    return "\n".join(lines) + "\n", checks


def _read_metrics(folder):
    # one record per iteration, the last written (resumed runs repeat iterations)
    return read_metrics(folder)


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
        rows = _read_metrics(folder)
        for ax, key in zip(axes, keys):
            pts = [(r["iteration"], r[key]) for r in rows
                   if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
            if pts:
                it, v = zip(*pts)
                ax.plot(it, v, style, color=color, marker="o" if key == "bbox/AP" else None, ms=3,
                        label=label)
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
