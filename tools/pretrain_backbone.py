#!/usr/bin/env python
"""Pretrain a detection config's ResNet on fractals (no real image, no download), for MODEL.WEIGHTS.

    python tools/pretrain_backbone.py --config-file configs/proxy_flstar.yaml \\
        --out output/pretrain_fractal_r18

writes <out>/backbone.pth (detectron2 names: backbone.bottom_up.*, BN statistics included, loaded
by the project's safe checkpointer) and <out>/pretrain.json (settings, time, held-out mAP).
Progress and ETA are logged every 20 iterations; a run that is killed resumes from its last
state (every --checkpoint-every iterations) when the same command runs again; a finished one
with the same settings is reused at once. ResNet-50 works too: a config with RESNETS.DEPTH 50.

    python tools/pretrain_backbone.py \\
        --from-detector output/pretrain_shapes_detector/model_final.pth \\
        --out output/pretrain_shapes_r18

takes the ResNet of a trained detector instead (pretraining by detection on other synthetic data).
"""

import argparse
import sys

from detectron2.utils.logger import setup_logger

from d2_focalstar.config import ConfigError
from d2_focalstar.run.cli import add_unsafe_config_argument, load_config
from d2_focalstar.run.errors import error_line
from d2_focalstar.study.pretrain import FractalSpec, PretrainSettings, pretrain


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", help="the detection config whose backbone to pretrain")
    p.add_argument(
        "--from-detector",
        metavar="CHECKPOINT",
        help="instead of fractals: take the ResNet of a trained detector's checkpoint",
    )
    p.add_argument("--out", required=True, help="output folder")
    d, f = PretrainSettings(), FractalSpec()
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--classes", type=int, default=f.num_classes, help="fractal categories")
    p.add_argument("--image-size", type=int, default=f.image_size)
    p.add_argument(
        "--object-sizes",
        type=int,
        nargs=2,
        default=[f.min_size, f.max_size],
        metavar=("MIN", "MAX"),
        help="fractal sizes in pixels (match the detection data's objects at this image size)",
    )
    p.add_argument("--max-objects", type=int, default=f.max_objects)
    p.add_argument("--seed", type=int, default=f.seed)
    p.add_argument(
        "--eval-images", type=int, default=d.eval_images, help="held-out images for the mAP"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="processes rendering fractals beside the training (a GPU wants several)",
    )
    p.add_argument(
        "--device", help="cpu or cuda (default: the config's MODEL.DEVICE, CPU without CUDA)"
    )
    add_unsafe_config_argument(p)
    args = p.parse_args(argv)
    setup_logger(name="d2_focalstar")
    if args.from_detector:
        from d2_focalstar.run.checkpoint import CheckpointReadError, UnsafeCheckpointError
        from d2_focalstar.study.pretrain import extract_backbone

        try:
            extract_backbone(args.from_detector, args.out)
        except (OSError, ValueError, CheckpointReadError, UnsafeCheckpointError) as e:
            sys.exit(error_line("pretrain_backbone.py", e))
        return
    if not args.config_file:
        p.error("--config-file is required (or --from-detector CHECKPOINT)")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: must be 0 or more")
    for name in (
        "iterations",
        "batch_size",
        "checkpoint_every",
        "classes",
        "image_size",
        "max_objects",
        "eval_images",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not 1 <= args.object_sizes[0] <= args.object_sizes[1] <= args.image_size:
        p.error(f"--object-sizes {args.object_sizes}: need 1 <= MIN <= MAX <= --image-size")
    try:
        cfg = load_config(
            args.config_file,
            ["MODEL.WEIGHTS", ""] + (["MODEL.DEVICE", args.device] if args.device else []),
            allow_unsafe=args.unsafe_config,
        )
    except ConfigError as e:
        sys.exit(error_line("pretrain_backbone.py", e))
    spec = FractalSpec(
        num_classes=args.classes,
        image_size=args.image_size,
        max_objects=args.max_objects,
        min_size=args.object_sizes[0],
        max_size=args.object_sizes[1],
        seed=args.seed,
    )
    settings = PretrainSettings(
        fractals=spec,
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_every=args.checkpoint_every,
        workers=args.workers,
        eval_images=args.eval_images,
    )
    pretrain(cfg, settings, args.out)


if __name__ == "__main__":
    main()
