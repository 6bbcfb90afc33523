"""
The embedded synthetic "shapes" datasets: scenes of small shapes of a few classes among unlabelled
clutter (lines, outlines, blobs, noise), so that foreground anchors are a tiny fraction of all
anchors, the imbalance that FL and FL* are about. Each is generated on first use, deterministically
from its seed, as COCO JSON plus JPEG images under ``$DETECTRON2_DATASETS/<name>/`` (default
``./datasets``); ``catalog.py`` registers them.
"""

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import cv2
import numpy as np

from ..fileio import usual_mode

__all__ = [
    "SHAPE_CLASSES",
    "EMBEDDED_DATASETS",
    "ShapesSpec",
    "generate_shapes_dataset",
    "ensure_shapes_dataset",
    "dataset_root",
]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ["circle", "square", "triangle", "cross"]

#: The categories of the COCO-imbalance proxy: shape x colour x fill, 5 x 4 x 4 = 80 (COCO's
#: count), so that the binary negatives per positive anchor, which sigmoid losses sum over every
#: class, come near COCO's (docs/RESULTS.md).
PROXY_SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOR_FAMILIES = {
    "red": (40, 40, 215),
    "green": (40, 185, 40),
    "blue": (215, 90, 30),
    "yellow": (30, 215, 225),
}  # BGR, each drawn with a random shade of its own
FILLS = ("solid", "outline", "striped", "dotted")


@dataclass(frozen=True)
class ShapesSpec:
    num_train: int
    num_val: int
    image_size: int  # square images, pixels
    min_objects: int
    max_objects: int
    min_size: int  # object size range, pixels
    max_size: int
    seed: int
    # "shapes": SHAPE_CLASSES in random colours, solid; "proxy80": shape x colour x fill
    categories: str = "shapes"

    def class_names(self):
        if self.categories == "shapes":
            return list(SHAPE_CLASSES)
        return [
            f"{color} {fill} {shape}"
            for shape in PROXY_SHAPES
            for color in COLOR_FAMILIES
            for fill in FILLS
        ]


#: The embedded datasets, by name. "focalstar_shapes" is sized for a CPU quickstart,
#: "focalstar_shapes_medium" for a GPU study that generates its data in about a minute.
EMBEDDED_DATASETS = {
    "focalstar_shapes": ShapesSpec(
        num_train=512,
        num_val=64,
        image_size=192,
        min_objects=4,
        max_objects=12,
        min_size=12,
        max_size=36,
        seed=0,
    ),
    "focalstar_shapes_medium": ShapesSpec(
        num_train=2000,
        num_val=250,
        image_size=320,
        min_objects=6,
        max_objects=20,
        min_size=10,
        max_size=48,
        seed=0,
    ),
    # the calibrated proxy (configs/proxy_*.yaml, docs/RESULTS.md): the quickstart's scenes with
    # 1-3 objects instead of 4-12: 0.22% of the anchors foreground (COCO at the 1x scale, estimated:
    # ~0.11%; docs/results/anchor_stats/)
    "focalstar_shapes_sparse": ShapesSpec(
        num_train=1200,
        num_val=200,
        image_size=192,
        min_objects=1,
        max_objects=3,
        min_size=12,
        max_size=36,
        seed=1,
    ),
    "focalstar_shapes_large": ShapesSpec(
        num_train=8000,
        num_val=500,
        image_size=512,
        min_objects=8,
        max_objects=30,
        min_size=10,
        max_size=64,
        seed=0,
    ),
    # the COCO-imbalance proxy (configs/proxy80_*.yaml, docs/RESULTS.md): 80 categories, ~1.5
    # objects per scene, >= 300 training instances per category, 1,000 test scenes
    "focalstar_proxy80": ShapesSpec(
        num_train=16000,
        num_val=1000,
        image_size=192,
        min_objects=1,
        max_objects=2,
        min_size=14,
        max_size=40,
        seed=2,
        categories="proxy80",
    ),
    # other scenes of the same kind (4-10 objects each), to pretrain the proxy's backbone on
    "focalstar_proxy80_pretrain": ShapesSpec(
        num_train=4000,
        num_val=200,
        image_size=192,
        min_objects=4,
        max_objects=10,
        min_size=14,
        max_size=40,
        seed=3,
        categories="proxy80",
    ),
}


def dataset_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _random_color(rng, background):
    """A color that differs clearly from the local background, so every object is visible."""
    while True:
        color = rng.integers(0, 256, size=3)
        if np.abs(color.astype(int) - background.astype(int)).sum() > 150:
            return tuple(int(c) for c in color)


def _draw_shape(img, cls, cx, cy, size, color):
    h = size / 2
    if cls == "diamond":
        pts = np.array([[cx, cy - h], [cx + h, cy], [cx, cy + h], [cx - h, cy]], np.int32)
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    if cls == "circle":
        cv2.circle(img, (cx, cy), int(round(h)), color, -1, cv2.LINE_AA)
    elif cls == "square":
        cv2.rectangle(img, (int(cx - h), int(cy - h)), (int(cx + h), int(cy + h)), color, -1)
    elif cls == "triangle":
        pts = np.array([[cx, cy - h], [cx - h, cy + h], [cx + h, cy + h]], np.int32)
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    elif cls == "cross":
        t = max(2, int(size / 4))
        cv2.rectangle(img, (int(cx - h), cy - t // 2), (int(cx + h), cy + t // 2), color, -1)
        cv2.rectangle(img, (cx - t // 2, int(cy - h)), (cx + t // 2, int(cy + h)), color, -1)
    return [int(cx - h), int(cy - h), int(2 * h), int(2 * h)]  # XYWH, as COCO


def _fill_pattern(mask, fill, size):
    """The pixels of a shape's mask that its fill paints: all (solid), a band along its edge
    (outline), every other band of rows (striped), a checkerboard of dots (dotted)."""
    if fill == "solid":
        return mask
    if fill == "outline":
        width = max(2, size // 6)
        return mask & ~cv2.erode(
            mask.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)
        ).astype(bool)
    period = max(3, size // 5)
    rows, cols = np.indices(mask.shape)
    if fill == "striped":
        return mask & ((rows // period) % 2 == 0)
    return (
        mask
        & ((rows // period + cols // period) % 2 == 0)
        & ((rows % period) < period - 1)
        & ((cols % period) < period - 1)
    )


def _draw_proxy_object(img, rng, name, cx, cy, size):
    """One object of a proxy80 category, 'red striped circle': its shape's mask painted with its
    fill in a random shade of its colour family."""
    color, fill, shape = name.split(" ")
    shade = np.clip(
        np.array(COLOR_FAMILIES[color]) * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3), 0, 255
    )
    pad = 2
    canvas = np.zeros((size + 2 * pad, size + 2 * pad), np.uint8)
    c = size // 2 + pad
    _draw_shape(canvas, shape, c, c, size, 255)
    paint = _fill_pattern(canvas > 127, fill, size)
    y0, x0 = cy - c, cx - c
    ys, xs = np.nonzero(paint)
    ys, xs = ys + y0, xs + x0
    inside = (ys >= 0) & (ys < img.shape[0]) & (xs >= 0) & (xs < img.shape[1])
    img[ys[inside], xs[inside]] = shade.astype(np.uint8)
    h = size / 2
    return [int(cx - h), int(cy - h), int(2 * h), int(2 * h)]  # XYWH, as COCO


def _draw_clutter(img, rng, spec):
    s = spec.image_size
    for _ in range(rng.integers(10, 25)):
        kind = rng.integers(0, 3)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if kind == 0:  # thin lines
            p, q = rng.integers(0, s, size=2), rng.integers(0, s, size=2)
            cv2.line(img, tuple(map(int, p)), tuple(map(int, q)), color, 1, cv2.LINE_AA)
        elif kind == 1:  # ellipse outlines: round like circles, but hollow and elongated
            c = tuple(int(v) for v in rng.integers(0, s, size=2))
            axes = (int(rng.integers(4, spec.max_size)), int(rng.integers(2, 6)))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, color, 1, cv2.LINE_AA)
        else:  # small blobs, below the object size range
            c = tuple(int(v) for v in rng.integers(0, s, size=2))
            cv2.circle(img, c, int(rng.integers(1, max(2, spec.min_size // 4))), color, -1)


def _render_image(rng, spec, image_id, file_name):
    s = spec.image_size
    # Smooth random background: a bilinear blend of four corner colors, plus noise; for the
    # proxy80 categories, whose colour is part of the category, muted ones (grey, faintly tinted)
    if spec.categories == "proxy80":
        corners = (
            rng.integers(30, 226, size=(2, 2, 1)) + rng.integers(-20, 21, size=(2, 2, 3))
        ).astype(np.float32)
    else:
        corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
    img = cv2.resize(corners, (s, s), interpolation=cv2.INTER_LINEAR)
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    _draw_clutter(img, rng, spec)

    annotations, boxes, names = [], [], spec.class_names()
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        for _attempt in range(20):  # place without heavy overlap
            size = int(rng.integers(spec.min_size, spec.max_size + 1))
            cx, cy = (int(v) for v in rng.integers(size // 2 + 1, s - size // 2 - 1, size=2))
            box = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
            if all(_iou(box, b) < 0.1 for b in boxes):
                break
        else:
            continue
        cls_id = int(rng.integers(0, len(names)))
        if spec.categories == "shapes":
            color = _random_color(rng, img[cy, cx])
            bbox = _draw_shape(img, SHAPE_CLASSES[cls_id], cx, cy, size, color)
        else:
            bbox = _draw_proxy_object(img, rng, names[cls_id], cx, cy, size)
        boxes.append(box)
        annotations.append(
            {
                "image_id": image_id,
                "category_id": cls_id + 1,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
        )
    cv2.imwrite(file_name, img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return annotations


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def generate_shapes_dataset(out_dir, spec: ShapesSpec):
    """Write ``train/``, ``val/`` (JPEG) and ``train.json``, ``val.json`` (COCO) into out_dir."""
    categories = [
        {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(spec.class_names())
    ]
    for split, count, seed in (
        ("train", spec.num_train, spec.seed),
        ("val", spec.num_val, spec.seed + 1_000_003),
    ):
        rng = np.random.default_rng(seed)
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            file_name = f"{split}_{i:06d}.jpg"
            anns = _render_image(rng, spec, i + 1, os.path.join(out_dir, split, file_name))
            images.append(
                {
                    "id": i + 1,
                    "file_name": file_name,
                    "width": spec.image_size,
                    "height": spec.image_size,
                }
            )
            annotations.extend(anns)
        for k, ann in enumerate(annotations):
            ann["id"] = k + 1
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(
                {
                    "images": images,
                    "annotations": annotations,
                    "categories": categories,
                    "info": {"description": f"d2-focalstar embedded dataset, {spec}"},
                },
                f,
            )


def ensure_shapes_dataset(name, root=None):
    """
    Generate the embedded dataset ``name`` under ``root`` unless it is there; return its folder.
    Safe with several processes: each writes into a private temporary folder and renames it into
    place, so the folder either does not exist or is complete.
    """
    spec = EMBEDDED_DATASETS[name]
    root = root or dataset_root()
    out_dir = os.path.join(root, name)
    if os.path.isdir(out_dir):
        return out_dir
    os.makedirs(root, exist_ok=True)
    logger.info(f"Generating the embedded dataset {name!r} into {out_dir} (first use only) ...")
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    try:
        generate_shapes_dataset(tmp, spec)
        os.chmod(tmp, usual_mode(directory=True))  # mkdtemp's folder is the owner's alone
        os.rename(tmp, out_dir)
    except OSError:
        if not os.path.isdir(out_dir):  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
