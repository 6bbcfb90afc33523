"""
Backbone pretraining without real images: formula-driven fractals (FractalDB, Kataoka et al.,
ACCV 2020; several fractals per image on textured backgrounds, multi-label, rendered on the fly,
as Anderson & Farrell, WACV 2022), for a machine that cannot download ImageNet weights.

- :class:`FractalSet`: ``num_classes`` random iterated function systems (IFS), each a category;
  image i shows 1 to ``max_objects`` fractals of random categories, sizes drawn from the detection
  data's object sizes, on a textured background. Everything is a function of (seed, i):
  deterministic, nothing stored.
- :func:`pretrain`: detectron2's ResNet (built from a detection config, so the weights fit it)
  with a global-pool + linear head, trained as a multi-label classifier (sigmoid BCE). It logs
  progress and ETA, saves its state atomically every ``checkpoint_every`` iterations and resumes
  from it after a kill, and writes the backbone as a detectron2 checkpoint
  (``{"model": {"backbone.bottom_up.<name>": tensor}}``) that ``MODEL.WEIGHTS`` loads through the
  project's safe loader, BN statistics included (FrozenBN reads them), plus a JSON record of the
  settings, the time and the held-out mAP. A finished output with the same settings is reused.

``tools/pretrain_backbone.py`` is the command.
"""

import datetime
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fileio import atomic_write, write_json

__all__ = [
    "FractalSpec",
    "FractalSet",
    "random_ifs",
    "render_ifs",
    "PretrainSettings",
    "pretrain",
    "backbone_state_dict",
    "build_classifier",
    "extract_backbone",
]

logger = logging.getLogger(__name__)


# ---- fractals -----------------------------------------------------------------------------------


def random_ifs(rng, max_tries=1000):
    """An IFS of 2 to 4 contractive affine maps [a b; c d] x + [e f] with their selection
    probabilities (proportional to |det|), whose fractal is neither a point nor a blur: the
    singular values' sum over maps in FractalDB's well-formed range ("sigma-factor", Anderson &
    Farrell: 0.5 * (5 + n) <= sigma <= 0.5 * (6 + n) for n maps)."""
    for _ in range(max_tries):
        n = int(rng.integers(2, 5))
        maps = rng.uniform(-1, 1, size=(n, 6))
        sigma = sum(np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False).sum() for m in maps)
        low, high = 0.5 * (5 + n), 0.5 * (6 + n)
        if sigma <= 0:
            continue
        # rescale the linear parts so that sigma falls in the range, as Anderson & Farrell sample it
        target = rng.uniform(low, high)
        maps[:, :4] *= target / sigma
        svals = np.array([np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False) for m in maps])
        if (svals.max(axis=1) < 1).all():  # every map contractive: the chaos game converges
            dets = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2])
            return maps, (dets + 1e-3) / (dets + 1e-3).sum()
    raise RuntimeError("no well-formed IFS found")


def render_ifs(maps, probs, rng, size, points=6000, chains=200):
    """A ``size`` x ``size`` float image of the IFS's attractor, each pixel the log-density of the
    chaos game's visits (0 where none, 1 at the densest): the chaos game run as ``chains``
    parallel chains of ``points // chains`` steps (after a burn-in), scaled to fit the square.
    The density, not only the outline, is what tells one IFS from another at small sizes."""
    steps = points // chains
    xy = rng.uniform(-1, 1, size=(chains, 2))
    out = []
    for step in range(steps + 10):
        k = rng.choice(len(maps), size=chains, p=probs)
        m = maps[k]
        xy = np.stack(
            [
                m[:, 0] * xy[:, 0] + m[:, 1] * xy[:, 1] + m[:, 4],
                m[:, 2] * xy[:, 0] + m[:, 3] * xy[:, 1] + m[:, 5],
            ],
            axis=1,
        )
        if step >= 10:  # burn-in: the chains reach the attractor
            out.append(xy)
    pts = np.concatenate(out)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    scale = (size - 1) / max(float((hi - lo).max()), 1e-9)
    ij = ((pts - lo) * scale).astype(np.int64).clip(0, size - 1)
    counts = np.bincount(ij[:, 1] * size + ij[:, 0], minlength=size * size).reshape(size, size)
    return np.log1p(counts) / np.log1p(counts.max())


@dataclass(frozen=True)
class FractalSpec:
    # defaults: what a CPU can learn in ~1 hour (docs/RESULTS.md): 64 categories of up to 4
    # fractals on 96-pixel images stayed at chance after 420 iterations of 64 images
    num_classes: int = 16  # fractal categories (IFS codes)
    image_size: int = 64  # square images, pixels
    max_objects: int = 3  # fractals per image: 1 to this many
    min_size: int = 12  # fractal size range, pixels: the detection data's objects
    max_size: int = 36  # (the shapes datasets' 12-36 px)
    seed: int = 0


class FractalSet:
    """The pretraining images: ``__getitem__(i)`` -> (BGR uint8 image, multi-hot float target)."""

    def __init__(self, spec: FractalSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        self.codes = [random_ifs(rng) for _ in range(spec.num_classes)]
        # each category its own hue range, so that colour alone does not give it away: a
        # fractal's colour is random, and its shape is the category

    def _background(self, rng):
        s = self.spec.image_size
        # texture: smooth colour field plus noise at two scales, and a few random strokes
        coarse = rng.integers(0, 256, size=(3, 3, 3)).astype(np.float32)
        img = cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC)
        fine = cv2.resize(rng.normal(0, 15, size=(s // 4, s // 4, 3)).astype(np.float32), (s, s))
        img = img + fine + rng.normal(0, 8, size=(s, s, 3)).astype(np.float32)
        img = np.clip(img, 0, 255).astype(np.uint8)
        for _ in range(int(rng.integers(0, 6))):
            p, q = rng.integers(0, s, size=2), rng.integers(0, s, size=2)
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            cv2.line(img, tuple(map(int, p)), tuple(map(int, q)), color, 1, cv2.LINE_AA)
        return img

    def __getitem__(self, index):
        spec = self.spec
        rng = np.random.default_rng([spec.seed, 1, int(index)])
        img = self._background(rng)
        target = np.zeros(spec.num_classes, np.float32)
        for _ in range(int(rng.integers(1, spec.max_objects + 1))):
            k = int(rng.integers(spec.num_classes))
            size = int(rng.integers(spec.min_size, spec.max_size + 1))
            density = render_ifs(*self.codes[k], rng, size)
            # a random 90-degree turn: the category is the shape, not its orientation
            density = np.rot90(density, int(rng.integers(4)))[..., None]
            x, y = (int(v) for v in rng.integers(0, spec.image_size - size + 1, size=2))
            color = rng.integers(0, 256, size=3).astype(np.float32)
            region = img[y : y + size, x : x + size].astype(np.float32)
            # painted over the background where the chaos game went, the denser the more opaque
            alpha = np.where(density > 0, 0.6 + 0.4 * density, 0.0)
            img[y : y + size, x : x + size] = (region * (1 - alpha) + color * alpha).astype(
                np.uint8
            )
            target[k] = 1.0
        return img, target

    def batch(self, indices):
        images, targets = zip(*(self[i] for i in indices))
        return np.stack(images), np.stack(targets)


# ---- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainSettings:
    fractals: FractalSpec = FractalSpec()
    iterations: int = 1500
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 1e-4
    warmup: int = 100
    checkpoint_every: int = 200
    eval_images: int = 512  # held out: indices above every training index
    workers: int = 0  # processes rendering batches beside the training (0: in it)

    def as_dict(self):
        return asdict(self)


class _Classifier(nn.Module):
    def __init__(self, bottom_up, feature, num_classes):
        super().__init__()
        self.bottom_up = bottom_up
        self.feature = feature
        self.fc = nn.Linear(bottom_up.output_shape()[feature].channels, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.bottom_up(x)[self.feature], 1).flatten(1))


def build_classifier(cfg, num_classes):
    """detectron2's ResNet as the detection config builds it (depth, widths, stride_in_1x1), but
    with trainable BN and nothing frozen, under a linear multi-label head."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    return _Classifier(build_resnet_backbone(cfg, ShapeSpec(channels=3)), "res5", num_classes)


def backbone_state_dict(classifier):
    """The ResNet's weights and BN statistics under the names a detectron2 FPN backbone has
    (``backbone.bottom_up.*``), without BN's batch counters (FrozenBN has none)."""
    return {
        f"backbone.bottom_up.{k}": v.detach().cpu().clone()
        for k, v in classifier.bottom_up.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


class _Batches(torch.utils.data.Dataset):
    """Batch j of the training: the images of indices (start + j) * size ... + size - 1."""

    def __init__(self, data, size, start, stop):
        self.data, self.size, self.start, self.stop = data, size, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, j):
        b = self.start + j
        images, targets = self.data.batch(range(b * self.size, (b + 1) * self.size))
        return torch.from_numpy(images), torch.from_numpy(targets)


def _to_tensor(images, pixel_mean, pixel_std):
    # BGR, as detectron2's input
    x = torch.as_tensor(images).to(pixel_mean.device).permute(0, 3, 1, 2).float()
    return (x - pixel_mean) / pixel_std


def _mean_average_precision(scores, targets):
    """Mean over classes (with a positive) of average precision: sklearn-free, exact."""
    aps = []
    for k in range(targets.shape[1]):
        t = targets[:, k]
        if t.sum() == 0:
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        hits = t[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return 100.0 * float(np.mean(aps))


def _evaluate(model, data, settings, pixel_mean, pixel_std):
    model.eval()
    start = settings.iterations * settings.batch_size  # never a training index
    scores, targets = [], []
    with torch.no_grad():
        for b in range(0, settings.eval_images, settings.batch_size):
            idx = range(start + b, start + min(b + settings.batch_size, settings.eval_images))
            images, target = data.batch(idx)
            scores.append(
                torch.sigmoid(model(_to_tensor(images, pixel_mean, pixel_std))).cpu().numpy()
            )
            targets.append(target)
    model.train()
    targets = np.concatenate(targets)
    return _mean_average_precision(np.concatenate(scores), targets), targets


def pretrain(cfg, settings: PretrainSettings, output_dir, weights_name="backbone.pth"):
    """
    Train the backbone of ``cfg``'s detector on fractals; write ``output_dir/weights_name`` (the
    backbone, for MODEL.WEIGHTS) and ``output_dir/pretrain.json`` (settings, seconds, held-out
    mAP). Resumes from ``output_dir/pretrain_state.pth`` when a run with the same settings was
    cut off; returns the record without training when the output already exists with them.
    """
    os.makedirs(output_dir, exist_ok=True)
    record_path = os.path.join(output_dir, "pretrain.json")
    weights_path = os.path.join(output_dir, weights_name)
    state_path = os.path.join(output_dir, "pretrain_state.pth")
    # what makes the weights (not how fast they are made: workers, device)
    wanted = {
        "settings": {k: v for k, v in settings.as_dict().items() if k != "workers"},
        "depth": cfg.MODEL.RESNETS.DEPTH,
        "res2_out_channels": cfg.MODEL.RESNETS.RES2_OUT_CHANNELS,
    }
    if os.path.isfile(record_path) and os.path.isfile(weights_path):
        with open(record_path) as f:
            record = json.load(f)
        if {k: record.get(k) for k in wanted} == wanted:
            logger.info(f"Pretrained backbone {weights_path} exists with these settings: reused")
            return record
        logger.info(f"{record_path} has other settings: pretraining again")

    torch.manual_seed(settings.fractals.seed)
    data = FractalSet(settings.fractals)
    device = torch.device(cfg.MODEL.DEVICE)
    model = build_classifier(cfg, settings.fractals.num_classes).to(device)
    pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    pixel_std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay
    )
    start_iter, seconds = 0, 0.0
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["wanted"] == json.dumps(wanted, sort_keys=True):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_iter, seconds = int(state["iteration"]), float(state["seconds"])
            logger.info(f"Resuming the pretraining from iteration {start_iter} ({state_path})")

    def lr_at(it):  # linear warm-up, then cosine to 0
        if it < settings.warmup:
            return settings.lr * (it + 1) / settings.warmup
        t = (it - settings.warmup) / max(1, settings.iterations - settings.warmup)
        return settings.lr * 0.5 * (1 + math.cos(math.pi * t))

    def save_state(iteration):
        state = {
            "wanted": json.dumps(wanted, sort_keys=True),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "seconds": seconds + time.perf_counter() - started,
        }
        atomic_write(state_path, lambda f: torch.save(state, f))

    model.train()
    started, window = time.perf_counter(), []
    loader = torch.utils.data.DataLoader(
        _Batches(data, settings.batch_size, start_iter, settings.iterations),
        batch_size=None,
        num_workers=settings.workers,
    )
    tick = time.perf_counter()
    for it, (images, targets) in enumerate(loader, start_iter):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        loss = F.binary_cross_entropy_with_logits(
            model(_to_tensor(images, pixel_mean, pixel_std)), targets.to(device)
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"pretraining loss became {loss.item()} at iteration {it}; "
                f"lower --lr (now {settings.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window = (window + [time.perf_counter() - tick])[-20:]
        tick = time.perf_counter()
        done = it + 1
        if done % 20 == 0 or done == settings.iterations:
            eta = datetime.timedelta(seconds=int(np.mean(window) * (settings.iterations - done)))
            logger.info(
                f"pretrain iter {done}/{settings.iterations}  loss {loss.item():.4f}  "
                f"lr {lr_at(it):.4g}  {np.mean(window):.3f} s/it  eta {eta}"
            )
        if done % settings.checkpoint_every == 0 and done < settings.iterations:
            save_state(done)
    seconds += time.perf_counter() - started

    held_out_map, held_out_targets = _evaluate(model, data, settings, pixel_mean, pixel_std)
    chance = _mean_average_precision(  # random scores on the same held-out targets
        np.random.default_rng(0).random((settings.eval_images, settings.fractals.num_classes)),
        held_out_targets,
    )
    atomic_write(weights_path, lambda f: torch.save({"model": backbone_state_dict(model)}, f))
    record = {
        **wanted,
        "weights": weights_name,
        "seconds": round(seconds, 1),
        "held_out_mAP": round(held_out_map, 2),
        "chance_mAP": round(chance, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }
    write_json(record_path, record)
    if os.path.isfile(state_path):
        os.remove(state_path)
    logger.info(
        f"Pretrained backbone written to {weights_path}: held-out mAP {held_out_map:.1f} "
        f"(chance {chance:.1f}), {seconds / 60:.1f} min"
    )
    return record


def extract_backbone(detector_checkpoint, output_dir, weights_name="backbone.pth"):
    """The ResNet of a trained detector (``backbone.bottom_up.*`` of a train_net.py checkpoint,
    read by the project's safe loader) as a backbone checkpoint for MODEL.WEIGHTS, without its
    FPN and heads: a backbone pretrained by detection on other (synthetic) data, the proxy's
    variant where the fractal pretraining is too weak. Writes ``pretrain.json`` beside it."""
    from ..run.checkpoint import check_checkpoint_file

    loaded = check_checkpoint_file(detector_checkpoint)
    state = loaded.get("model", loaded)
    kept = {
        k: torch.as_tensor(v)
        for k, v in state.items()
        if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")
    }
    if not kept:
        raise ValueError(f"{detector_checkpoint}: no backbone.bottom_up.* weights in it")
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(os.path.join(output_dir, weights_name), lambda f: torch.save({"model": kept}, f))
    record = {
        "source": detector_checkpoint,
        "weights": weights_name,
        "tensors": len(kept),
        "iteration": loaded.get("iteration"),
        "date": datetime.date.today().isoformat(),
    }
    write_json(os.path.join(output_dir, "pretrain.json"), record)
    logger.info(
        f"Backbone of {detector_checkpoint} ({len(kept)} tensors) written to "
        f"{os.path.join(output_dir, weights_name)}"
    )
    return record
