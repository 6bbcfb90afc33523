"""
The datasets' names in detectron2's catalogs: the embedded shapes datasets (``<name>_train``,
``<name>_val``, generated on first use), registered when the package is imported, and the
COCO-format datasets that a config names in DATASETS.COCO_JSON, registered from the config.
"""
import json
import os
import tempfile

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..config import ConfigError
from .shapes import EMBEDDED_DATASETS, dataset_root, ensure_shapes_dataset

__all__ = ["register_embedded_datasets", "register_coco_json_datasets"]


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
        return load_coco_json(json_file, image_root, dataset_name,
                              extra_annotation_keys=list(SAFETY_ANNOTATION_KEYS))
    with open(json_file, "rb") as f:
        data = json.load(f)
    for a in data.get("annotations", []):
        if isinstance(a, dict) and a.pop("ignore", 0):
            a["iscrowd"] = 1
    with tempfile.TemporaryDirectory() as tmp:
        folded = os.path.join(tmp, os.path.basename(json_file))
        with open(folded, "w") as f:
            json.dump(data, f)
        return load_coco_json(folded, image_root, dataset_name,
                              extra_annotation_keys=list(SAFETY_ANNOTATION_KEYS))


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

            def load(name=name, root=root, json_file=json_file, image_root=image_root,
                     dataset_name=dataset_name):
                ensure_shapes_dataset(name, root)
                return load_coco_json(json_file, image_root, dataset_name)

            DatasetCatalog.register(dataset_name, load)
            MetadataCatalog.get(dataset_name).set(
                json_file=json_file, image_root=image_root, evaluator_type="coco",
                thing_classes=EMBEDDED_DATASETS[name].class_names())


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
        # As register_coco_instances, reading pedestrian benchmarks' annotations too.
        DatasetCatalog.register(name, lambda j=json_file, r=image_root, n=name:
                                load_pedestrian_aware_coco_json(j, r, n))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                      evaluator_type="coco")
