"""
results.json: the record of a finished run (final metrics and the settings that identify it),
written by train_net.py and read by the sweep (is a run finished?) and the comparison; and
detectron2's metrics.json of a run, read back one record per iteration.
"""

import hashlib
import json
import logging
import os
import re

import yaml

from ..fileio import write_json
from ..modeling import loss_config_node
from ..modeling.losses import LOSS_TYPES, loss_setting
from ..provenance import add_provenance
from .checkpoint import last_checkpoint

__all__ = [
    "RESULTS_FILE",
    "RunRecordError",
    "RunDiverged",
    "write_results",
    "forget_divergence",
    "load_run",
    "load_runs_counting_divergences",
    "weights_sha256",
    "starting_points",
    "check_one_starting_point",
    "recipes",
    "check_one_recipe",
    "recipe_mismatch",
    "run_state",
    "read_run_config",
    "read_metrics",
]

logger = logging.getLogger(__name__)

#: Where train_net.py leaves the final metrics of a run.
RESULTS_FILE = "results.json"

#: The record's key for the SHA-256 of the MODEL.WEIGHTS file the run started from.
WEIGHTS_SHA256 = "weights_sha256"


def weights_sha256(weights):
    """SHA-256 (hex) of a MODEL.WEIGHTS that is a local file; None for none ("": random init)
    or a URL / catalog name (detectron2://..., whose content its name fixes)."""
    if not weights or not os.path.isfile(weights):
        return None
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def starting_points(records):
    """The trainings among ``records`` grouped by the weights they started from: one line per
    group (the weights' path and SHA-256, the first run folders), in the records' order. A
    record without the SHA-256 (written before it was recorded) is grouped by its weights' path;
    an evaluation alone (iteration None: its weights are the checkpoint it evaluated, not where
    a training started) is left out."""
    groups = {}
    for r in records:
        if "iteration" in r and r["iteration"] is None:
            continue
        if WEIGHTS_SHA256 not in r:
            key = ("sha256 not recorded", r.get("weights"))
        elif r[WEIGHTS_SHA256] is None:
            key = ("no file", r.get("weights"))
        else:
            key = (f"sha256 {r[WEIGHTS_SHA256][:12]}", r[WEIGHTS_SHA256])
        groups.setdefault(key, []).append(r)

    return [
        f"weights {runs[0].get('weights')!r} {key[0]}: {_run_folders(runs)}"
        for key, runs in groups.items()
    ]


def _run_folders(runs):
    """'a, b, c, d and 3 more': the first run folders of a group, for a one-line message."""
    names = ", ".join(
        os.path.basename(os.path.normpath(str(r.get("folder", "?")))) for r in runs[:4]
    )
    return names + (f" and {len(runs) - 4} more" if len(runs) > 4 else "")


def check_one_starting_point(records, what):
    """RunRecordError unless every record started from the same weights file (``starting_points``).
    ``what`` names the table in the message. The same config and seed give another trunk on
    another CPU, so rows from two trunks would compare proxies, not losses."""
    points = starting_points(records)
    if len(points) > 1:
        raise RunRecordError(
            f"{what} needs runs from one starting point, these started from {len(points)}: "
            + "; ".join(points)
            + f" (the {WEIGHTS_SHA256!r} of each results.json; give the runs of one trunk)"
        )


#: The parts of the training recipe, besides the loss, its rate and the schedule's length, that
#: a table of losses must hold fixed and a record gives: (name in the record's 'solver', its key
#: in a saved config.yaml). Not recorded: the warm-up's start factor, the steps, clipping's value.
RECIPE_KEYS = (
    ("warmup_iters", ("SOLVER", "WARMUP_ITERS")),
    ("clip_gradients", ("SOLVER", "CLIP_GRADIENTS", "ENABLED")),
)


def recipes(records):
    """The recipes (``RECIPE_KEYS``: the warm-up's length, gradient clipping) of the trainings
    among ``records``, as lines: one line of the values where they agree, else one line per
    group (the values, the first run folders), in the records' order. A value a record does not
    give (an older record without its config.yaml) agrees with any; an evaluation alone is left
    out."""
    trainings = [r for r in records if not ("iteration" in r and r["iteration"] is None)]
    given = [  # per training, the (name, value) pairs of the recipe its record gives
        [(n, (r.get("solver") or {}).get(n)) for n, _ in RECIPE_KEYS] for r in trainings
    ]
    given = [[(n, v) for n, v in pairs if v is not None] for pairs in given]
    keys = [tuple(f"{n}={v}" for n, v in pairs) for pairs in given]
    values = {}
    for pairs in given:
        for n, v in pairs:
            values.setdefault(n, set()).add(v)
    if all(len(v) == 1 for v in values.values()):  # one recipe: the records that do not say
        agreed = [f"{n}={next(iter(values[n]))}" for n, _ in RECIPE_KEYS if n in values]
        return [" ".join(agreed)] if agreed else []
    groups = {}
    for key, r in zip(keys, trainings):
        groups.setdefault(key, []).append(r)

    return [
        f"{' '.join(key) or 'recipe not recorded'}: {_run_folders(runs)}"
        for key, runs in groups.items()
    ]


def check_one_recipe(records, what):
    """RunRecordError unless every record that gives its recipe gives the same one
    (``recipes``): a row of Table 1 run with a 300-iteration warm-up and one run with 1,000
    measure two recipes, not two losses. ``what`` names the table in the message."""
    groups = recipes(records)
    if len(groups) > 1:
        raise RunRecordError(
            f"{what} needs runs of one recipe, these have {len(groups)}: "
            + "; ".join(groups)
            + " (the 'solver' of each results.json, else its config.yaml; give runs of one recipe)"
        )


def recipe_mismatch(folder, cfg):
    """For a finished or diverged run in ``folder``: 'warmup_iters 300 (the config: 1000)'-like
    for each part of the recipe its record gives that ``cfg`` sets otherwise; '' where they agree,
    the record does not say, or there is no readable record."""
    try:
        record = load_run(folder)
    except RunDiverged as e:
        record = e.record
    except (FileNotFoundError, RunRecordError):
        return ""
    solver = record.get("solver") or {}
    differ = []
    for name, keys in RECIPE_KEYS:
        wanted = cfg
        for k in keys:
            wanted = getattr(wanted, k)
        if solver.get(name) is not None and solver[name] != wanted:
            differ.append(f"{name} {solver[name]} (the config: {wanted})")
    return ", ".join(differ)


def write_results(cfg, results, iteration, evaluation_error=None, diverged=None):
    """Write the final metrics and the settings that identify the run to OUTPUT_DIR/results.json
    (``iteration`` None: an evaluation only; ``evaluation_error``: why a finished training has no
    metrics; ``diverged``: the one-line reason a training stopped with a loss or weights that
    were not finite, at ``iteration``. A diverged run is a result, not a failure to retry: a
    comparison that retried it until a seed survived would favour the unstable loss.)"""
    setting = loss_setting(cfg, loss_config_node(cfg))
    record = {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "loss_type": setting.loss_type,
        "params": setting.params,
        # older readers: the type's gamma (None without one) and FL*'s cap
        "gamma": setting.params.get("gamma"),
        "max_factor": cfg.MODEL.FOCALSTAR.MAX_FACTOR,
        "alpha": setting.alpha,
        "seed": cfg.SEED,
        "weights": cfg.MODEL.WEIGHTS,
        "iteration": iteration,
        "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        "solver": {
            "base_lr": cfg.SOLVER.BASE_LR,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
            "amp": cfg.SOLVER.AMP.ENABLED,
            "warmup_iters": cfg.SOLVER.WARMUP_ITERS,
            "clip_gradients": cfg.SOLVER.CLIP_GRADIENTS.ENABLED,
        },
        "results": {task: dict(metrics) for task, metrics in results.items()},
    }
    if iteration is not None:  # a training: where it started (an evaluation's are its checkpoint)
        # the file's bytes, not its path: the same command builds a different trunk on another
        # CPU (docs/RESULTS.md), and a table must not mix runs from two of them
        record[WEIGHTS_SHA256] = weights_sha256(cfg.MODEL.WEIGHTS)
    if evaluation_error is not None:
        record["evaluation_error"] = evaluation_error
    if diverged is not None:
        record["diverged"] = diverged
    add_provenance(record)  # which code, libraries and CPU made it
    path = os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    write_json(path, record)
    logger.info(f"Final metrics written to {path}")


class RunRecordError(ValueError):
    """A results.json that is not a record train_net.py wrote: cut short, edited, another file."""


class RunDiverged(RunRecordError):
    """The record of a training that diverged: no metrics; ``record`` is the run's record (its
    settings, 'diverged': the reason, 'iteration': where), for the tools that count such runs."""

    def __init__(self, message, record):
        super().__init__(message)
        self.record = record


def _diverged_record(record):
    return isinstance(record, dict) and isinstance(record.get("diverged"), str)


def load_run(folder):
    """The record train_net.py wrote to <folder>/results.json, with 'folder' added, and 'params'
    filled in for records written before it was (from 'gamma' and 'max_factor').
    FileNotFoundError without results.json; RunRecordError, naming the file, for one that is
    not valid JSON or lacks what a comparison reads."""
    path = os.path.join(folder, RESULTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder}: no {RESULTS_FILE} (an unfinished run, or not a train_net.py output folder)"
        )
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except RecursionError:  # nested deeper than json's parser goes
        raise RunRecordError(f"{path}: JSON nested too deep to be a run's record") from None
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunRecordError(
            f"{path}: not valid JSON ({str(e).splitlines()[0][:120]}): "
            "written only in part, or damaged"
        ) from None
    if not isinstance(record, dict):
        raise RunRecordError(f"{path}: a JSON {type(record).__name__}, not a run's record")
    problems = [
        f"{key!r} ({what})"
        for key, what, ok in (
            # a name of the loss table's kind: a newline or a '|' in it would break the tables' rows
            (
                "loss_type",
                "a loss type's name",
                lambda v: isinstance(v, str) and re.fullmatch(r"[\w.+-]{1,64}", v),
            ),
            (
                "results",
                "{task: {metric: value}}",
                lambda v: isinstance(v, dict) and all(isinstance(m, dict) for m in v.values()),
            ),
        )
        if not ok(record.get(key))
    ]
    if problems:
        raise RunRecordError(
            f"{path}: lacks {' and '.join(problems)}: not a record train_net.py wrote"
        )
    not_numbers = [
        f"{name}={value!r:.40}"
        for name, value in _leaves(record["results"])
        if not (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)))
    ]
    if not_numbers:
        raise RunRecordError(
            f"{path}: metric {not_numbers[0]} is not a number: not a record train_net.py wrote"
        )
    if record.get("evaluation_error") is not None:
        raise RunRecordError(
            f"{path}: the training finished but its evaluation failed "
            f"({record['evaluation_error']}); --resume evaluates it"
        )
    # the keys a record may lack (older ones do), of the type the comparison reads where present
    wrong = [
        f"{key!r} is {record[key]!r}"
        for key, types in (
            ("params", dict),
            ("solver", dict),
            ("datasets", dict),
            ("seed", (int, type(None))),
            ("gamma", (int, float, type(None))),
            ("alpha", (int, float, type(None))),
            ("weights", (str, type(None))),
            (WEIGHTS_SHA256, (str, type(None))),
            ("iteration", (int, type(None))),
        )
        if key in record and not isinstance(record[key], types)
    ]
    if wrong:
        raise RunRecordError(f"{path}: {', '.join(wrong)}: not a record train_net.py wrote")
    record["folder"] = folder
    if "diverged" in record and not isinstance(record["diverged"], str):
        raise RunRecordError(
            f"{path}: 'diverged' is {record['diverged']!r:.40}: not a record train_net.py wrote"
        )
    if "params" not in record:
        entry = LOSS_TYPES.get(record["loss_type"])
        names = [p.name for p in entry.params] if entry else []
        record["params"] = {n: record[n] for n in names if n in record}
    record.setdefault("gamma", record["params"].get("gamma"))
    solver = record.get("solver")
    missing = [name for name, _ in RECIPE_KEYS if name not in (solver or {})]
    if solver is None or missing:  # written before results.json had them: the run's config.yaml
        try:
            saved = read_run_config(folder)
        except RunRecordError:
            if solver is None:
                raise
            saved = {}  # the record has what a comparison needs; its recipe stays unknown
        if solver is None and isinstance(saved.get("SOLVER"), dict) and saved["SOLVER"]:
            record["solver"] = solver = {
                k.lower(): saved["SOLVER"][k]
                for k in ("BASE_LR", "MAX_ITER", "IMS_PER_BATCH")
                if k in saved["SOLVER"]
            }
        for name, keys in RECIPE_KEYS:
            if name in missing and solver is not None:
                value = saved
                for k in keys:
                    value = value.get(k) if isinstance(value, dict) else None
                if value is not None:
                    solver[name] = value
    if _diverged_record(record):
        raise RunDiverged(
            f"{path}: the training diverged at iteration {record.get('iteration')} "
            f"({record['diverged']}): no metrics",
            record,
        )
    return record


def load_runs_counting_divergences(folders, warn):
    """``load_run`` of each folder, for a table that counts a diverged seed as that seed's failure
    (tools/table1.py, tools/ablation.py): a diverged run gives its record, a folder without a
    readable finished run is left out; each is named through ``warn(line)``."""
    records = []
    for folder in folders:
        try:
            records.append(load_run(folder))
        except RunDiverged as e:
            warn(f"diverged: {e}")
            records.append(e.record)
        except (FileNotFoundError, RunRecordError) as e:
            warn(f"skipped {e}")
    return records


def _leaves(node, prefix=""):
    """(dotted name, value) of each metric of results ({task: {metric: v}}, or per test dataset
    {dataset: {task: {metric: v}}})."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def read_run_config(folder):
    """The config.yaml that detectron2 saved in a run's folder, as plain data ({} without one),
    read without constructing anything a YAML tag names; RunRecordError, naming the file, for
    one that is not such a config (invalid YAML, Python tags, not a mapping)."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f.read().decode("utf-8"))
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        raise RunRecordError(
            f"{path}: line {mark.line + 1 if mark else '?'} holds a Python tag "
            f"({(e.problem or '').split(' ')[-1] or 'a tag'}), which a config that "
            "detectron2 saved never does: not read"
        ) from None
    except RecursionError:  # nested deeper than the parser goes
        raise RunRecordError(f"{path}: YAML nested too deep to be a saved config") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise RunRecordError(
            f"{path}: not a saved config ({str(e).splitlines()[0][:120]})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunRecordError(f"{path}: a YAML {type(data).__name__}, not a saved config")
    return data


def _read_record(folder):
    try:
        with open(os.path.join(folder, RESULTS_FILE), "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, OSError, RecursionError):
        return None  # damaged: compare.py names it; a sweep leaves it as it is


def forget_divergence(folder):
    """Before a training starts in ``folder`` (again, e.g. --resume with a lower rate): a record
    of an earlier divergence there no longer describes the run, and is removed."""
    if _diverged_record(_read_record(folder)):
        os.remove(os.path.join(folder, RESULTS_FILE))


def run_state(folder):
    """'done' (results.json written), 'diverged' (its record says the training diverged: a
    result, not retried), 'interrupted' (a checkpoint to resume from, also a finished training
    whose evaluation failed: resuming evaluates it) or 'new'."""
    if os.path.isfile(os.path.join(folder, RESULTS_FILE)):
        record = _read_record(folder)  # a damaged one: 'done' (compare.py names it)
        evaluation_failed = isinstance(record, dict) and record.get("evaluation_error") is not None
        if not evaluation_failed:
            return "diverged" if _diverged_record(record) else "done"
    if last_checkpoint(folder) is not None:  # last_checkpoint, else the newest checkpoint
        return "interrupted"
    return "new"


def read_metrics(folder):
    """The records of <folder>/metrics.json (detectron2's JSONWriter), one per iteration, in
    iteration order. After a resume the file repeats the iterations between the checkpoint and
    the kill, out of order: the last record of each iteration (the resumed run's) is the one
    kept. A line cut by a kill is left out; one that is valid JSON but no record of an iteration
    (null, a list) too, with a warning naming the file."""
    path = os.path.join(folder, "metrics.json")
    by_iteration, strange = {}, 0
    if not os.path.isfile(path):
        return []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            iteration = record.get("iteration") if isinstance(record, dict) else None
            if not isinstance(iteration, int) or isinstance(iteration, bool):
                strange += 1
                continue
            by_iteration[iteration] = record  # a later record replaces an earlier one
    if strange:
        logger.warning(
            f"{path}: {strange} line(s) that are not the record of an iteration "
            "(e.g. null) left out"
        )
    return [by_iteration[i] for i in sorted(by_iteration)]
