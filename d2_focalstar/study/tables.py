"""
Table 2 of the proposal from any set of finished runs: AP, AP50, AP75, APs, APm, APl and the
safety metrics per run, then per setting (loss type and parameters, plus any knob in which runs
differ: learning rate, schedule, alpha, weights, datasets) the mean and spread over seeds and the
difference to the FL baseline at the same knobs; as Markdown and CSV.
"""

import csv
import io
import math
import os
from collections import OrderedDict

import numpy as np

from ..modeling.losses import LOSS_TYPES

__all__ = [
    "COCO_METRICS",
    "metrics_of",
    "setting_names",
    "group_by_setting",
    "fl_baselines",
    "comparison_rows",
    "to_markdown",
    "to_csv",
]

COCO_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def metrics_of(record):
    """The metrics of a run's record: COCO's six, or those of them its evaluator reports
    (detectron2's Pascal VOC evaluator: AP, AP50, AP75), then the safety means (NaN where
    missing)."""
    res = record["results"]
    if "bbox" not in res and res and all(isinstance(v, dict) and "bbox" in v for v in res.values()):
        # several DATASETS.TEST: detectron2 nests the results by dataset; the first one counts
        first = (record.get("datasets", {}).get("test") or list(res))[0]
        res = res.get(first, next(iter(res.values())))
    bbox = res.get("bbox", {})
    out = OrderedDict((k, bbox.get(k)) for k in COCO_METRICS if k in bbox or not bbox)
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
_KNOBS = (
    ("lr", _solver("base_lr"), _show),
    ("iters", _solver("max_iter"), _show),
    ("batch", _solver("ims_per_batch"), _show),
    ("amp", _solver("amp"), _show),  # results.json written before it was recorded: None
    ("warmup", _solver("warmup_iters"), _show),  # older records: from their config.yaml
    ("clip", _solver("clip_gradients"), _show),
    ("alpha", lambda r: r.get("alpha"), _show),
    ("weights", lambda r: _initial_weights(r), _show_weights),
    ("train", _datasets("train"), _show),
    ("test", _datasets("test"), _show),
)


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
        suffixes = [
            s if v is None or v == usual else f"{s} {knob}={labels[v]}"
            for s, v in zip(suffixes, values)
        ]
    return suffixes


def setting_names(records):
    """The setting of each record: loss type, gamma and cap (see ``_setting``), plus 'lr=..',
    'iters=..', 'batch=..', 'amp=on/off', 'warmup=..', 'clip=on/off', 'alpha=..',
    'weights=<file name>', 'train=..' or 'test=..' (datasets joined with '+') where a run's
    value differs from the one most of ``records`` have, so that runs differing in more than the
    seed are never averaged. A record that does not say (an older results.json) takes the usual
    value."""
    return [_setting(r) + s for r, s in zip(records, _knob_suffixes(records))]


def _nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def group_by_setting(records):
    """(groups, suffixes): {setting name: its records, by seed} in name order, and {setting name:
    its knob suffix (' lr=0.005', '' for the usual knobs)}; the names are ``setting_names``'."""
    groups, suffixes = OrderedDict(), {}
    named = zip(setting_names(records), _knob_suffixes(records), records)
    for name, suffix, r in sorted(named, key=lambda nsr: (nsr[0], nsr[2].get("seed", 0))):
        groups.setdefault(name, []).append(r)
        suffixes[name] = suffix
    return groups, suffixes


def fl_baselines(groups, suffixes):
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
    metric_names = list(OrderedDict.fromkeys(k for r in records for k in metrics_of(r)))
    groups, suffixes = group_by_setting(records)
    means = {
        s: {m: _nanmean([metrics_of(r).get(m, math.nan) for r in rs]) for m in metric_names}
        for s, rs in groups.items()
    }
    baselines = fl_baselines(groups, suffixes)

    rows = []
    for setting, rs in groups.items():
        for r in rs:
            row = OrderedDict(
                run=os.path.basename(os.path.normpath(r["folder"])),
                setting=setting,
                seeds=str(r.get("seed")),
            )
            row.update(metrics_of(r))
            rows.append(row)
    for setting, rs in groups.items():
        row = OrderedDict(run="mean", setting=setting, seeds=str(len(rs)))
        for m in metric_names:
            values = [v for v in (metrics_of(r).get(m, math.nan) for r in rs) if not math.isnan(v)]
            row[m] = means[setting][m]
            row[f"{m} sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            row[f"{m} n"] = len(values)  # seeds with a value (NaN: e.g. no detections at all)
            baseline = baselines.get(suffixes[setting])
            row[f"{m} vs FL"] = (means[setting][m] - means[baseline][m]) if baseline else math.nan
        rows.append(row)
    columns = ["run", "setting", "seeds"] + metric_names
    return columns, rows


def _fmt(v):
    return (
        ""
        if v is None or (isinstance(v, float) and math.isnan(v))
        else (f"{v:.2f}" if isinstance(v, float) else str(v))
    )


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
