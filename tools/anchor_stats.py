#!/usr/bin/env python
"""How rare foreground anchors are, and the imbalance as a sigmoid loss counts it: per image, the
anchors a config's RetinaNet places, how many its matcher labels foreground, ignored and
background, and the binary negatives per positive that FL and CE sum over (each anchor is K binary
problems: (background x K + foreground x (K - 1)) / foreground), on the first --images images of
DATASETS.TRAIN (at the test-time size), or --coco-like: synthetic boxes with COCO's statistics
(7.3 objects per 640x480 image, 41% small / 34% medium / 24% large by area, as reported for COCO
2017 train) at the 1x configs' 800-pixel scale: an estimate of COCO's imbalance, not a measurement
on COCO.

    python tools/anchor_stats.py --config-file configs/proxy_flstar.yaml
    python tools/anchor_stats.py --config-file configs/retinanet_R50_fl_1x.yaml --coco-like
"""

import argparse
import json
import sys

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

from d2_focalstar.config import ConfigError
from d2_focalstar.run.cli import add_unsafe_config_argument, load_config
from d2_focalstar.run.errors import error_line


def coco_like(num_images, seed=0):
    """(height, width, boxes XYXY) per image: COCO-like counts and size mix, scaled to 800 px."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_images):
        h, w, scale = 480, 640, 800 / 480
        n = max(1, rng.poisson(7.3))
        kind = rng.choice(3, size=n, p=[0.41, 0.34, 0.25])
        lo, hi = np.array([8, 32, 96])[kind], np.array([32, 96, 400])[kind]
        side = np.exp(rng.uniform(np.log(lo), np.log(hi)))
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=n))
        bw, bh = (
            np.minimum(side * np.sqrt(aspect), w - 1),
            np.minimum(side / np.sqrt(aspect), h - 1),
        )
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        out.append(
            (round(h * scale), round(w * scale), np.stack([x, y, x + bw, y + bh], 1) * scale)
        )
    return out


def dataset_images(cfg, num_images):
    import detectron2.data.transforms as T
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BoxMode

    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    out = []
    for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:num_images]:
        h, w = d["height"], d["width"]
        nh, nw = (
            resize.get_transform(np.zeros((h, w, 1), np.uint8))
            .apply_image(np.zeros((h, w, 1), np.uint8))
            .shape[:2]
        )
        boxes = np.array(
            [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in d["annotations"]
                if not a.get("iscrowd", 0)
            ]
        ).reshape(-1, 4) * [nw / w, nh / h, nw / w, nh / h]
        out.append((nh, nw, boxes))
    return out


def anchor_counts(model, images):
    """Per image: (anchors, foreground, ignored) under the model's anchor generator and matcher."""
    rows = []
    with torch.no_grad():
        for h, w, boxes in images:
            div = max(model.backbone.size_divisibility, 1)  # padded as detectron2's ImageList pads
            x = torch.zeros(1, 3, -(-h // div) * div, -(-w // div) * div)
            features = model.backbone(x)
            anchors = model.anchor_generator([features[f] for f in model.head_in_features])
            inst = Instances(
                (h, w),
                gt_boxes=Boxes(torch.as_tensor(boxes, dtype=torch.float32)),
                gt_classes=torch.zeros(len(boxes), dtype=torch.int64),
            )
            labels = model.label_anchors(anchors, [inst])[0][0]
            rows.append(
                (
                    len(labels),
                    int(((labels >= 0) & (labels < model.num_classes)).sum()),
                    int((labels < 0).sum()),
                )
            )
    return np.array(rows, dtype=np.float64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--coco-like", action="store_true")
    add_unsafe_config_argument(p)
    p.add_argument("opts", nargs="*")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images {args.images}: must be at least 1")
    try:
        # random weights, the trunk run (its features only give the anchors their places)
        cfg = load_config(
            args.config_file,
            list(args.opts)
            + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.FOCALSTAR.FEATURE_CACHE", ""],
            allow_unsafe=args.unsafe_config,
        )
    except ConfigError as e:
        sys.exit(error_line("anchor_stats.py", e))
    from detectron2.modeling import build_model

    model = build_model(cfg).eval()
    images = coco_like(args.images) if args.coco_like else dataset_images(cfg, args.images)
    counts = anchor_counts(model, images)
    anchors, fg, ignored = counts.mean(axis=0)
    objects = float(np.mean([len(b) for _, _, b in images]))
    background = anchors - fg - ignored
    k = model.num_classes
    record = dict(
        config=args.config_file,
        source="coco-like synthetic boxes" if args.coco_like else cfg.DATASETS.TRAIN[0],
        images=len(images),
        objects_per_image=objects,
        anchors_per_image=anchors,
        foreground_per_image=fg,
        ignored_per_image=ignored,
        foreground_fraction=fg / anchors,
        background_per_foreground=background / max(fg, 1e-9),
        num_classes=k,
        # what a sigmoid loss sums: K binary problems per anchor, normalised by the positives
        binary_negatives_per_positive=(background * k + fg * (k - 1)) / max(fg, 1e-9),
    )
    print(
        "| source | images | objects / image | anchors / image | foreground / image | "
        "foreground fraction "
        "| background per foreground | classes K | binary negatives per positive |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {record['source']} | {len(images)} | {objects:.2f} | {anchors:.0f} | {fg:.1f} | "
        f"{100 * record['foreground_fraction']:.3f}% | "
        f"{record['background_per_foreground']:.0f} | {k} | "
        f"{record['binary_negatives_per_positive']:,.0f} |"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
