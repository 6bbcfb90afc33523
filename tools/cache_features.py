#!/usr/bin/env python
"""Write the feature cache of a config whose backbone is build_cached_trunk_retinanet_fpn_backbone:
the frozen ResNet trunk's features of every image the training and the evaluation will show it
(DATASETS.TRAIN resized as in training, and their horizontal flips where INPUT.RANDOM_FLIP is
horizontal; DATASETS.TEST as in testing), in fp16, into MODEL.FOCALSTAR.FEATURE_CACHE.

    python tools/cache_features.py --config-file configs/proxy80_flstar.yaml

Progress and ETA are logged; the cache is written into a temporary folder and renamed into place
when complete, so a killed run leaves none (run it again). An existing cache made for the same
trunk and inputs is kept; one made for others is refused by the training, and replaced here with
--overwrite.
"""

import warnings

# fvcore jit-scripts its losses when detectron2 imports it, which recent torch deprecates loudly
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from d2_focalstar.config import ConfigError
from d2_focalstar.data import register_config_datasets
from d2_focalstar.modeling.cached_trunk import (
    KEYS,
    META,
    FeatureCacheError,
    TrunkFeatureCache,
    input_digest,
    input_settings,
    trunk_fingerprint,
)
from d2_focalstar.run.checkpoint import CheckpointReadError, SafeCheckpointer, UnsafeCheckpointError
from d2_focalstar.run.cli import add_unsafe_config_argument, load_config
from d2_focalstar.run.errors import error_line

logger = logging.getLogger("d2_focalstar.cache_features")


def views(cfg):
    """(dataset dict, flip) of every image the trunk will see: each training image as is and
    flipped (where training flips), each test image as is."""
    flips = [False, True] if cfg.INPUT.RANDOM_FLIP == "horizontal" else [False]
    out = []
    for names, flip_set in ((cfg.DATASETS.TRAIN, flips), (cfg.DATASETS.TEST, [False])):
        for name in names:
            out += [(d, f) for d in DatasetCatalog.get(name) for f in flip_set]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--batch", type=int, default=32, help="images per trunk forward")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a cache made for another trunk or inputs"
    )
    add_unsafe_config_argument(p)
    p.add_argument("opts", nargs="*", help="config KEY VALUE pairs")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch {args.batch}: must be at least 1")
    setup_logger(name="d2_focalstar")
    try:
        cfg = load_config(
            args.config_file,
            list(args.opts) + ["MODEL.DEVICE", "cpu"],
            allow_unsafe=args.unsafe_config,
        )
        folder = cfg.MODEL.FOCALSTAR.FEATURE_CACHE
        if not folder:
            raise ConfigError(
                f"{args.config_file}: MODEL.FOCALSTAR.FEATURE_CACHE is empty: name the "
                "cache folder to write"
            )
        register_config_datasets(cfg)
        model = build_model(cfg).eval()  # refuses a trunk that is not frozen (FeatureCacheError)
        checkpointer = SafeCheckpointer(model)
        checkpointer.load(cfg.MODEL.WEIGHTS)
        trunk = model.backbone.bottom_up
        fingerprint, settings = trunk_fingerprint(trunk), input_settings(cfg)
        if os.path.exists(folder):
            try:
                TrunkFeatureCache(folder).check(fingerprint, settings)
                logger.info(f"{folder} exists for this trunk and these inputs: kept")
                return
            except FeatureCacheError as e:
                if not args.overwrite:
                    raise FeatureCacheError(f"{e} (or rerun with --overwrite)") from None
        write_cache(cfg, model, folder, fingerprint, settings, args.batch)
    except (ConfigError, FeatureCacheError, CheckpointReadError, UnsafeCheckpointError) as e:
        sys.exit(error_line("cache_features.py", e))


def write_cache(cfg, model, folder, fingerprint, settings, batch):
    trunk = model.backbone.bottom_up
    compute = type(trunk).forward.__get__(trunk)  # the trunk itself, not the cache in front of it
    items = views(cfg)
    mapper = DatasetMapper(cfg, is_train=False)  # the test resize; the proxy trains at that size
    with torch.no_grad():
        shapes = {
            k: tuple(v.shape[1:])
            for k, v in compute(model.preprocess_image([mapper(dict(items[0][0]))]).tensor).items()
        }
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".cache-", dir=parent)
    try:
        arrays = {
            k: np.lib.format.open_memmap(
                os.path.join(tmp, f"{k}.npy"), mode="w+", dtype=np.float16, shape=(len(items),) + s
            )
            for k, s in shapes.items()
        }
        keys = np.zeros((len(items), 16), np.uint8)
        start = time.time()
        for b in range(0, len(items), batch):
            chunk = items[b : b + batch]
            inputs = []
            for d, flip in chunk:
                mapped = mapper(dict(d))
                if flip:
                    mapped["image"] = torch.flip(mapped["image"], dims=[2])
                inputs.append(mapped)
            x = model.preprocess_image(inputs).tensor
            with torch.no_grad():
                features = compute(x)
            for j in range(len(chunk)):
                keys[b + j] = np.frombuffer(input_digest(x[j]), np.uint8)
            for k, v in features.items():
                arrays[k][b : b + len(chunk)] = v.numpy().astype(np.float16)
            done = b + len(chunk)
            if (b // batch) % 20 == 0 or done == len(items):
                eta = (time.time() - start) / done * (len(items) - done)
                logger.info(f"cached {done}/{len(items)} images, eta {eta / 60:.1f} min")
        for a in arrays.values():
            a.flush()
        np.save(os.path.join(tmp, KEYS), keys)
        meta = {
            "fingerprint": fingerprint,
            "weights": cfg.MODEL.WEIGHTS,
            "settings": settings,
            "features": {k: list(s) for k, s in shapes.items()},
            "dtype": "float16",
            "count": len(items),
            "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        }
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2**30
    logger.info(f"wrote {folder}: {len(items)} images, {size:.2f} GiB, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
