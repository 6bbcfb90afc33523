"""The embedded dataset and the registration of COCO-format datasets from the config."""

import filecmp
import json
import multiprocessing as mp
import os
import stat

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
from detectron2.modeling import build_model
from pycocotools.coco import COCO

from d2_focalstar import add_focalstar_config, register_coco_json_datasets
from d2_focalstar.config import ConfigError
from d2_focalstar.data.shapes import (
    EMBEDDED_DATASETS,
    SHAPE_CLASSES,
    ShapesSpec,
    ensure_shapes_dataset,
    generate_shapes_dataset,
)
from test_model import quickstart_cfg

TINY = ShapesSpec(
    num_train=6,
    num_val=3,
    image_size=96,
    min_objects=2,
    max_objects=5,
    min_size=10,
    max_size=24,
    seed=7,
)


def test_generation_is_deterministic(tmp_path):
    generate_shapes_dataset(tmp_path / "a", TINY)
    generate_shapes_dataset(tmp_path / "b", TINY)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.json").read_text() == (
            tmp_path / "b" / f"{split}.json"
        ).read_text()
        names = sorted(os.listdir(tmp_path / "a" / split))
        assert len(names) == {"train": 6, "val": 3}[split]
        _, mismatch, errors = filecmp.cmpfiles(
            tmp_path / "a" / split, tmp_path / "b" / split, names, shallow=False
        )
        assert not mismatch and not errors
    other = ShapesSpec(**{**TINY.__dict__, "seed": 8})
    generate_shapes_dataset(tmp_path / "c", other)
    assert (tmp_path / "a" / "train.json").read_text() != (
        tmp_path / "c" / "train.json"
    ).read_text()


def test_generated_json_is_valid_coco_with_boxes_inside_images(tmp_path):
    generate_shapes_dataset(tmp_path, TINY)
    coco = COCO(str(tmp_path / "train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == SHAPE_CLASSES
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert 1 <= len(anns) <= TINY.max_objects
        for a in anns:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            assert TINY.min_size - 1 <= w <= TINY.max_size + 1
        pixels = detection_utils.read_image(str(tmp_path / "train" / img["file_name"]), "BGR")
        assert pixels.shape == (img["height"], img["width"], 3)


def _ensure(args):
    name, root = args
    return ensure_shapes_dataset(name, root)


def test_concurrent_first_use_generates_one_complete_copy(tmp_path, monkeypatch):
    monkeypatch.setitem(EMBEDDED_DATASETS, "tiny_shapes", TINY)
    with mp.get_context("fork").Pool(3) as pool:
        folders = pool.map(_ensure, [("tiny_shapes", str(tmp_path))] * 3)
    assert len(set(folders)) == 1
    assert sorted(os.listdir(tmp_path)) == ["tiny_shapes"]  # no temporary folder left behind
    assert len(json.loads((tmp_path / "tiny_shapes" / "val.json").read_text())["images"]) == 3


def test_generated_dataset_folder_has_the_usual_permissions(tmp_path, monkeypatch):
    """Not mkdtemp's owner-only mode: another user of a shared machine reads it as any folder."""
    monkeypatch.setitem(EMBEDDED_DATASETS, "tiny_shapes", TINY)
    folder = ensure_shapes_dataset("tiny_shapes", str(tmp_path))
    os.mkdir(tmp_path / "plain")
    assert stat.S_IMODE(os.stat(folder).st_mode) == stat.S_IMODE(
        os.stat(tmp_path / "plain").st_mode
    )


def test_embedded_dataset_is_registered_and_foreground_anchors_are_rare():
    dicts = DatasetCatalog.get("focalstar_shapes_val")
    spec = EMBEDDED_DATASETS["focalstar_shapes"]
    assert len(dicts) == spec.num_val
    meta = MetadataCatalog.get("focalstar_shapes_val")
    assert meta.thing_classes == SHAPE_CLASSES and meta.evaluator_type == "coco"
    assert os.path.isfile(meta.json_file)

    # Label the quickstart model's anchors on a few images: foreground must be a tiny fraction.
    from detectron2.structures import Boxes, BoxMode, Instances

    model = build_model(quickstart_cfg())
    s = spec.image_size
    feats = {
        f: torch.zeros(1, 1, s // st, s // st)
        for f, st in zip(model.head_in_features, (8, 16, 32, 64, 128))
    }
    anchors = model.anchor_generator([feats[f] for f in model.head_in_features])
    fg, total = 0, 0
    for d in dicts[:16]:
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]
        ]
        inst = Instances(
            (s, s),
            gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
            gt_classes=torch.tensor([a["category_id"] for a in d["annotations"]]),
        )
        labels, _ = model.label_anchors(anchors, [inst])
        fg += ((labels[0] >= 0) & (labels[0] != 4)).sum().item()
        total += labels[0].numel()
        assert ((labels[0] >= 0) & (labels[0] != 4)).sum() >= len(boxes)  # every object matched
    assert 0 < fg / total < 0.01


def _coco_cfg(*entries):
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.DATASETS.COCO_JSON = [list(e) for e in entries]
    return cfg


def test_coco_json_dataset_from_config_is_registered(tmp_path):
    generate_shapes_dataset(tmp_path, TINY)
    cfg = _coco_cfg(("my_val", str(tmp_path / "val.json"), str(tmp_path / "val")))
    register_coco_json_datasets(cfg)
    register_coco_json_datasets(cfg)  # a second setup() in the same process is fine
    dicts = DatasetCatalog.get("my_val")
    assert len(dicts) == 3 and all(os.path.isfile(d["file_name"]) for d in dicts)
    assert MetadataCatalog.get("my_val").thing_classes == SHAPE_CLASSES


@pytest.mark.parametrize("broken,needle", [("json", "json_file"), ("images", "image_root")])
def test_coco_json_missing_file_is_named(tmp_path, broken, needle):
    generate_shapes_dataset(tmp_path, TINY)
    json_file = str(tmp_path / ("nope.json" if broken == "json" else "val.json"))
    image_root = str(tmp_path / ("nope" if broken == "images" else "val"))
    with pytest.raises(ConfigError, match=rf"DATASETS.COCO_JSON\[0\]: {needle} .*nope"):
        register_coco_json_datasets(_coco_cfg(("broken_" + broken, json_file, image_root)))


def test_coco_json_name_clash_with_builtin_is_refused(tmp_path):
    generate_shapes_dataset(tmp_path, TINY)
    cfg = _coco_cfg(("coco_2017_val", str(tmp_path / "val.json"), str(tmp_path / "val")))
    with pytest.raises(ConfigError, match="coco_2017_val.*already registered"):
        register_coco_json_datasets(cfg)
