#!/usr/bin/env python
"""
Speed, side by side in one process, on whatever device it finds:

1. the classification loss, forward + backward, on RetinaNet-sized logits (16 x 201,600 x 80):
   stock detectron2's path (fvcore ``sigmoid_focal_loss_jit`` on one-hot targets), torchvision's
   ``sigmoid_focal_loss``, this project's reference functions, ``torch.compile`` of a
   labels-direct FL* (GPU only) and the fused Triton kernel; GPU ms (CUDA events over calls run
   back to back, triton.testing.do_bench) and wall ms (one synchronised call, the host's launch
   latency included), the speed-up over torch.compile, effective GB/s (the 3-pass floor: read
   the logits twice, write the gradient once; from the GPU ms), % of the measured copy
   bandwidth, extra peak memory as a multiple of the gradient's size, and agreement with the
   reference;
2. a train step (batch 16, 800x1333, AMP on CUDA) and inference (batch 8) of the config's
   detector (RetinaNetFLStar, or FCOSFLStar with an FCOS config), the stock detectron2 detector
   it extends (and torchvision's RetinaNet beside RetinaNet), with random weights on one
   synthetic batch: img/s, peak memory, ratios, and the hours a COCO 1x schedule (90k x 16
   images) projects.

    python tools/benchmark.py --out output/benchmark.json          # full sizes (a GPU)
    python tools/benchmark.py --cpu-smoke --out output/bench.json  # tiny sizes, CPU, what CI runs

It prints Markdown tables and writes everything to --out as JSON.
"""

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

COCO_1X_IMAGES = 90000 * 16
FULL = dict(
    images=16,
    anchors=201600,
    classes=80,
    positives=150,
    train_size=(800, 1333),
    train_batch=16,
    infer_batch=8,
    boxes=7,
    copy_bytes=2 << 30,
    loss_iters=20,
    det_iters=10,
    warmup=3,
)
SMOKE = dict(
    images=2,
    anchors=160,
    classes=8,
    positives=10,
    train_size=(64, 96),
    train_batch=2,
    infer_batch=2,
    boxes=3,
    copy_bytes=16 << 20,
    loss_iters=1,
    det_iters=1,
    warmup=1,
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny sizes on the CPU; the fused kernel runs under TRITON_INTERPRET=1",
    )
    p.add_argument(
        "--sections", nargs="+", default=["loss", "detector"], choices=["loss", "detector"]
    )
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--no-amp", action="store_true", help="fp32 train step on CUDA")
    p.add_argument(
        "--config-file",
        default="configs/retinanet_R50_flstar_1x.yaml",
        help="the detector's config (RetinaNetFLStar or FCOSFLStar); the stock detectron2 "
        "class it extends is built from the same one (weights are random either way)",
    )
    p.add_argument("--out", default="output/benchmark.json")
    return p.parse_args(argv)


class Timer:
    """Median seconds of fn() after warm-up, synchronising the device around the timed region."""

    def __init__(self, device, warmup):
        self.device = device
        self.warmup = warmup

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, iters):
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(iters):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def gpu_seconds(device, fn):
    """Median GPU time of fn() run back to back (CUDA events, triton.testing.do_bench, L2 flushed
    between calls); None off CUDA. Unlike Timer it leaves out the host's launch latency, which a
    training step hides behind the GPU work queued before the loss."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def peak_extra_bytes(device, fn):
    """Peak memory fn() allocates beyond what was allocated before it (CUDA only; else None)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth(device, nbytes, timer):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = gpu_seconds(device, lambda: dst.copy_(src)) or timer(lambda: dst.copy_(src), iters=10)
    return 2 * nbytes / seconds / 1e9  # read + write


# --------------------------------------------------------------------------------------------
# 1. The classification loss
# --------------------------------------------------------------------------------------------
def make_labels(sizes, device, seed=0):
    """(N*R,) labels as detectron2's anchor matcher leaves them: class, background=K, ignored=-1."""
    g = torch.Generator().manual_seed(seed)
    n, r, k = sizes["images"], sizes["anchors"], sizes["classes"]
    labels = torch.full((n, r), k, dtype=torch.int64)
    for i in range(n):
        idx = torch.randperm(r, generator=g)
        pos = idx[: sizes["positives"]]
        labels[i, pos] = torch.randint(0, k, (len(pos),), generator=g)
        labels[
            i, idx[sizes["positives"] : 2 * sizes["positives"]]
        ] = -1  # between the IoU thresholds
    return labels.reshape(-1).to(device)


def loss_variants(device, fused_ok, compile_ok):
    """name -> (loss type it computes, fn(logits (R, K), labels (R,)) -> scalar sum)."""
    from fvcore.nn import sigmoid_focal_loss_jit
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    from d2_focalstar.modeling.losses import sigmoid_classification_loss

    alpha, fl_gamma, flstar_gamma, cap = 0.25, 2.0, 0.25, 100.0

    def one_hot(logits, labels):  # what stock detectron2 RetinaNet.losses() builds
        valid = labels >= 0
        k = logits.shape[1]
        return logits[valid], F.one_hot(labels[valid], k + 1)[:, :-1].to(logits.dtype)

    def stock(logits, labels):
        x, t = one_hot(logits, labels)
        return sigmoid_focal_loss_jit(x, t, alpha=alpha, gamma=fl_gamma, reduction="sum")

    def torchvision_fl(logits, labels):
        x, t = one_hot(logits, labels)
        return tv_focal(x, t, alpha=alpha, gamma=fl_gamma, reduction="sum")

    def reference(loss_type, **params):
        def fn(logits, labels):
            x, t = one_hot(logits, labels)
            return sigmoid_classification_loss(x, t, loss_type, alpha, "sum", **params)

        return fn

    variants = {
        "detectron2 stock FL (fvcore jit, one-hot)": ("FL", stock),
        "torchvision FL (one-hot)": ("FL", torchvision_fl),
        "reference FL (d2_focalstar.modeling.losses)": ("FL", reference("FL", gamma=fl_gamma)),
        "reference FL* (d2_focalstar.modeling.losses)": (
            "FLSTAR",
            reference("FLSTAR", gamma=flstar_gamma, max_factor=cap),
        ),
    }
    if compile_ok:

        def labels_direct(logits, labels):  # no one-hot tensor, ignored anchors masked
            k = logits.shape[1]
            x = logits.float()
            t = labels[:, None] == torch.arange(k, device=labels.device)
            x_t = torch.where(t, x, -x)
            factor = torch.exp(torch.clamp(-flstar_gamma * x_t, max=math.log(cap)))
            a_t = torch.where(t, alpha, 1 - alpha)
            loss = a_t * factor * F.softplus(-x_t)
            return torch.where((labels >= 0)[:, None], loss, 0.0).sum()

        variants["torch.compile FL* (labels-direct)"] = ("FLSTAR", torch.compile(labels_direct))
    if fused_ok:
        from d2_focalstar.modeling.fused import fused_classification_loss

        variants["fused FL (Triton)"] = (
            "FL",
            lambda x, y: fused_classification_loss(x, y, "FL", alpha, gamma=fl_gamma),
        )
        variants["fused FL* (Triton)"] = (
            "FLSTAR",
            lambda x, y: fused_classification_loss(
                x, y, "FLSTAR", alpha, gamma=flstar_gamma, max_factor=cap
            ),
        )
    return variants


def bench_losses(args, sizes, device, timer, copy_gbs):
    fused_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    compile_ok = device.type == "cuda"
    variants = loss_variants(device, fused_ok, compile_ok)
    labels = make_labels(sizes, device)
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        logits = (torch.randn(labels.numel(), sizes["classes"], device=device) * 4 - 4).to(dtype)
        logits.requires_grad_(True)
        grad_bytes = logits.numel() * logits.element_size()
        reference = {}  # loss type -> (loss, grad) of the reference in this dtype
        for name, (loss_type, fn) in variants.items():

            def step():
                logits.grad = None
                loss = fn(logits, labels)
                loss.backward()
                return loss

            loss = step()
            grad = logits.grad.float().clone()
            key = loss_type
            if "reference" in name:
                reference[key] = (loss.detach().float(), grad)
            ref_loss, ref_grad = reference.get(key, (None, None))
            if ref_loss is None:
                agrees = None
            else:  # half precision: the one-hot paths round the loss terms to fp16/bf16
                rtol = 1e-4 if dtype == torch.float32 else 2e-2
                agrees = bool(
                    torch.allclose(loss.detach().float(), ref_loss, rtol=rtol)
                    and torch.allclose(grad, ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max())
                )
            try:
                seconds = timer(step, iters=sizes["loss_iters"])
                gpu_s = gpu_seconds(device, step)
            except Exception as e:  # e.g. a variant that does not support the dtype
                rows.append(dict(variant=name, dtype=dtype_name, error=f"{type(e).__name__}: {e}"))
                continue
            logits.grad = None  # the gradient counts in the extra memory
            extra = peak_extra_bytes(device, step)
            effective = 3 * grad_bytes / (gpu_s or seconds) / 1e9
            rows.append(
                dict(
                    variant=name,
                    dtype=dtype_name,
                    loss_type=loss_type,
                    ms=seconds * 1e3,
                    gpu_ms=None if gpu_s is None else gpu_s * 1e3,
                    loss_shape_bytes=grad_bytes,
                    effective_gbs=effective,
                    pct_of_copy=100 * effective / copy_gbs,
                    extra_peak_bytes=extra,
                    extra_peak_vs_grad=None if extra is None else extra / grad_bytes,
                    loss=float(loss.detach()),
                    agrees_with_reference=agrees,
                )
            )
        # drop the tensor (its cell too, which step() reads) before the next dtype's is made
        logits = None
    for r in rows:  # how many times faster than torch.compile, by GPU time (else wall time)
        ref = next(
            (
                c
                for c in rows
                if c["variant"].startswith("torch.compile")
                and c["dtype"] == r["dtype"]
                and "error" not in c
            ),
            None,
        )
        if ref is not None and "error" not in r:
            r["vs_compile"] = (ref["gpu_ms"] or ref["ms"]) / (r["gpu_ms"] or r["ms"])
    return rows


# --------------------------------------------------------------------------------------------
# 2. Whole detectors
# --------------------------------------------------------------------------------------------
def synthetic_batch(sizes, n, device, seed=0):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = sizes["train_size"]
    batch = []
    for _ in range(n):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(sizes["boxes"], 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(sizes["boxes"], 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat([xy, xy + wh], dim=1)
        classes = torch.randint(0, 80, (sizes["boxes"],), generator=g)
        inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=classes)
        batch.append(
            {"image": image.to(device), "instances": inst.to(device), "height": h, "width": w}
        )
    return batch


def detector_class(config_file):
    """The config's meta-architecture (RetinaNetFLStar, FCOSFLStar)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import META_ARCH_REGISTRY

    import d2_focalstar  # noqa: F401 (registers the meta-architectures)
    from d2_focalstar.config import add_focalstar_config

    cfg = get_cfg()
    add_focalstar_config(cfg)
    # a Python tag in a config is refused, not run
    cfg.merge_from_file(config_file, allow_unsafe=False)
    return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)


def detectron2_model(
    config_file, device, sizes, fused, loss_type="FLSTAR", channels_last=True, stock=False
):
    """The config's detector; with ``stock``, the detectron2 class it extends (RetinaNet, FCOS)
    built from the same config, with detectron2's own loss."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from d2_focalstar.config import add_focalstar_config

    cfg = get_cfg()
    add_focalstar_config(cfg)
    # a Python tag in a config is refused, not run
    cfg.merge_from_file(config_file, allow_unsafe=False)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.FOCALSTAR.FUSED_KERNEL = fused
    cfg.MODEL.FOCALSTAR.LOSS_TYPE = loss_type
    cfg.MODEL.FOCALSTAR.CHANNELS_LAST = channels_last  # RetinaNetFLStar's key (CUDA only)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = (
        sizes["train_size"][0],
        sizes["train_size"][1],
    )
    if not stock:
        return build_model(cfg)
    ours = detector_class(config_file)
    args = ours.from_config(cfg)
    for key in ("cls_loss", "channels_last"):  # this project's arguments
        args.pop(key)
    return ours.__bases__[0](**args).to(device)


def torchvision_model(device, sizes):
    """torchvision RetinaNet R50-FPN with detectron2's trainable set: frozen BN, stem and res2
    frozen."""
    from detectron2.layers import FrozenBatchNorm2d
    from torchvision.models.detection import retinanet_resnet50_fpn

    h, w = sizes["train_size"]
    model = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=80, min_size=h, max_size=w
    )
    model.backbone = FrozenBatchNorm2d.convert_frozen_batchnorm(model.backbone)
    body = model.backbone.body
    for module in (body.conv1, body.layer1):
        module.requires_grad_(False)
    return model.to(device)


def torchvision_inputs(batch):
    images = [d["image"].float() / 255 for d in batch]
    targets = [
        {"boxes": d["instances"].gt_boxes.tensor, "labels": d["instances"].gt_classes}
        for d in batch
    ]
    return images, targets


def fl_mode_check(args, sizes, device, batch):
    """RetinaNetFLStar in FL mode (fused kernel on CUDA) and stock RetinaNet, same weights, same
    batch, fp32: the relative difference of each loss term (it must stay at rounding level)."""
    from detectron2.utils.events import EventStorage

    fused = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    ours = detectron2_model(args.config_file, device, sizes, fused=fused, loss_type="FL")
    stock = detectron2_model(args.config_file, device, sizes, fused=False, stock=True)
    stock.load_state_dict(ours.state_dict())
    with EventStorage(0), torch.no_grad():
        got, want = ours(batch), stock(batch)
    diff = {k: abs(float(got[k]) - float(want[k])) / max(abs(float(want[k])), 1e-12) for k in want}
    del ours, stock
    return dict(
        fused_kernel=fused,
        losses_ours={k: float(v) for k, v in got.items()},
        losses_stock={k: float(v) for k, v in want.items()},
        rel_diff=diff,
    )


def bench_detectors(args, sizes, device, timer):
    from detectron2.utils.events import EventStorage

    amp = device.type == "cuda" and not args.no_amp
    cuda = device.type == "cuda"
    batch = synthetic_batch(sizes, sizes["train_batch"], device)
    tv_images, tv_targets = torchvision_inputs(batch)
    infer_batch = [
        {k: v for k, v in d.items() if k != "instances"} for d in batch[: sizes["infer_batch"]]
    ]
    ours = detector_class(args.config_file).__name__
    base = detector_class(args.config_file).__bases__[0].__name__
    stock_name = f"detectron2 {base} (stock)"
    systems = {
        f"{ours} (FL*, this project)": (
            "d2",
            lambda: detectron2_model(args.config_file, device, sizes, fused=cuda),
        ),
        f"{ours} (FL, this project)": (  # the same loss as stock: the code path alone differs
            "d2",
            lambda: detectron2_model(args.config_file, device, sizes, fused=cuda, loss_type="FL"),
        ),
        f"{ours} (FL*, FUSED_KERNEL off)": (  # how much of the difference the kernel makes
            "d2",
            lambda: detectron2_model(args.config_file, device, sizes, fused=False),
        ),
        # the rest of the step, one change at a time, each on top of the project's defaults:
        # channels_last weights (MODEL.FOCALSTAR.CHANNELS_LAST, on by default on CUDA) and
        # cuDNN's autotuner (detectron2's CUDNN_BENCHMARK; the batch is one fixed size here)
        f"{ours} (FL*, CHANNELS_LAST off)": (
            "d2",
            lambda: detectron2_model(
                args.config_file, device, sizes, fused=cuda, channels_last=False
            ),
        ),
        f"{ours} (FL*, + cudnn.benchmark)": (
            "d2",
            lambda: detectron2_model(args.config_file, device, sizes, fused=cuda),
            dict(cudnn_benchmark=True),
        ),
        stock_name: (
            "d2",
            lambda: detectron2_model(args.config_file, device, sizes, fused=False, stock=True),
        ),
        # how much of the gain is the layout alone, which the stock detector could have too
        f"{stock_name[:-1]}, + channels_last)": (
            "d2",
            lambda: detectron2_model(args.config_file, device, sizes, fused=False, stock=True).to(
                memory_format=torch.channels_last
            ),
        ),
    }
    if base == "RetinaNet":
        systems["torchvision RetinaNet"] = ("tv", lambda: torchvision_model(device, sizes))
    rows, cudnn_benchmark = [], torch.backends.cudnn.benchmark
    for name, (kind, build, *options) in systems.items():
        options = options[0] if options else {}
        torch.backends.cudnn.benchmark = options.get("cudnn_benchmark", cudnn_benchmark)
        torch.manual_seed(0)
        model = build()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)

        def train_step():
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                losses = model(batch) if kind == "d2" else model(tv_images, tv_targets)
                loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        def infer():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                model(infer_batch) if kind == "d2" else model(tv_images[: sizes["infer_batch"]])

        with EventStorage(0):
            model.train()
            train_s = timer(train_step, iters=sizes["det_iters"])
            train_peak = peak_extra_bytes(device, train_step)
        model.eval()
        infer_s = timer(infer, iters=sizes["det_iters"])
        train_ips = sizes["train_batch"] / train_s
        rows.append(
            dict(
                system=name,
                amp=amp,
                train_s_per_iter=train_s,
                train_img_s=train_ips,
                train_peak_bytes=train_peak,
                infer_img_s=sizes["infer_batch"] / infer_s,
                coco_1x_hours=COCO_1X_IMAGES / train_ips / 3600,
            )
        )
        # free the model (the cells that train_step() and infer() read too) before the next one
        model = opt = None
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if cuda:
            torch.cuda.empty_cache()
    stock = next(r for r in rows if r["system"] == stock_name)
    for r in rows:
        r["train_vs_stock"] = r["train_img_s"] / stock["train_img_s"]
        r["infer_vs_stock"] = r["infer_img_s"] / stock["infer_img_s"]
        if r["train_peak_bytes"] is not None:
            r["peak_vs_stock"] = r["train_peak_bytes"] / stock["train_peak_bytes"]
    return rows


# --------------------------------------------------------------------------------------------
def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def gib(b):
    return None if b is None else b / 2**30


def print_tables(report):
    meta = report["meta"]
    print(
        f"\n{meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"{meta['date']}"
    )
    print(f"copy bandwidth: {meta['copy_gbs']:.0f} GB/s | logits {meta['logits_shape']}\n")
    if report.get("loss"):
        print(
            "| variant | dtype | GPU ms | wall ms | vs torch.compile | effective GB/s | "
            "% of copy | "
            "extra peak GiB | x grad size | agrees |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in report["loss"]:
            if "error" in r:
                print(f"| {r['variant']} | {r['dtype']} | {r['error']} | | | | | | | |")
                continue
            agrees = {None: "(reference)", True: "yes", False: "NO"}[r["agrees_with_reference"]]
            vs = r.get("vs_compile")
            print(
                f"| {r['variant']} | {r['dtype']} | {fmt(r['gpu_ms'], '.3f')} | {r['ms']:.3f} | "
                f"{'n/a' if vs is None else f'{vs:.2f}x'} | {r['effective_gbs']:.0f} | "
                f"{r['pct_of_copy']:.0f}% | {fmt(gib(r['extra_peak_bytes']), '.2f')} | "
                f"{fmt(r['extra_peak_vs_grad'], '.2f')} | {agrees} |"
            )
        print()
    if report.get("fl_mode_check"):
        c = report["fl_mode_check"]
        print(
            "FL mode vs stock detectron2 RetinaNet, same weights and batch, fp32"
            f" (fused kernel {'on' if c['fused_kernel'] else 'off'}): relative difference "
            + ", ".join(f"{k} {v:.1e}" for k, v in c["rel_diff"].items())
            + "\n"
        )
    failed = [c for c in report.get("fused_self_check", []) if c["disagreement"]]
    for c in failed:
        print(
            f"WARNING: the fused kernel failed its self-check ({', '.join(c['setting'])}: "
            f"{c['disagreement']}); the rows of this project timed the reference functions\n"
        )
    if report.get("detector"):
        print(
            "| system | train img/s | s/iter | peak GiB | vs stock (train) | vs stock (peak) | "
            "inference img/s | COCO 1x hours (1 device) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in report["detector"]:
            print(
                f"| {r['system']} | {r['train_img_s']:.1f} | {r['train_s_per_iter']:.3f} | "
                f"{fmt(gib(r['train_peak_bytes']), '.1f')} | {r['train_vs_stock']:.3f}x | "
                f"{fmt(r.get('peak_vs_stock'), '.3f')} | {r['infer_img_s']:.1f} | "
                f"{r['coco_1x_hours']:.1f} |"
            )
        print()


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_smoke:
        # read when d2_focalstar.modeling.fused is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        sizes = SMOKE
    else:
        if not torch.cuda.is_available():
            from d2_focalstar.run.errors import error_line

            sys.exit(
                error_line(
                    "tools/benchmark.py", "no CUDA device; use --cpu-smoke for the CPU smoke run"
                )
            )
        device = torch.device("cuda")
        # cudnn.benchmark stays off (detectron2's CUDNN_BENCHMARK default) but in its own row
        sizes = FULL
    timer = Timer(device, sizes["warmup"])
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # what the GPU ms are held against
    copy_gbs = copy_bandwidth(device, sizes["copy_bytes"], timer)
    report = {
        "meta": dict(
            command="python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            device_name=torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            torch=torch.__version__,
            triton=triton_version,
            cpu_smoke=args.cpu_smoke,
            sizes=sizes,
            copy_gbs=copy_gbs,
            logits_shape=[sizes["images"], sizes["anchors"], sizes["classes"]],
        )
    }
    if "loss" in args.sections:
        report["loss"] = bench_losses(args, sizes, device, timer, copy_gbs)
    if "detector" in args.sections:
        report["fl_mode_check"] = fl_mode_check(
            args, sizes, device, synthetic_batch(sizes, sizes["train_batch"], device)
        )
        report["detector"] = bench_detectors(args, sizes, device, timer)
        # a kernel that failed its self-check was not timed
        if "d2_focalstar.modeling.fused" in sys.modules:
            report["fused_self_check"] = [
                dict(setting=[str(k) for k in key], disagreement=verdict)
                for key, verdict in sys.modules["d2_focalstar.modeling.fused"]._verdicts.items()
            ]
    print_tables(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from d2_focalstar.fileio import write_json

    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
