"""
A speed lever for CPU-scale studies: RetinaNet's ResNet-FPN backbone whose frozen ResNet trunk
is not run for images whose trunk features are in a cache file (tools/cache_features.py writes
it). The FPN and the heads train as usual; the losses under study are computed as everywhere
else. Only a trunk that training cannot change may be cached: every weight frozen
(MODEL.BACKBONE.FREEZE_AT 5) and FrozenBN; the config check says so otherwise.

A cache is a folder: ``meta.json`` (the trunk's fingerprint, the settings that decide its input,
the features' names and shapes), ``keys.npy`` (a BLAKE2b digest of each cached input, the
normalised image tensor the trunk receives) and one ``<feature>.npy`` per feature (fp16,
memory-mapped: several trainings share the pages). An input is found by its digest, so a flipped
image is its own entry and nothing depends on file names. The trunk's weights and the input
settings are compared with the cache's before the first lookup: a cache made for another
backbone, weights or input size is refused in one line naming the file and what differs, never
used. An image missing from the cache is computed by the trunk (and counted in the log).
"""

import hashlib
import json
import logging
import os

import numpy as np
import torch
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_retinanet_resnet_fpn_backbone

__all__ = [
    "FeatureCacheError",
    "TrunkFeatureCache",
    "trunk_fingerprint",
    "input_settings",
    "input_digest",
    "build_cached_trunk_retinanet_fpn_backbone",
]

logger = logging.getLogger(__name__)

META = "meta.json"
KEYS = "keys.npy"


class FeatureCacheError(ValueError):
    """A feature cache that does not belong to this trunk or config, or is not a cache at all."""


def trunk_fingerprint(trunk):
    """SHA-256 of the trunk's weights and buffers (names, shapes, values): what its features
    are a function of, besides the input."""
    h = hashlib.sha256()
    for name, tensor in sorted(trunk.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def input_settings(cfg):
    """The config values that decide what a cached image looks like to the trunk."""
    i = cfg.INPUT
    return {
        "depth": cfg.MODEL.RESNETS.DEPTH,
        "norm": cfg.MODEL.RESNETS.NORM,
        "out_features": list(cfg.MODEL.RESNETS.OUT_FEATURES),
        "format": i.FORMAT,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "min_size_train": list(i.MIN_SIZE_TRAIN),
        "max_size_train": i.MAX_SIZE_TRAIN,
        "min_size_test": i.MIN_SIZE_TEST,
        "max_size_test": i.MAX_SIZE_TEST,
        "random_flip": i.RANDOM_FLIP,
    }


def input_digest(image):
    """The key of one normalised image tensor (C, H, W): 16 bytes of BLAKE2b over its values."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.blake2b(data.tobytes() + str(data.shape).encode(), digest_size=16).digest()


class TrunkFeatureCache:
    """Read side of a cache folder: ``lookup(key)`` -> {feature: fp32 tensor (C, H, W)} or None."""

    def __init__(self, folder):
        self.folder = folder
        path = os.path.join(folder, META)
        try:
            with open(path) as f:
                self.meta = json.load(f)
            keys = np.load(os.path.join(folder, KEYS))
            self.features = {
                name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
                for name in self.meta["features"]
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FeatureCacheError(
                f"MODEL.FOCALSTAR.FEATURE_CACHE={folder!r}: not a feature cache "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); make it with "
                "tools/cache_features.py"
            ) from None
        self.index = {bytes(k): i for i, k in enumerate(keys)}

    def check(self, fingerprint, settings):
        """FeatureCacheError naming the cache and what differs, unless it was made by a trunk with
        these weights for inputs made with these settings."""
        where = os.path.join(self.folder, META)
        if self.meta.get("fingerprint") != fingerprint:
            raise FeatureCacheError(
                f"{where}: made by another trunk (weights {self.meta.get('weights')!r}, "
                "fingerprint "
                f"{str(self.meta.get('fingerprint'))[:12]}), not this model's (fingerprint "
                f"{fingerprint[:12]}): make the cache again with tools/cache_features.py"
            )
        differ = [
            f"{k}: cache {self.meta.get('settings', {}).get(k)!r}, config {v!r}"
            for k, v in settings.items()
            if self.meta.get("settings", {}).get(k) != v
        ]
        if differ:
            raise FeatureCacheError(
                f"{where}: made for other inputs ({'; '.join(differ)}): make the "
                "cache again with tools/cache_features.py"
            )

    def lookup(self, key):
        i = self.index.get(key)
        if i is None:
            return None
        return {
            name: torch.from_numpy(np.asarray(array[i], dtype=np.float32))
            for name, array in self.features.items()
        }


class _CachedForward:
    """Stands in for the trunk's forward (an attribute of the module instance: its weights and
    their names stay as they are, so checkpoints load unchanged)."""

    def __init__(self, trunk, folder, settings):
        self.trunk, self.compute = trunk, trunk.forward
        self.folder, self.settings = folder, settings
        self.cache, self.hits, self.misses = None, 0, 0

    def __call__(self, x):
        if self.cache is None:  # the first call: the weights are loaded by now
            self.cache = TrunkFeatureCache(self.folder)
            self.cache.check(trunk_fingerprint(self.trunk), self.settings)
        found = [self.cache.lookup(input_digest(image)) for image in x]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            with torch.no_grad():
                computed = self.compute(x[missing])
            for j, i in enumerate(missing):
                found[i] = {name: v[j] for name, v in computed.items()}
        self.hits += len(x) - len(missing)
        for _ in missing:
            self.misses += 1
            if self.misses in (1, 10, 100, 1000, 10000):
                logger.warning(
                    f"Feature cache {self.folder}: {self.misses} image(s) not in it so far "
                    f"(of {self.hits + self.misses}), computed by the trunk"
                )
        return {name: torch.stack([f[name] for f in found]).to(x.device) for name in found[0]}


@BACKBONE_REGISTRY.register()
def build_cached_trunk_retinanet_fpn_backbone(cfg, input_shape):
    """detectron2's ``build_retinanet_resnet_fpn_backbone``, its ResNet trunk's features read from
    MODEL.FOCALSTAR.FEATURE_CACHE (without one, the trunk runs: the same model)."""
    backbone = build_retinanet_resnet_fpn_backbone(cfg, input_shape)
    folder = cfg.MODEL.FOCALSTAR.FEATURE_CACHE
    if folder:
        trunk = backbone.bottom_up
        trainable = [n for n, p in trunk.named_parameters() if p.requires_grad]
        if trainable or cfg.MODEL.RESNETS.NORM != "FrozenBN":
            raise FeatureCacheError(
                f"MODEL.FOCALSTAR.FEATURE_CACHE={folder!r} needs a trunk that training cannot "
                f"change: MODEL.BACKBONE.FREEZE_AT 5 (is {cfg.MODEL.BACKBONE.FREEZE_AT}) and "
                f"MODEL.RESNETS.NORM FrozenBN (is {cfg.MODEL.RESNETS.NORM!r})"
            )
        trunk.forward = _CachedForward(trunk, folder, input_settings(cfg))
    return backbone
