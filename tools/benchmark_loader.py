#!/usr/bin/env python
"""The input pipeline of a COCO run, measured: the 1x config's train loader (detectron2's
build_detection_train_loader with this project's CheckedDatasetMapper, as train_net.py builds it:
JPEG decoding, ResizeShortestEdge to 640-800, flips, box transforms, batching by aspect ratio)
over COCO-like JPEG files made here (640x480, quality 90, boxes from
d2_focalstar/data/synthetic_coco.py; nothing is downloaded), at 1, 2, ... loader workers: images/s
of the loader of one training process, and per worker. From these and the train step measured on
a GPU (docs/BENCHMARKS.md), it projects how many workers a GPU needs not to wait for data and the
hours of a COCO 1x run on 1 and 8 GPUs (steps + data + evaluation), each figure labelled measured
or projected.

    python tools/benchmark_loader.py --workers 1 2 4 8 --out output/benchmark_loader.json
    # GPU: + the train step on the loader's output
    python tools/benchmark_loader.py --workers 4 8 12 --step --out output/loader_step.json
    python tools/benchmark_loader.py --images 8 --workers 0 1 --batches 2 \\
        --out output/bench_loader_small.json   # quick

--step also trains the config's model (random weights, AMP with CUDA) for --step-iters steps fed
by the loader (--step-workers workers): img/s with real data, and the share of each step spent
waiting for it (detectron2's data_time). Run it on the machine whose CPUs feed the GPU.
"""

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from d2_focalstar.config import ConfigError
from d2_focalstar.data.synthetic_coco import synthetic_coco
from d2_focalstar.fileio import write_json
from d2_focalstar.run.cli import add_unsafe_config_argument, load_config
from d2_focalstar.run.errors import error_line

# Measured figures the projection starts from (docs/BENCHMARKS.md, H100, run B, commit 626fba8):
STEP_IMG_S = (
    123.6  # RetinaNetFLStar train step, batch 16 at 800x1333, AMP, synthetic batches on the GPU
)
INFERENCE_IMG_S = 102.3  # its inference, batch 8
COCO_1X_IMAGES = 90000 * 16  # SOLVER.MAX_ITER x SOLVER.IMS_PER_BATCH of the 1x configs
COCO_VAL_IMAGES = 5000


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_coco_like(folder, num_images, size=(640, 480), quality=90, seed=0):
    """COCO-like JPEG files and their COCO JSON in ``folder``: smooth backgrounds with texture, the
    boxes of synthetic_coco filled with colour, fine texture and noise; ~160 KB a file at quality
    90, as COCO's are on average. Returns (json path, image folder, mean file size in KB)."""
    import json

    import cv2

    gt, _ = synthetic_coco(num_images, image_size=size, dets_per_image=0, seed=seed)
    rng = np.random.default_rng(seed)
    w, h = size
    image_root = os.path.join(folder, "images")
    os.makedirs(image_root, exist_ok=True)
    boxes = {}
    for ann in gt["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    sizes = []
    for img in gt["images"]:
        low = rng.uniform(0, 255, size=(rng.integers(6, 24), rng.integers(8, 32), 3)).astype(
            np.uint8
        )
        pixels = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        for x, y, bw, bh in boxes.get(img["id"], []):
            x0, y0, x1, y1 = int(x), int(y), int(x + bw), int(y + bh)
            pixels[y0:y1, x0:x1] = 0.5 * pixels[y0:y1, x0:x1] + 0.5 * rng.uniform(0, 255, size=3)
        # fine texture and sensor noise: what makes a photo's JPEG large (COCO's: ~160 KB on
        # average)
        texture = rng.uniform(-60, 60, size=(h // 2, w // 2, 3)).astype(np.float32)
        pixels += cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR)
        pixels += rng.normal(0, 8, size=pixels.shape)
        path = os.path.join(image_root, img["file_name"])
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)
        sizes.append(os.path.getsize(path))
    json_file = os.path.join(folder, "annotations.json")
    with open(json_file, "w") as f:
        json.dump(gt, f)
    return json_file, image_root, sum(sizes) / len(sizes) / 1024


def loader_config(config_file, json_file, image_root, workers, batch, opts=(), allow_unsafe=False):
    """The config's train loader settings for the COCO-like set: DATASETS.TRAIN is it,
    DATALOADER.NUM_WORKERS ``workers``, SOLVER.IMS_PER_BATCH ``batch`` (one process's batch)."""
    from d2_focalstar.data.catalog import register_coco_json_datasets

    name = "benchmark_coco_like"
    cfg = load_config(
        config_file,
        [
            *opts,
            "DATASETS.COCO_JSON",
            str([[name, json_file, image_root]]),
            "DATASETS.TRAIN",
            f"('{name}',)",
            "DATASETS.TEST",
            "()",
            "DATALOADER.NUM_WORKERS",
            str(workers),
            "SOLVER.IMS_PER_BATCH",
            str(batch),
        ],
        allow_unsafe=allow_unsafe,
    )
    from detectron2.data import DatasetCatalog

    if name not in DatasetCatalog.list():
        register_coco_json_datasets(cfg)
    return cfg


def build_train_loader(cfg):
    """What train_net.py's Trainer.build_train_loader builds (without its fault log)."""
    from detectron2.data import build_detection_train_loader

    from d2_focalstar.data.mapper import CheckedDatasetMapper

    return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))


def time_loader(cfg, batches, warmup):
    """Images per second that the loader of one process delivers, after ``warmup`` batches (the
    workers' start)."""
    it = iter(build_train_loader(cfg))
    for _ in range(warmup):
        next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(it))
    seconds = time.perf_counter() - start
    del it  # stops the workers
    return images / seconds, images, seconds


def step_settings(cfg, cuda_available):
    """(device, AMP) for the step benchmark: the GPU with mixed precision, as the speed figures of
    docs/BENCHMARKS.md were measured, or the CPU in fp32."""
    return ("cuda", True) if cuda_available else ("cpu", False)


def time_steps(cfg, iters, warmup):
    """img/s of the config's model trained on the loader's batches, and the mean seconds per step
    spent waiting for data (detectron2's data_time)."""
    from detectron2.engine import AMPTrainer, SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    device, amp = step_settings(cfg, torch.cuda.is_available())
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED = device, amp
    # random weights (the 1x config's backbone keeps its norms frozen for ImageNet weights): a tiny
    # learning rate keeps the losses finite, as in tools/benchmark.py; the speed is what is measured
    cfg.SOLVER.BASE_LR = 1e-5
    model = build_model(cfg)  # channels_last on CUDA, as MODEL.FOCALSTAR.CHANNELS_LAST says
    optimizer = build_optimizer(cfg, model)
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, build_train_loader(cfg), optimizer)
    times, waits = [], []
    with EventStorage(0) as storage:
        for i in range(warmup + iters):
            trainer.iter = storage.iter = i
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.run_step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
                waits.append(storage.history("data_time").latest())
            storage.step()
    step = statistics.median(times)
    return dict(
        device=device,
        amp=amp,
        batch=cfg.SOLVER.IMS_PER_BATCH,
        iters=iters,
        s_per_iter=step,
        img_s=cfg.SOLVER.IMS_PER_BATCH / step,
        data_wait_s=statistics.mean(waits),
        data_wait_share=statistics.mean(waits) / step,
    )


def workers_needed(rows, step_img_s):
    """(loader workers per GPU for ``step_img_s`` images/s, 'measured' or 'projected'): the fewest
    measured workers whose loader keeps up, else the measured per-worker rate of the most workers
    extrapolated."""
    for row in sorted((r for r in rows if r["workers"] > 0), key=lambda r: r["workers"]):
        if row["img_s"] >= step_img_s:
            return row["workers"], "measured"
    best = max((r for r in rows if r["workers"] > 0), key=lambda r: r["workers"], default=None)
    if best is None:
        return None, "not measured"
    return math.ceil(step_img_s / best["img_s_per_worker"]), "projected"


def loader_rate(rows, workers):
    """(images/s of one process's loader with ``workers`` workers, how): measured if timed, else
    the per-worker rate of the nearest timed count times ``workers``."""
    timed = [r for r in rows if r["workers"] > 0]
    for row in timed:
        if row["workers"] == workers:
            return row["img_s"], f"measured with {workers} workers"
    if not timed:
        return None, "not measured"
    near = min(timed, key=lambda r: abs(r["workers"] - workers))
    return near[
        "img_s_per_worker"
    ] * workers, f"projected from {near['workers']} workers' rate per worker"


def project_coco_1x(
    step_img_s, inference_img_s, cocoeval_s, gpus, loader=(None, "not measured"), workers=None
):
    """Hours of a COCO 1x run on ``gpus`` GPUs: [(part, hours, how it was obtained)], the last row
    the total. Steps from the measured one-GPU step rate (several GPUs: perfect scaling, an upper
    bound on speed); data: the time the step waits when each process's loader (``loader``: its
    images/s and how that was obtained, with ``workers`` workers) is slower than the step, nothing
    when it keeps up (it runs ahead); evaluation: inference of COCO val on the GPUs plus the COCO
    API's time on one CPU."""
    images_per_gpu = COCO_1X_IMAGES / gpus
    rows = [
        (
            "training steps",
            images_per_gpu / step_img_s / 3600,
            f"projected: {COCO_1X_IMAGES:,} images at the measured {step_img_s} img/s per GPU"
            + (f" x {gpus} GPUs (perfect scaling: not measured)" if gpus > 1 else ""),
        )
    ]
    loader_img_s, loader_how = loader
    if loader_img_s is not None:
        wait = max(0.0, images_per_gpu / loader_img_s - images_per_gpu / step_img_s) / 3600
        rows.append(
            (
                f"waiting for data ({workers} loader workers per GPU)",
                wait,
                f"projected: loader {loader_img_s:.1f} img/s per process ({loader_how}) "
                "against the step",
            )
        )
    rows.append(
        (
            "evaluation: inference on COCO val",
            COCO_VAL_IMAGES / inference_img_s / gpus / 3600,
            f"projected: {COCO_VAL_IMAGES} images at the measured {inference_img_s} img/s per GPU "
            "(batch 8; detectron2 evaluates at batch 1, slower)",
        )
    )
    if cocoeval_s is not None:
        rows.append(
            (
                "evaluation: COCO API (faster-coco-eval)",
                cocoeval_s / 3600,
                "measured: tools/benchmark_eval.py --sections cocoeval on a COCO-val-sized set",
            )
        )
    total = sum(hours for _, hours, _ in rows)
    rows.append(
        (
            "total",
            total,
            "sum"
            + ("" if cocoeval_s is not None else " (without the COCO API's time)")
            + ("" if loader_img_s is not None else " (without data loading)"),
        )
    )
    return rows


def main(argv=None):
    try:
        benchmark(argv)
    except ConfigError as e:  # a bad config or key: one line, as train_net.py gives it
        sys.exit(error_line("benchmark_loader.py", e))


def benchmark(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default="configs/retinanet_R50_flstar_1x.yaml")
    p.add_argument(
        "--images", type=int, default=500, help="COCO-like JPEG files to make (default 500)"
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8],
        help="loader workers to time (0: in the training process itself)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=2,
        help="images per batch of one process (default 2: 16 images over 8 GPUs)",
    )
    p.add_argument("--batches", type=int, default=100, help="batches timed per worker count")
    p.add_argument(
        "--warmup", type=int, default=10, help="batches before timing (the workers' start)"
    )
    p.add_argument("--step", action="store_true", help="also time the train step fed by the loader")
    p.add_argument(
        "--step-workers", type=int, help="workers for --step (default: the most of --workers)"
    )
    p.add_argument(
        "--step-batch",
        type=int,
        default=16,
        help="images per step for --step (default 16, one GPU)",
    )
    p.add_argument("--step-iters", type=int, default=50)
    p.add_argument("--step-warmup", type=int, default=5)
    p.add_argument(
        "--step-img-s",
        type=float,
        default=STEP_IMG_S,
        help=f"train-step rate a GPU needs data for (default {STEP_IMG_S}, measured on an H100)",
    )
    p.add_argument(
        "--eval-json", help="tools/benchmark_eval.py's JSON: its COCO API time goes into the hours"
    )
    p.add_argument(
        "--data-dir", help="where to make the files (default: a temporary folder, removed)"
    )
    p.add_argument("--out", default="output/benchmark_loader.json")
    add_unsafe_config_argument(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs, last")
    args = p.parse_args(argv)

    meta = dict(
        date=datetime.date.today().isoformat(),
        cpu=cpu_name(),
        cpus=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        torch=torch.__version__,
        python=platform.python_version(),
        config=args.config_file,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )
    with tempfile.TemporaryDirectory(prefix="coco-like-", dir=args.data_dir) as folder:
        start = time.perf_counter()
        json_file, image_root, kb = make_coco_like(folder, args.images)
        meta.update(
            images=args.images,
            image_size="640x480",
            jpeg_quality=90,
            mean_file_kb=round(kb, 1),
            made_in_s=round(time.perf_counter() - start, 1),
        )
        print(f"\n{meta}\n")
        rows = []
        print(
            "| loader workers | images/s (one process) | images/s per worker | batches x images "
            "| seconds |"
        )
        print("| --- | --- | --- | --- | --- |")
        for workers in args.workers:
            cfg = loader_config(
                args.config_file,
                json_file,
                image_root,
                workers,
                args.batch,
                args.opts,
                allow_unsafe=args.unsafe_config,
            )
            img_s, images, seconds = time_loader(cfg, args.batches, args.warmup)
            row = dict(
                workers=workers,
                img_s=img_s,
                img_s_per_worker=img_s / max(workers, 1),
                images=images,
                seconds=seconds,
                batch=args.batch,
            )
            rows.append(row)
            print(
                f"| {workers} | {img_s:.1f} | {row['img_s_per_worker']:.1f} | "
                f"{args.batches} x {args.batch} | "
                f"{seconds:.1f} |",
                flush=True,
            )
        report = {"meta": meta, "loader": rows}
        # what a run of the config gets: its own DATALOADER.NUM_WORKERS per GPU
        cfg_workers = load_config(
            args.config_file, args.opts, allow_unsafe=args.unsafe_config
        ).DATALOADER.NUM_WORKERS
        needed, how = workers_needed(rows, args.step_img_s)
        report["workers_per_gpu"] = dict(for_img_s=args.step_img_s, workers=needed, how=how)
        print(
            f"\nLoader workers per GPU for a {args.step_img_s} img/s train step: {needed} ({how}, "
            f"this machine's CPU: {meta['cpu']}); an 8-GPU node then needs "
            f"{8 * (needed + 1) if needed else '?'} cores "
            "(a worker each, and each training process)"
        )
        if args.step:
            workers = args.step_workers if args.step_workers is not None else max(args.workers)
            cfg = loader_config(
                args.config_file,
                json_file,
                image_root,
                workers,
                args.step_batch,
                args.opts,
                allow_unsafe=args.unsafe_config,
            )
            step = report["step"] = dict(
                time_steps(cfg, args.step_iters, args.step_warmup), workers=workers
            )
            print(
                "\n| train step fed by the loader | device | AMP | workers | batch | img/s | "
                "s / iter | "
                f"waiting for data |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
                f"| {cfg.MODEL.META_ARCHITECTURE} | {step['device']} | {step['amp']} | {workers} | "
                f"{step['batch']} | {step['img_s']:.1f} | {step['s_per_iter']:.3f} | "
                f"{100 * step['data_wait_share']:.1f}% |"
            )
    cocoeval_s = None
    if args.eval_json:
        import json

        with open(args.eval_json) as f:
            cocoeval_s = json.load(f)["cocoeval"]["faster_coco_eval_s"]
    report["coco_1x_hours"] = {}
    # with the config's workers per GPU, and with as many as the step needs
    for workers in dict.fromkeys(w for w in (cfg_workers, needed) if w is not None):
        for gpus in (1, 8):
            key = f"{gpus} GPU(s), {workers} workers per GPU"
            hours = project_coco_1x(
                args.step_img_s,
                INFERENCE_IMG_S,
                cocoeval_s,
                gpus,
                loader_rate(report["loader"], workers),
                workers,
            )
            report["coco_1x_hours"][key] = [
                dict(part=part, hours=h, how=how) for part, h, how in hours
            ]
            print(f"\nCOCO 1x on {key}, hours:\n\n| part | hours | how |\n| --- | --- | --- |")
            for part, h, how in hours:
                print(f"| {part} | {h:.2f} | {how} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
