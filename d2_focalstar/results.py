"""
results.json: the record of a finished run (final metrics and the settings that identify it),
written by train_net.py and read by the sweep (is a run finished?) and the comparison.
"""
import json
import logging
import os

import yaml

from .config import config_value, loss_config_node
from .fileio import write_json
from .losses import ALPHA, LOSS_TYPES

__all__ = ["RESULTS_FILE", "write_results", "load_run", "run_state", "loss_params"]

logger = logging.getLogger(__name__)

#: Where train_net.py leaves the final metrics of a run.
RESULTS_FILE = "results.json"


def loss_params(cfg):
    """(loss type, alpha, {parameter: value}) that the config gives its detector's loss."""
    head = loss_config_node(cfg) or "MODEL.RETINANET"
    entry = LOSS_TYPES[cfg.MODEL.FOCALSTAR.LOSS_TYPE.upper()]
    params = {p.name: config_value(cfg, p.config_key(head)) for p in entry.params}
    return entry.name, config_value(cfg, ALPHA.config_key(head)), params


def write_results(cfg, results, iteration):
    """Write the final metrics and the settings that identify the run to OUTPUT_DIR/results.json
    (``iteration`` None: an evaluation only)."""
    name, alpha, params = loss_params(cfg)
    record = {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "loss_type": name,
        "params": params,
        # older readers: the type's gamma (None without one) and FL*'s cap
        "gamma": params.get("gamma"),
        "max_factor": cfg.MODEL.FOCALSTAR.MAX_FACTOR,
        "alpha": alpha,
        "seed": cfg.SEED,
        "weights": cfg.MODEL.WEIGHTS,
        "iteration": iteration,
        "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        "solver": {"base_lr": cfg.SOLVER.BASE_LR, "max_iter": cfg.SOLVER.MAX_ITER,
                   "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "amp": cfg.SOLVER.AMP.ENABLED},
        "results": {task: dict(metrics) for task, metrics in results.items()},
    }
    path = os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    write_json(path, record)
    logger.info(f"Final metrics written to {path}")


def load_run(folder):
    """The record train_net.py wrote to <folder>/results.json, with 'folder' added, and 'params'
    filled in for records written before it was (from 'gamma' and 'max_factor')."""
    path = os.path.join(folder, RESULTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {RESULTS_FILE} (an unfinished run, or not a "
                                "train_net.py output folder)")
    with open(path) as f:
        record = json.load(f)
    record["folder"] = folder
    if "params" not in record:
        entry = LOSS_TYPES.get(record["loss_type"])
        names = [p.name for p in entry.params] if entry else []
        record["params"] = {n: record[n] for n in names if n in record}
    if "solver" not in record:  # written before results.json had it: the run's config.yaml
        config = os.path.join(folder, "config.yaml")
        if os.path.isfile(config):
            with open(config) as f:
                solver = (yaml.safe_load(f) or {}).get("SOLVER", {})
            record["solver"] = {k.lower(): solver[k] for k in ("BASE_LR", "MAX_ITER", "IMS_PER_BATCH")
                                if k in solver}
    return record


def run_state(folder):
    """'done' (results.json written), 'interrupted' (a checkpoint to resume from) or 'new'."""
    if os.path.isfile(os.path.join(folder, RESULTS_FILE)):
        return "done"
    if os.path.isfile(os.path.join(folder, "last_checkpoint")):
        return "interrupted"
    return "new"
