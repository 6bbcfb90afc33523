"""
Start-up checks of the datasets a config names: registered, files present, and a COCO JSON that
detectron2 would read wrongly or fail on deep in training refused in one ConfigError line naming
the file and the first bad record.
"""

import collections
import json
import math
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import ConfigError
from .catalog import FOLDER_FORMAT
from .folders import check_voc_folder
from .shapes import EMBEDDED_DATASETS, ensure_shapes_dataset

__all__ = ["check_coco_json", "check_datasets"]


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
        raise ConfigError(
            f"{where}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{where}: cannot be read: {e}") from None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("categories"), list)
        and isinstance(data.get("annotations", []), list)
    ):
        raise ConfigError(
            f"{where}: not a COCO detection file: it needs the lists 'images', "
            "'categories' and 'annotations'"
        )
    declared = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    twice = [
        (i, n)
        for i, n in collections.Counter(
            c.get("id") for c in data["categories"] if isinstance(c, dict)
        ).items()
        if n > 1
    ]
    if twice:
        names = [
            c.get("name")
            for c in data["categories"]
            if isinstance(c, dict) and c.get("id") == twice[0][0]
        ]
        raise ConfigError(
            f"{where}: category id {twice[0][0]!r} is declared {twice[0][1]} times "
            f"({', '.join(map(repr, names))}){_and_more(twice, 'ids')}: the class list "
            "would be ambiguous; give each category its own id"
        )
    annotations = data.get("annotations", [])
    undeclared = [
        a for a in annotations if not isinstance(a, dict) or a.get("category_id") not in declared
    ]
    if undeclared:
        first = undeclared[0] if isinstance(undeclared[0], dict) else {}
        raise ConfigError(
            f"{where}: {len(undeclared)} annotations use a category_id that 'categories' does "
            f"not declare (first: annotation id {first.get('id')} with category_id "
            f"{first.get('category_id')!r}; declared: {sorted(declared, key=str)[:20]})"
        )
    _check_images(where, data["images"])
    _check_annotations(where, annotations)
    if num_classes is not None:
        key, classes = num_classes
        if len(declared) > classes:
            raise ConfigError(
                f"{where}: {len(declared)} categories, but {key} is {classes}: the detector would "
                f"train {len(declared) - classes} of them as background (or fail); set {key} "
                f"{len(declared)}"
            )
    if training and not data["images"]:
        raise ConfigError(f"{where}: no images: nothing to train on")
    elif training:
        ids = {im["id"] for im in data["images"]}
        if not any(a["image_id"] in ids and not a.get("iscrowd", 0) for a in annotations):
            raise ConfigError(
                f"{where}: none of its {len(ids)} images has an annotation (a box that is not "
                f"iscrowd): DATALOADER.FILTER_EMPTY_ANNOTATIONS would remove them all, and "
                f"without it there is nothing to learn"
            )


def _check_images(where, images):
    keys = ("id", "file_name", "width", "height")
    bad = [
        f"image entry {im!r} is not an object"
        if not isinstance(im, dict)
        else f"image id {im.get('id')!r} ({im.get('file_name', 'no file_name')}) lacks "
        f"{', '.join(k for k in keys if k not in im)}"
        for im in images
        if not isinstance(im, dict) or not all(k in im for k in keys)
    ]
    if bad:
        raise ConfigError(
            f"{where}: {bad[0]}{_and_more(bad, 'images')}; each image needs id, "
            "file_name, width and height"
        )
    sizes = [
        f"image id {im['id']!r} ({im['file_name']}) has width {im['width']!r}, height "
        f"{im['height']!r}"
        for im in images
        if not all(isinstance(im[k], int) and im[k] > 0 for k in ("width", "height"))
    ]
    if sizes:
        raise ConfigError(
            f"{where}: {sizes[0]}{_and_more(sizes, 'images')}; allowed whole numbers of pixels > 0"
        )
    files = {}
    for im in images:
        files.setdefault(im["id"], []).append(im["file_name"])
    shared = [(i, f) for i, f in files.items() if len(f) > 1]
    if shared:
        i, names = shared[0]
        more = f" (and {len(shared) - 1} more ids)" if len(shared) > 1 else ""
        raise ConfigError(
            f"{where}: image id {i!r} is used by {len(names)} images "
            f"({', '.join(names[:3])}){more}; annotations find their image by id, so "
            "each image needs its own"
        )


def _check_annotations(where, annotations):
    bad = [
        f"annotation id {a.get('id')!r} of image id {a.get('image_id')!r}"
        for a in annotations
        if not (
            "id" in a
            and "image_id" in a
            and isinstance(a.get("bbox"), list)
            and len(a["bbox"]) == 4
            and all(isinstance(v, (int, float)) for v in a["bbox"])
        )
    ]
    if bad:
        raise ConfigError(
            f"{where}: {bad[0]}{_and_more(bad, 'annotations')} lacks an id, an "
            "image_id or a bbox of 4 numbers"
        )
    infinite = [a for a in annotations if not all(math.isfinite(v) for v in a["bbox"])]
    if infinite:
        raise ConfigError(
            f"{where}: annotation id {infinite[0]['id']!r} of image id {infinite[0]['image_id']!r} "
            f"has bbox {infinite[0]['bbox']}{_and_more(infinite, 'annotations')}: allowed "
            "finite numbers"
        )
    seen, shared = set(), []
    for a in annotations:
        if a["id"] in seen:
            shared.append(a["id"])
        seen.add(a["id"])
    if shared:
        more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
        raise ConfigError(
            f"{where}: annotation id {shared[0]!r} is used more than once{more}; "
            "detectron2 requires each annotation to have its own id"
        )


def check_datasets(cfg, train=True, num_classes=None):
    """
    At start-up, for every dataset in DATASETS.TRAIN (unless ``train`` is False: evaluation only)
    and DATASETS.TEST: it is registered; if it is a COCO-format one, its JSON and image folder
    exist and the JSON is sound; if it is a YOLO, VOC-style or Pascal VOC folder, its files are
    sound (folders.py) and its class list is that of the config's other datasets; with
    ``num_classes`` (the detector's key and value, e.g. ("MODEL.RETINANET.NUM_CLASSES", 80)), it
    has no more classes than that. Raises ConfigError naming the key, the dataset and the file.
    Reads each JSON once (COCO train: ~0.5 GB, some seconds); call it in one process, not in
    every worker.
    """
    keys = [("DATASETS.TRAIN", cfg.DATASETS.TRAIN)] if train else []
    for key, names in keys + [("DATASETS.TEST", cfg.DATASETS.TEST)]:
        for name in names:
            if name not in DatasetCatalog.list():
                raise ConfigError(
                    f"{key}: dataset {name!r} is not registered. Use an embedded one "
                    f"({', '.join(n + '_train/_val' for n in EMBEDDED_DATASETS)}), a detectron2 "
                    "builtin such as coco_2017_train or voc_2007_trainval, or add yours with "
                    "DATASETS.COCO_JSON, DATASETS.YOLO or DATASETS.VOC_STYLE (datasets/README.md)"
                )
            base = name.rsplit("_", 1)[0]
            if base in EMBEDDED_DATASETS:
                ensure_shapes_dataset(base)
                classes = len(MetadataCatalog.get(name).thing_classes)
                if num_classes and classes > num_classes[1]:
                    raise ConfigError(
                        f"{key}: dataset {name!r} has {classes} classes, but "
                        f"{num_classes[0]} is {num_classes[1]}: set it to {classes}"
                    )
                if num_classes and classes < num_classes[1] and key == "DATASETS.TRAIN":
                    # an embedded dataset's class list is fixed: classes beyond it never have an
                    # instance and only add easy negatives, i.e. change the imbalance under study
                    raise ConfigError(
                        f"{key}: dataset {name!r} has {classes} classes, but "
                        f"{num_classes[0]} is {num_classes[1]}: the other "
                        f"{num_classes[1] - classes} would have no instance and only add "
                        f"negatives; set it to {classes}"
                    )
                continue
            meta = MetadataCatalog.get(name)
            if meta.get(FOLDER_FORMAT) or meta.get("evaluator_type") == "pascal_voc":
                _check_folder_dataset(cfg, key, name, num_classes)
                continue
            json_file, image_root = meta.get("json_file"), meta.get("image_root")
            if json_file is None:
                continue  # not a COCO-JSON dataset: nothing we know how to check
            if not os.path.isfile(json_file):
                raise ConfigError(
                    f"{key}: dataset {name!r}: annotation file {json_file} does not "
                    "exist (COCO goes under $DETECTRON2_DATASETS/coco: see "
                    "datasets/README.md)"
                )
            if image_root and not os.path.isdir(image_root):
                raise ConfigError(
                    f"{key}: dataset {name!r}: image folder {image_root} does not exist"
                )
            check_coco_json(json_file, name, num_classes, training=key == "DATASETS.TRAIN")


def _check_folder_dataset(cfg, key, name, num_classes):
    """A YOLO, VOC-style or Pascal VOC dataset of ``key``: its files read as training will read
    them (folders.py: one ConfigError naming the file and line), no more classes than the
    detector's, the class list of the config's other datasets, and something to train on."""
    meta = MetadataCatalog.get(name)
    classes = list(meta.thing_classes)
    if meta.get(FOLDER_FORMAT) == "yolo":
        objects = sum(len(d["annotations"]) for d in DatasetCatalog.get(name))  # reads every file
    else:  # detectron2's load_voc_instances and Pascal VOC evaluation read the XMLs
        objects = check_voc_folder(
            meta.dirname, meta.split, classes, name, evaluation=key == "DATASETS.TEST"
        )[1]
    if num_classes and len(classes) > num_classes[1]:
        raise ConfigError(
            f"{key}: dataset {name!r} has {len(classes)} classes, but "
            f"{num_classes[0]} is {num_classes[1]}: set it to {len(classes)}"
        )
    for other in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        theirs = (
            MetadataCatalog.get(other).get("thing_classes")
            if other in DatasetCatalog.list()
            else None
        )
        if theirs is not None and list(theirs) != classes:
            raise ConfigError(
                f"{key}: dataset {name!r} has classes {_few(classes)} but {other!r} "
                f"has {_few(theirs)}: a class index would mean another class in "
                "one of them; give both the same class list"
            )
    if key == "DATASETS.TRAIN" and not objects:
        raise ConfigError(
            f"{key}: dataset {name!r} has no object in any image: "
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS would remove them all, and without "
            "it there is nothing to learn"
        )


def _few(names):
    names = list(names)
    return ", ".join(names[:6]) + (f" (and {len(names) - 6} more)" if len(names) > 6 else "")
