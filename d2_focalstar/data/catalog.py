"""
The datasets' names in detectron2's catalogs: the embedded shapes datasets (``<name>_train``,
``<name>_val``, generated on first use), registered when the package is imported, and those that
a config names in DATASETS.COCO_JSON (COCO-format), DATASETS.YOLO and DATASETS.VOC_STYLE
(folders: ``folders.py``), registered from the config (``register_config_datasets``).
"""

import json
import os
import tempfile

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_pascal_voc

from ..config import ConfigError
from .folders import VOC_STYLE_YEAR, load_yolo_folder, read_class_names, voc_style_classes
from .shapes import EMBEDDED_DATASETS, dataset_root, ensure_shapes_dataset

__all__ = [
    "register_embedded_datasets",
    "register_config_datasets",
    "register_coco_json_datasets",
    "register_yolo_datasets",
    "register_voc_style_datasets",
    "FOLDER_FORMAT",
]

#: The metadata key that marks a dataset of DATASETS.YOLO ("yolo") or DATASETS.VOC_STYLE
#: ("voc_style"), for the start-up checks (checks.py).
FOLDER_FORMAT = "folder_format"

#: Annotation keys of a COCO JSON kept beside detectron2's, for TEST.SAFETY.SETUP.
SAFETY_ANNOTATION_KEYS = ("vis_ratio",)


def load_pedestrian_aware_coco_json(json_file, image_root, dataset_name):
    """
    detectron2's ``load_coco_json``, keeping CityPersons' per-annotation "vis_ratio" and reading
    its "ignore" flag (ignore regions, riders, groups) as COCO's "iscrowd": detectron2 refuses
    "ignore" with an assertion, and "iscrowd" is what it leaves out of training targets and what
    the safety setups ignore. The file itself is not changed.
    """
    with open(json_file, "rb") as f:
        has_ignore = b'"ignore"' in f.read()
    if not has_ignore:
        return load_coco_json(
            json_file, image_root, dataset_name, extra_annotation_keys=list(SAFETY_ANNOTATION_KEYS)
        )
    with open(json_file, "rb") as f:
        data = json.load(f)
    for a in data.get("annotations", []):
        if isinstance(a, dict) and a.pop("ignore", 0):
            a["iscrowd"] = 1
    with tempfile.TemporaryDirectory() as tmp:
        folded = os.path.join(tmp, os.path.basename(json_file))
        with open(folded, "w") as f:
            json.dump(data, f)
        return load_coco_json(
            folded, image_root, dataset_name, extra_annotation_keys=list(SAFETY_ANNOTATION_KEYS)
        )


def register_embedded_datasets(root=None):
    """Register ``<name>_train`` / ``<name>_val`` for every embedded dataset (generated lazily)."""
    root = root or dataset_root()
    for name in EMBEDDED_DATASETS:
        folder = os.path.join(root, name)
        for split in ("train", "val"):
            dataset_name = f"{name}_{split}"
            if dataset_name in DatasetCatalog.list():
                continue
            json_file = os.path.join(folder, f"{split}.json")
            image_root = os.path.join(folder, split)

            def load(
                name=name,
                root=root,
                json_file=json_file,
                image_root=image_root,
                dataset_name=dataset_name,
            ):
                ensure_shapes_dataset(name, root)
                return load_coco_json(json_file, image_root, dataset_name)

            DatasetCatalog.register(dataset_name, load)
            MetadataCatalog.get(dataset_name).set(
                json_file=json_file,
                image_root=image_root,
                evaluator_type="coco",
                thing_classes=EMBEDDED_DATASETS[name].class_names(),
            )


def register_coco_json_datasets(cfg):
    """Register each [name, json_file, image_root] of DATASETS.COCO_JSON (a COCO-format dataset)."""
    for i, (name, json_file, image_root) in enumerate(cfg.DATASETS.COCO_JSON):
        key = f"DATASETS.COCO_JSON[{i}]"
        if not os.path.isfile(json_file):
            raise ConfigError(f"{key}: json_file {json_file!r} of dataset {name!r} does not exist")
        if not os.path.isdir(image_root):
            raise ConfigError(
                f"{key}: image_root {image_root!r} of dataset {name!r} is not a folder"
            )
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue  # registered by an earlier setup() in this process
            raise ConfigError(
                f"{key}: dataset name {name!r} is already registered "
                "(a detectron2 builtin or another entry): choose another name"
            )
        # As register_coco_instances, reading pedestrian benchmarks' annotations too.
        DatasetCatalog.register(
            name, lambda j=json_file, r=image_root, n=name: load_pedestrian_aware_coco_json(j, r, n)
        )
        MetadataCatalog.get(name).set(
            json_file=json_file, image_root=image_root, evaluator_type="coco"
        )


def register_config_datasets(cfg: CfgNode) -> None:
    """Register the datasets of DATASETS.COCO_JSON, DATASETS.YOLO and DATASETS.VOC_STYLE (each
    process does: catalogs are per process; again in one process is fine)."""
    register_coco_json_datasets(cfg)
    register_yolo_datasets(cfg)
    register_voc_style_datasets(cfg)


def _registered_before(name, key, **metadata):
    """True where an earlier setup() in this process registered ``name`` with this metadata;
    ConfigError where another dataset has the name."""
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    if all(meta.get(k) == v for k, v in metadata.items()):
        return True
    raise ConfigError(
        f"{key}: dataset name {name!r} is already registered "
        "(a detectron2 builtin or another entry): choose another name"
    )


def register_yolo_datasets(cfg: CfgNode) -> None:
    """Register each [name, images_dir, labels_dir, names] of DATASETS.YOLO (folders.py:
    load_yolo_folder; evaluated by detectron2's COCOEvaluator, which converts the dicts)."""
    for i, (name, images_dir, labels_dir, names) in enumerate(cfg.DATASETS.YOLO):
        key = f"DATASETS.YOLO[{i}]"
        for what, folder in (("images_dir", images_dir), ("labels_dir", labels_dir)):
            if not os.path.isdir(folder):
                raise ConfigError(f"{key}: {what} {folder!r} of dataset {name!r} is not a folder")
        classes = read_class_names(names, f"{key}: names of dataset {name!r}")
        metadata = {
            FOLDER_FORMAT: "yolo",
            "yolo_images_dir": images_dir,
            "yolo_labels_dir": labels_dir,
            "thing_classes": classes,
        }
        if _registered_before(name, key, **metadata):
            continue
        DatasetCatalog.register(
            name,
            lambda images=images_dir, labels=labels_dir, c=classes, n=name: load_yolo_folder(
                images, labels, c, n
            ),
        )
        MetadataCatalog.get(name).set(evaluator_type="coco", **metadata)


def register_voc_style_datasets(cfg: CfgNode) -> None:
    """Register each [name, root, image_set(, classes)] of DATASETS.VOC_STYLE with detectron2's
    register_pascal_voc (its load_voc_instances; evaluated by its PascalVOCDetectionEvaluator,
    VOC2010+ all-point AP). Without classes, the sorted object names of root/Annotations/*.xml."""
    for i, (name, root, image_set, *classes) in enumerate(cfg.DATASETS.VOC_STYLE):
        key = f"DATASETS.VOC_STYLE[{i}]"
        for sub in ("Annotations", "JPEGImages"):
            if not os.path.isdir(os.path.join(root, sub)):
                raise ConfigError(
                    f"{key}: root {root!r} of dataset {name!r} has no {sub} folder "
                    "(root/Annotations/*.xml, root/JPEGImages/*.jpg, "
                    "root/ImageSets/Main/<image_set>.txt)"
                )
        set_file = os.path.join(root, "ImageSets", "Main", image_set + ".txt")
        if not os.path.isfile(set_file):
            raise ConfigError(f"{key}: image set {set_file} of dataset {name!r} does not exist")
        names = (
            read_class_names(classes[0], f"{key}: classes of dataset {name!r}")
            if classes
            else voc_style_classes(root, name)
        )
        metadata = {
            FOLDER_FORMAT: "voc_style",
            "dirname": root,
            "split": image_set,
            "thing_classes": names,
        }
        if _registered_before(name, key, **metadata):
            continue
        register_pascal_voc(name, root, image_set, VOC_STYLE_YEAR, names)
        MetadataCatalog.get(name).set(evaluator_type="pascal_voc", **{FOLDER_FORMAT: "voc_style"})
