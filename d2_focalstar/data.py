"""
Datasets: the embedded synthetic "shapes" dataset, and COCO-format datasets named in the config.

The embedded dataset is generated on first use, deterministically from a seed, as COCO JSON plus
JPEG images under ``$DETECTRON2_DATASETS/<name>/`` (default ``./datasets``), and registered in
detectron2's catalogs as ``<name>_train`` and ``<name>_val``. Each scene holds many small shapes of
a few classes among unlabelled clutter (lines, outlines, blobs, noise), so that foreground anchors
are a tiny fraction of all anchors: the imbalance that FL and FL* are about.
"""
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .config import ConfigError, config_value, loss_config_node
from .fileio import usual_mode

__all__ = ["SHAPE_CLASSES", "EMBEDDED_DATASETS", "ShapesSpec", "generate_shapes_dataset",
           "ensure_shapes_dataset", "register_embedded_datasets", "register_coco_json_datasets",
           "check_datasets", "check_coco_json"]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ["circle", "square", "triangle", "cross"]


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


#: The embedded datasets, by name. "focalstar_shapes" is sized for a CPU quickstart,
#: "focalstar_shapes_medium" for a GPU study that generates its data in about a minute.
EMBEDDED_DATASETS = {
    "focalstar_shapes": ShapesSpec(num_train=512, num_val=64, image_size=192, min_objects=4,
                                   max_objects=12, min_size=12, max_size=36, seed=0),
    "focalstar_shapes_medium": ShapesSpec(num_train=2000, num_val=250, image_size=320,
                                          min_objects=6, max_objects=20, min_size=10, max_size=48,
                                          seed=0),
    # the calibrated proxy (configs/proxy_*.yaml, docs/RESULTS.md): the quickstart's scenes with
    # 1-3 objects instead of 4-12: 0.22% of the anchors foreground (COCO at the 1x scale, estimated:
    # ~0.11%; docs/results/anchor_stats/)
    "focalstar_shapes_sparse": ShapesSpec(num_train=1200, num_val=200, image_size=192,
                                          min_objects=1, max_objects=3, min_size=12, max_size=36,
                                          seed=1),
    "focalstar_shapes_large": ShapesSpec(num_train=8000, num_val=500, image_size=512,
                                         min_objects=8, max_objects=30, min_size=10, max_size=64,
                                         seed=0),
}


def _dataset_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _random_color(rng, background):
    """A color that differs clearly from the local background, so every object is visible."""
    while True:
        color = rng.integers(0, 256, size=3)
        if np.abs(color.astype(int) - background.astype(int)).sum() > 150:
            return tuple(int(c) for c in color)


def _draw_shape(img, cls, cx, cy, size, color):
    h = size / 2
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
    # Smooth random background: a bilinear blend of four corner colors, plus noise.
    corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
    img = cv2.resize(corners, (s, s), interpolation=cv2.INTER_LINEAR)
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    _draw_clutter(img, rng, spec)

    annotations, boxes = [], []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        for _attempt in range(20):  # place without heavy overlap
            size = int(rng.integers(spec.min_size, spec.max_size + 1))
            cx, cy = (int(v) for v in rng.integers(size // 2 + 1, s - size // 2 - 1, size=2))
            box = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
            if all(_iou(box, b) < 0.1 for b in boxes):
                break
        else:
            continue
        cls_id = int(rng.integers(0, len(SHAPE_CLASSES)))
        color = _random_color(rng, img[cy, cx])
        bbox = _draw_shape(img, SHAPE_CLASSES[cls_id], cx, cy, size, color)
        boxes.append(box)
        annotations.append({"image_id": image_id, "category_id": cls_id + 1, "bbox": bbox,
                            "area": bbox[2] * bbox[3], "iscrowd": 0})
    cv2.imwrite(file_name, img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return annotations


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def generate_shapes_dataset(out_dir, spec: ShapesSpec):
    """Write ``train/``, ``val/`` (JPEG) and ``train.json``, ``val.json`` (COCO) into out_dir."""
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"}
                  for i, n in enumerate(SHAPE_CLASSES)]
    for split, count, seed in (("train", spec.num_train, spec.seed),
                               ("val", spec.num_val, spec.seed + 1_000_003)):
        rng = np.random.default_rng(seed)
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            file_name = f"{split}_{i:06d}.jpg"
            anns = _render_image(rng, spec, i + 1, os.path.join(out_dir, split, file_name))
            images.append({"id": i + 1, "file_name": file_name,
                           "width": spec.image_size, "height": spec.image_size})
            annotations.extend(anns)
        for k, ann in enumerate(annotations):
            ann["id"] = k + 1
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories,
                       "info": {"description": f"d2-focalstar embedded dataset, {spec}"}}, f)


def ensure_shapes_dataset(name, root=None):
    """
    Generate the embedded dataset ``name`` under ``root`` unless it is there; return its folder.
    Safe with several processes: each writes into a private temporary folder and renames it into
    place, so the folder either does not exist or is complete.
    """
    spec = EMBEDDED_DATASETS[name]
    root = root or _dataset_root()
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


def register_embedded_datasets(root=None):
    """Register ``<name>_train`` / ``<name>_val`` for every embedded dataset (generated lazily)."""
    root = root or _dataset_root()
    for name in EMBEDDED_DATASETS:
        folder = os.path.join(root, name)
        for split in ("train", "val"):
            dataset_name = f"{name}_{split}"
            if dataset_name in DatasetCatalog.list():
                continue
            json_file = os.path.join(folder, f"{split}.json")
            image_root = os.path.join(folder, split)

            def load(name=name, root=root, json_file=json_file, image_root=image_root,
                     dataset_name=dataset_name):
                ensure_shapes_dataset(name, root)
                return load_coco_json(json_file, image_root, dataset_name)

            DatasetCatalog.register(dataset_name, load)
            MetadataCatalog.get(dataset_name).set(
                json_file=json_file, image_root=image_root, evaluator_type="coco",
                thing_classes=list(SHAPE_CLASSES))


def register_coco_json_datasets(cfg):
    """Register each [name, json_file, image_root] of DATASETS.COCO_JSON (a COCO-format dataset)."""
    for i, (name, json_file, image_root) in enumerate(cfg.DATASETS.COCO_JSON):
        key = f"DATASETS.COCO_JSON[{i}]"
        if not os.path.isfile(json_file):
            raise ConfigError(f"{key}: json_file {json_file!r} of dataset {name!r} does not exist")
        if not os.path.isdir(image_root):
            raise ConfigError(f"{key}: image_root {image_root!r} of dataset {name!r} is not a folder")
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue  # registered by an earlier setup() in this process
            raise ConfigError(f"{key}: dataset name {name!r} is already registered "
                              "(a detectron2 builtin or another entry): choose another name")
        register_coco_instances(name, {}, json_file, image_root)


def _and_more(items, what):
    return f" (and {len(items) - 1} more {what})" if len(items) > 1 else ""


def check_coco_json(json_file, dataset_name, num_classes=None, training=False):
    """Raise ConfigError, naming the file, for JSON that is malformed or not COCO detection, that
    uses a category id it does not declare, whose images lack an id, file_name, width or height
    or share an id (annotations would go to the wrong image), whose annotations lack an id or a
    bbox or share an id; with ``num_classes`` (("MODEL.RETINANET.NUM_CLASSES", its value)), that
    declares more categories than the detector has classes; with ``training``, that has no
    images or no annotations (DATALOADER.FILTER_EMPTY_ANNOTATIONS would remove every image)."""
    where = f"{json_file} (dataset {dataset_name!r})"
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON: {e.msg} at line {e.lineno}, "
                          f"column {e.colno}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{where}: cannot be read: {e}") from None
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("categories"), list)
            and isinstance(data.get("annotations", []), list)):
        raise ConfigError(f"{where}: not a COCO detection file: it needs the lists 'images', "
                          "'categories' and 'annotations'")
    declared = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    annotations = data.get("annotations", [])
    undeclared = [a for a in annotations
                  if not isinstance(a, dict) or a.get("category_id") not in declared]
    if undeclared:
        first = undeclared[0] if isinstance(undeclared[0], dict) else {}
        raise ConfigError(
            f"{where}: {len(undeclared)} annotations use a category_id that 'categories' does "
            f"not declare (first: annotation id {first.get('id')} with category_id "
            f"{first.get('category_id')!r}; declared: {sorted(declared, key=str)[:20]})")
    _check_images(where, data["images"])
    _check_annotations(where, annotations)
    if num_classes is not None:
        key, classes = num_classes
        if len(declared) > classes:
            raise ConfigError(
                f"{where}: {len(declared)} categories, but {key} is {classes}: the detector would "
                f"train {len(declared) - classes} of them as background (or fail); set {key} "
                f"{len(declared)}")
    if training and not data["images"]:
        raise ConfigError(f"{where}: no images: nothing to train on")
    elif training:
        ids = {im["id"] for im in data["images"]}
        if not any(a["image_id"] in ids and not a.get("iscrowd", 0) for a in annotations):
            raise ConfigError(
                f"{where}: none of its {len(ids)} images has an annotation (a box that is not "
                f"iscrowd): DATALOADER.FILTER_EMPTY_ANNOTATIONS would remove them all, and "
                f"without it there is nothing to learn")


def _check_images(where, images):
    keys = ("id", "file_name", "width", "height")
    bad = [f"image entry {im!r} is not an object" if not isinstance(im, dict) else
           f"image id {im.get('id')!r} ({im.get('file_name', 'no file_name')}) lacks "
           f"{', '.join(k for k in keys if k not in im)}"
           for im in images if not isinstance(im, dict) or not all(k in im for k in keys)]
    if bad:
        raise ConfigError(f"{where}: {bad[0]}{_and_more(bad, 'images')}; each image needs id, "
                          "file_name, width and height")
    sizes = [f"image id {im['id']!r} ({im['file_name']}) has width {im['width']!r}, height "
             f"{im['height']!r}" for im in images
             if not all(isinstance(im[k], int) and im[k] > 0 for k in ("width", "height"))]
    if sizes:
        raise ConfigError(f"{where}: {sizes[0]}{_and_more(sizes, 'images')}; allowed whole numbers "
                          "of pixels > 0")
    files = {}
    for im in images:
        files.setdefault(im["id"], []).append(im["file_name"])
    shared = [(i, f) for i, f in files.items() if len(f) > 1]
    if shared:
        i, names = shared[0]
        more = f" (and {len(shared) - 1} more ids)" if len(shared) > 1 else ""
        raise ConfigError(f"{where}: image id {i!r} is used by {len(names)} images "
                          f"({', '.join(names[:3])}){more}; annotations find their image by id, so "
                          "each image needs its own")


def _check_annotations(where, annotations):
    bad = [f"annotation id {a.get('id')!r} of image id {a.get('image_id')!r}" for a in annotations
           if not ("id" in a and "image_id" in a and isinstance(a.get("bbox"), list)
                   and len(a["bbox"]) == 4
                   and all(isinstance(v, (int, float)) for v in a["bbox"]))]
    if bad:
        raise ConfigError(f"{where}: {bad[0]}{_and_more(bad, 'annotations')} lacks an id, an "
                          "image_id or a bbox of 4 numbers")
    seen, shared = set(), []
    for a in annotations:
        if a["id"] in seen:
            shared.append(a["id"])
        seen.add(a["id"])
    if shared:
        more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
        raise ConfigError(f"{where}: annotation id {shared[0]!r} is used more than once{more}; "
                          "detectron2 requires each annotation to have its own id")


def check_datasets(cfg, train=True):
    """
    At start-up, for every dataset in DATASETS.TRAIN (unless ``train`` is False: evaluation only)
    and DATASETS.TEST: it is registered, and if it is a COCO-format one, its JSON and image folder
    exist and the JSON is sound. Raises ConfigError naming the key, the dataset and the file.
    Reads each JSON once (COCO train: ~0.5 GB, some seconds); call it in one process, not in
    every worker.
    """
    keys = [("DATASETS.TRAIN", cfg.DATASETS.TRAIN)] if train else []
    head = loss_config_node(cfg)
    num_classes = (f"{head}.NUM_CLASSES", config_value(cfg, f"{head}.NUM_CLASSES")) if head else None
    for key, names in keys + [("DATASETS.TEST", cfg.DATASETS.TEST)]:
        for name in names:
            if name not in DatasetCatalog.list():
                raise ConfigError(
                    f"{key}: dataset {name!r} is not registered. Use an embedded one "
                    f"({', '.join(n + '_train/_val' for n in EMBEDDED_DATASETS)}), a detectron2 "
                    "builtin such as coco_2017_train, or add yours with DATASETS.COCO_JSON "
                    "(datasets/README.md)")
            base = name.rsplit("_", 1)[0]
            if base in EMBEDDED_DATASETS:
                ensure_shapes_dataset(base)
                classes = len(MetadataCatalog.get(name).thing_classes)
                if num_classes and classes > num_classes[1]:
                    raise ConfigError(f"{key}: dataset {name!r} has {classes} classes, but "
                                      f"{num_classes[0]} is {num_classes[1]}: set it to {classes}")
                continue
            meta = MetadataCatalog.get(name)
            json_file, image_root = meta.get("json_file"), meta.get("image_root")
            if json_file is None:
                continue  # not a COCO-JSON dataset: nothing we know how to check
            if not os.path.isfile(json_file):
                raise ConfigError(f"{key}: dataset {name!r}: annotation file {json_file} does not "
                                  "exist (COCO goes under $DETECTRON2_DATASETS/coco: see "
                                  "datasets/README.md)")
            if image_root and not os.path.isdir(image_root):
                raise ConfigError(f"{key}: dataset {name!r}: image folder {image_root} does not exist")
            check_coco_json(json_file, name, num_classes, training=key == "DATASETS.TRAIN")
