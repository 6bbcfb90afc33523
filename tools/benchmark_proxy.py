#!/usr/bin/env python
"""The cost of one training iteration of the COCO-imbalance proxy (configs/proxy80_flstar.yaml)
under each speed lever, side by side in one process, on the machine it runs on. Prints a Markdown
table (seconds per iteration, speed-up over the first row, minutes for one run of the config's
MAX_ITER, hours for one setting x 5 seeds) and writes it as JSON.

    python tools/benchmark_proxy.py --out docs/benchmarks/benchmark_proxy_cpu.json
    python tools/benchmark_proxy.py --iters 1 --rounds 2 --warmup 1 --images 32 \\
        --out output/bench_proxy_small.json   # quick

Every lever trains the same detector on the same data with the same loss; none changes what a
comparison of losses compares. The levers are timed round robin (each a few iterations per round),
so that a busy spell of a shared machine falls on all of them; the median round is reported. The
weights are random (the cost does not depend on them); the trunk is initialised from one seed, so
that the cache made here belongs to the trunk that reads it.
The levers, each row adding to the one before unless it says otherwise:

1. the round-2 proxy's set-up: the whole ResNet trains (quickstart: FREEZE_AT 0, BN), 2 threads;
2. the trunk frozen (FREEZE_AT 5, FrozenBN): no trunk backward, the trunk still runs forward;
3. the trunk's features read from the cache (tools/cache_features.py; made here for --images
   images of the training set and their flips): the trunk does not run;
4. one thread per run: two runs side by side on the 2 cores finish two results in the time of
   one row (the throughput column counts it);
5. the loss compiled by torch.compile (MODEL.FOCALSTAR.COMPILE_LOSS; compiled in the warm-up).
"""

import warnings

# fvcore jit-scripts its losses when detectron2 imports it, which recent torch deprecates loudly
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import argparse
import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from d2_focalstar.config import ConfigError
from d2_focalstar.data import CheckedDatasetMapper
from d2_focalstar.fileio import write_json
from d2_focalstar.modeling.cached_trunk import input_settings, trunk_fingerprint
from d2_focalstar.run.cli import add_unsafe_config_argument, load_config
from d2_focalstar.run.errors import error_line

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache_features import write_cache  # noqa: E402  (a sibling tool: the cache is made as it makes it)

LEVERS = (
    (
        "round-2 set-up: whole ResNet trains, 2 threads",
        [
            "MODEL.BACKBONE.FREEZE_AT",
            "0",
            "MODEL.RESNETS.NORM",
            "BN",
            "MODEL.BACKBONE.NAME",
            "build_retinanet_resnet_fpn_backbone",
        ],
        2,
        False,
    ),
    ("+ trunk frozen (FREEZE_AT 5, FrozenBN)", [], 2, False),
    ("+ trunk features from the cache", [], 2, True),
    ("+ 1 thread per run (two runs side by side)", [], 1, True),
    (
        "+ the loss compiled (MODEL.FOCALSTAR.COMPILE_LOSS)",
        ["MODEL.FOCALSTAR.COMPILE_LOSS", "True"],
        1,
        True,
    ),
)


def subset(name, count):
    """The first ``count`` images of dataset ``name``, registered as a dataset of their own."""
    small = f"{name}_first{count}"
    if small not in DatasetCatalog.list():
        DatasetCatalog.register(small, lambda: DatasetCatalog.get(name)[:count])
        MetadataCatalog.get(small).set(
            **{
                k: v
                for k, v in MetadataCatalog.get(name).as_dict().items()
                if k not in ("name", "json_file")
            }
        )
    return small


class Lever:
    """One lever's detector, optimizer and loader, stepped a few iterations at a time."""

    def __init__(self, cfg, threads):
        self.threads = threads
        torch.manual_seed(0)  # the same trunk in every row, and the one the cache was made with
        self.model = build_model(cfg)
        self.model.train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.loader = iter(
            build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))
        )
        self.seconds = []

    def step(self, iters, timed=True):
        torch.set_num_threads(self.threads)
        batches = [next(self.loader) for _ in range(iters)]  # loading is the workers' and not timed
        start = time.perf_counter()
        with EventStorage():  # the detector logs its anchor counts there
            for batch in batches:
                losses = self.model(batch)
                self.optimizer.zero_grad()
                sum(losses.values()).backward()
                self.optimizer.step()
        if timed:
            self.seconds.append((time.perf_counter() - start) / iters)

    def cache_counts(self):
        forward = self.model.backbone.bottom_up.forward
        return getattr(forward, "hits", None), getattr(forward, "misses", None)


def main(argv=None):
    try:
        benchmark(argv)
    except ConfigError as e:  # a bad config or key: one line, as train_net.py gives it
        sys.exit(error_line("benchmark_proxy.py", e))


def benchmark(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="configs/proxy80_flstar.yaml")
    p.add_argument("--iters", type=int, default=4, help="timed iterations per lever and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; every lever is timed in each")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument(
        "--images", type=int, default=512, help="training images the levers draw from (and cache)"
    )
    p.add_argument("--out", default="output/benchmark_proxy.json")
    add_unsafe_config_argument(p)
    args = p.parse_args(argv)
    for flag in ("iters", "rounds", "images"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    base = load_config(
        args.config_file,
        [
            "MODEL.WEIGHTS",
            "",
            "MODEL.DEVICE",
            "cpu",
            "MODEL.FOCALSTAR.FEATURE_CACHE",
            "",
            "DATASETS.TEST",
            "()",
        ],
        allow_unsafe=args.unsafe_config,
    )
    train = subset(base.DATASETS.TRAIN[0], args.images)
    max_iter, batch = base.SOLVER.MAX_ITER, base.SOLVER.IMS_PER_BATCH
    cache = tempfile.mkdtemp(prefix="proxy-cache-")
    rows, levers = [], []
    try:
        for name, opts, threads, cached in LEVERS:
            cfg = load_config(
                args.config_file,
                [
                    "MODEL.WEIGHTS",
                    "",
                    "MODEL.DEVICE",
                    "cpu",
                    "DATASETS.TEST",
                    "()",
                    "DATASETS.TRAIN",
                    f"('{train}',)",
                    "MODEL.FOCALSTAR.FEATURE_CACHE",
                    os.path.join(cache, "c") if cached else "",
                ]
                + opts,
                allow_unsafe=args.unsafe_config,
            )
            if cached and not os.path.exists(os.path.join(cache, "c")):
                plain = cfg.clone()
                plain.defrost()
                plain.MODEL.FOCALSTAR.FEATURE_CACHE = ""
                torch.manual_seed(0)
                model = build_model(plain).eval()
                trunk = model.backbone.bottom_up
                write_cache(
                    cfg,
                    model,
                    os.path.join(cache, "c"),
                    trunk_fingerprint(trunk),
                    input_settings(cfg),
                    32,
                )
            lever = Lever(cfg, threads)
            lever.step(args.warmup, timed=False)
            levers.append((name, lever))
        # round robin: every lever timed in every round, so that a busy spell of the machine
        # falls on all of them; the median round is reported
        for r in range(args.rounds):
            for name, lever in levers:
                lever.step(args.iters)
            print(
                f"  round {r + 1}/{args.rounds}: "
                + ", ".join(f"{lever.seconds[-1]:.2f}" for _, lever in levers)
                + " s/iteration",
                file=sys.stderr,
                flush=True,
            )
        for name, lever in levers:
            hits, misses = lever.cache_counts()
            rows.append(
                dict(
                    lever=name,
                    threads=lever.threads,
                    seconds_per_iter=float(np.median(lever.seconds)),
                    rounds=lever.seconds,
                    cache_hits=hits,
                    cache_misses=misses,
                )
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    first = rows[0]["seconds_per_iter"]
    for r in rows:
        runs_at_once = 2 // r["threads"]  # runs that share the 2 cores
        r["speedup"] = first / r["seconds_per_iter"]
        r["throughput_speedup"] = r["speedup"] * runs_at_once
        r["minutes_per_run"] = r["seconds_per_iter"] * max_iter / 60
        r["hours_for_5_seeds"] = 5 * r["minutes_per_run"] / 60 / runs_at_once
    meta = dict(
        date=datetime.date.today().isoformat(),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        config=args.config_file,
        max_iter=max_iter,
        ims_per_batch=batch,
        iters=args.iters,
        rounds=args.rounds,
        warmup=args.warmup,
        images=args.images,
    )
    print(f"\n{meta}\n")
    print(
        f"| lever | threads | s / iteration (batch {batch}) | speed-up | "
        "throughput speed-up (2 cores) | "
        f"minutes per run ({max_iter} it) | hours for 5 seeds | cache hits / misses |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cache_cell = "" if r["cache_hits"] is None else f"{r['cache_hits']} / {r['cache_misses']}"
        print(
            f"| {r['lever']} | {r['threads']} | {r['seconds_per_iter']:.3f} | "
            f"{r['speedup']:.2f}x | {r['throughput_speedup']:.2f}x | {r['minutes_per_run']:.0f} | "
            f"{r['hours_for_5_seeds']:.1f} | {cache_cell} |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out, {"meta": meta, "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
