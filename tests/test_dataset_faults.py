"""Broken datasets, for real: start-up errors that name the file, and per-image faults that are
skipped, clipped or filtered with one warning per kind and a count at the end."""

import json
import logging
import os
import re

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from d2_focalstar.config import ConfigError
from d2_focalstar.data.catalog import register_coco_json_datasets
from d2_focalstar.data.checks import check_coco_json, check_datasets
from d2_focalstar.data.mapper import CheckedDatasetMapper, summarize_data_faults
from d2_focalstar.data.shapes import ShapesSpec, generate_shapes_dataset
from d2_focalstar.run.cli import detector_classes
from d2_focalstar.run.results import RunRecordError, load_run, run_state
from helpers import FAST, QUICKSTART, assert_one_line_error, run, run_here
from test_model import quickstart_cfg

SPEC = ShapesSpec(
    num_train=12,
    num_val=2,
    image_size=96,
    min_objects=2,
    max_objects=4,
    min_size=12,
    max_size=24,
    seed=3,
)


def _write_json(path, data):
    path.write_text(json.dumps(data))


@pytest.fixture
def broken(tmp_path):
    """A COCO-format dataset with one image or box per kind of fault."""
    generate_shapes_dataset(tmp_path, SPEC)
    images = tmp_path / "train"
    data = json.loads((tmp_path / "train.json").read_text())
    f = [images / im["file_name"] for im in data["images"]]
    os.remove(f[0])  # missing
    f[1].write_bytes(f[1].read_bytes()[: f[1].stat().st_size * 2 // 5])  # truncated
    f[2].write_text("this is not an image")  # unreadable
    cv2.imwrite(str(f[3]), cv2.cvtColor(cv2.imread(str(f[3])), cv2.COLOR_BGR2GRAY))  # grayscale
    rgba = cv2.cvtColor(cv2.imread(str(f[4])), cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(f[4].with_suffix(".png")), rgba)  # RGBA
    cv2.imwrite(
        str(f[5].with_suffix(".png")),  # 16-bit gray
        cv2.imread(str(f[5]), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257,
    )
    for i in (4, 5):
        data["images"][i]["file_name"] = f[i].with_suffix(".png").name
    anns7 = [a for a in data["annotations"] if a["image_id"] == data["images"][6]["id"]]
    anns7[0]["bbox"][2] = 0  # zero width
    anns7[1]["bbox"][3] = -5  # negative height
    anns7.append(dict(anns7[0], id=10_000, bbox=[80, 80, 40, 40]))  # beyond the 96x96 image
    data["annotations"].append(anns7[-1])
    empty_id = data["images"][7]["id"]  # no annotations
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != empty_id]
    _write_json(tmp_path / "broken.json", data)
    return tmp_path


# ---- start-up ---------------------------------------------------------------------------------


def test_malformed_json_is_named_with_its_position(tmp_path):
    (tmp_path / "a.json").write_text('{"images": [], "categories": [\n  {"id": 1,}]}')
    with pytest.raises(ConfigError, match=r"a.json \(dataset 'x'\): not valid JSON: .* line 2"):
        check_coco_json(str(tmp_path / "a.json"), "x")


def test_json_that_is_not_coco_detection(tmp_path):
    _write_json(tmp_path / "a.json", {"images": []})
    with pytest.raises(ConfigError, match="a.json.*not a COCO detection file"):
        check_coco_json(str(tmp_path / "a.json"), "x")


def test_undeclared_category_id_is_named(broken):
    data = json.loads((broken / "train.json").read_text())
    data["annotations"][5]["category_id"] = 7
    _write_json(broken / "bad.json", data)
    with pytest.raises(
        ConfigError,
        match=r"bad.json.*1 annotations use a category_id .*"
        rf"annotation id {data['annotations'][5]['id']} with category_id 7",
    ):
        check_coco_json(str(broken / "bad.json"), "x")


@pytest.mark.parametrize(
    "fault,needle",
    [
        ("malformed", "not valid JSON"),
        ("category", "category_id that 'categories' does not declare"),
        ("no-json", "does not exist"),
        ("no-images", "is not a folder"),
    ],
)
def test_train_net_stops_at_start_up_naming_the_file(broken, fault, needle):
    json_file, image_root = broken / "train.json", broken / "train"
    if fault == "malformed":
        json_file = broken / "m.json"
        json_file.write_text((broken / "train.json").read_text()[:-10])
    elif fault == "category":
        data = json.loads((broken / "train.json").read_text())
        data["categories"] = data["categories"][:2]
        json_file = broken / "c.json"
        _write_json(json_file, data)
    elif fault == "no-json":
        json_file = broken / "absent.json"
    else:
        image_root = broken / "absent"
    name = f"mine_{fault.replace('-', '_')}"  # this process's catalog holds every case's dataset
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        *FAST,
        "DATASETS.COCO_JSON",
        str([[name, str(json_file), str(image_root)]]),
        "DATASETS.TRAIN",
        f"('{name}',)",
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train_net.py: error:") and needle in last
    assert str(json_file if fault != "no-images" else image_root) in last


def _duplicated_image_id(data):
    data["images"][1]["id"] = data["images"][0]["id"]  # one image would train with another's boxes


def _image_without_size(data):
    del data["images"][2]["width"]


def _one_category_too_many(data):
    data["categories"].append({"id": 99, "name": "hexagon", "supercategory": "shape"})


def _no_annotations(data):
    data["annotations"] = []


#: JSON that passed the start-up check and then trained wrong labels or crashed in training
SILENT_FAULTS = [
    (_duplicated_image_id, "image id 1 is used by 2 images"),
    (_image_without_size, "lacks width"),
    (_one_category_too_many, "5 categories, but MODEL.RETINANET.NUM_CLASSES is 4"),
    (_no_annotations, "none of its 12 images has an annotation"),
]


@pytest.mark.parametrize(
    "fault,needle", SILENT_FAULTS, ids=[f.__name__[1:] for f, _ in SILENT_FAULTS]
)
def test_json_that_would_train_wrong_labels_or_crash_is_named_at_start_up(broken, fault, needle):
    data = json.loads((broken / "train.json").read_text())
    fault(data)
    json_file = broken / "faulty.json"
    _write_json(json_file, data)
    opts = [
        "DATASETS.COCO_JSON",
        str([[f"mine_{fault.__name__}", str(json_file), str(broken / "train")]]),
        "DATASETS.TRAIN",
        f"('mine_{fault.__name__}',)",
    ]
    # the silently wrong ones, as a command
    if fault in (_duplicated_image_id, _one_category_too_many):
        proc = run_here("train_net.py", *QUICKSTART, *FAST, "SOLVER.MAX_ITER", "1", *opts)
        assert_one_line_error(proc, "train_net.py", str(json_file), needle)
        assert "Starting training" not in proc.output  # nothing ran
    else:  # train_net.py's start-up check, without a process each
        cfg = quickstart_cfg(*opts)
        register_coco_json_datasets(cfg)
        with pytest.raises(
            ConfigError,
            match=re.escape(f"{json_file} (dataset 'mine_{fault.__name__}'): ") + ".*" + needle,
        ):
            check_datasets(cfg)


def test_duplicated_ids_and_class_counts_name_what_is_wrong(broken):
    data = json.loads((broken / "train.json").read_text())
    _duplicated_image_id(data)
    _write_json(broken / "dup.json", data)
    first, second = (im["file_name"] for im in data["images"][:2])
    with pytest.raises(
        ConfigError,
        match=rf"image id {data['images'][0]['id']} is used by 2 images \({first}, {second}\)",
    ):
        check_coco_json(str(broken / "dup.json"), "x")
    data = json.loads((broken / "train.json").read_text())
    _one_category_too_many(data)
    _write_json(broken / "five.json", data)
    check_coco_json(str(broken / "five.json"), "x", ("MODEL.FCOS.NUM_CLASSES", 5))
    with pytest.raises(ConfigError, match="set MODEL.FCOS.NUM_CLASSES 5"):
        check_coco_json(str(broken / "five.json"), "x", ("MODEL.FCOS.NUM_CLASSES", 4))
    with pytest.raises(
        ConfigError,
        match="focalstar_shapes_train' has 4 classes, but MODEL.RETINANET.NUM_CLASSES is 3",
    ):
        cfg = quickstart_cfg("MODEL.RETINANET.NUM_CLASSES", "3")  # the embedded dataset
        check_datasets(cfg, num_classes=detector_classes(cfg))  # as train_net.py checks it


def test_a_bad_test_image_is_named_and_a_finished_training_keeps_its_model_and_record(
    broken, tmp_path
):
    """The evaluation at the end of a training meets a truncated test image: one line naming it,
    model_final.pth and results.json (recording the error) kept; an evaluation in two processes
    meeting it (and a missing one) is one line too."""
    val = json.loads((broken / "val.json").read_text())
    truncated, missing = (broken / "val" / im["file_name"] for im in val["images"][:2])
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) * 2 // 5])
    test_set = [
        "DATASETS.COCO_JSON",
        str([["bad_val", str(broken / "val.json"), str(broken / "val")]]),
        "DATASETS.TEST",
        "('bad_val',)",
    ]
    out = tmp_path / "out"
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        *FAST,
        *test_set,
        "SOLVER.MAX_ITER",
        "1",
        "OUTPUT_DIR",
        str(out),
    )
    assert_one_line_error(
        proc,
        "train_net.py",
        f"test image {truncated}: image truncated or corrupt",
        f"{out / 'model_final.pth'} and {out / 'results.json'}",
        "with --resume evaluates it",
    )
    record = json.loads((out / "results.json").read_text())
    assert str(truncated) in record["evaluation_error"] and record["iteration"] == 1
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 0
    # not a finished run for a sweep (it resumes it) or a comparison (it names it and goes on)
    assert run_state(str(out)) == "interrupted"
    with pytest.raises(RunRecordError, match="evaluation failed.*--resume evaluates it"):
        load_run(str(out))
    truncated.write_bytes(whole)  # fixed: the same command with --resume completes the record
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        "--resume",
        *FAST,
        *test_set,
        "SOLVER.MAX_ITER",
        "1",
        "OUTPUT_DIR",
        str(out),
    )
    assert proc.returncode == 0, proc.output[-2000:]
    record = load_run(str(out))
    assert "evaluation_error" not in record and record["iteration"] == 1
    assert "AP" in record["results"]["bbox"]  # evaluated (a 1-iteration model: AP may be None)
    os.remove(missing)
    proc = run(
        "train_net.py",
        *QUICKSTART,
        "--eval-only",
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        *test_set,
        "DATALOADER.NUM_WORKERS",
        "1",
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
    )
    assert_one_line_error(proc, "train_net.py", "test image ")
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{truncated}: image truncated or corrupt" in last or f"{missing}: image missing" in last


def test_evaluation_only_does_not_need_the_training_set(broken):
    """--eval-only checks DATASETS.TEST alone: someone with only COCO val2017 can evaluate (and
    the ~0.5 GB train JSON is not parsed for nothing)."""
    # registered the way detectron2 registers its builtin COCO splits, JSON not on disk
    name = f"gone_train_{os.getpid()}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        json_file=str(broken / "absent.json"), image_root=str(broken / "train")
    )
    cfg = quickstart_cfg("DATASETS.TRAIN", f"('{name}',)")
    with pytest.raises(ConfigError, match="DATASETS.TRAIN.*absent.json does not exist"):
        check_datasets(cfg)
    check_datasets(cfg, train=False)


# ---- per image --------------------------------------------------------------------------------


def test_mapper_handles_each_kind_of_image_and_box_fault(broken, caplog):
    dicts = load_coco_json(str(broken / "broken.json"), str(broken / "train"), "broken_unit")
    log = broken / "faults.jsonl"
    cfg = quickstart_cfg(
        "INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96"
    )
    mapper = CheckedDatasetMapper(cfg, True, str(log))
    with caplog.at_level(logging.WARNING):
        out = [mapper(dict(d)) for d in dicts]
        out += [mapper(dict(d)) for d in dicts[:3]]  # the same bad files again: no new warning
    assert [o is None for o in out[:8]] == [True, True, True, False, False, True, False, False]
    for o in (out[3], out[4]):  # grayscale and RGBA read as 3-channel images
        assert o["image"].shape == (3, 96, 96)
    boxes = out[6]["instances"].gt_boxes.tensor
    n_anns = len(dicts[6]["annotations"])
    assert len(boxes) == n_anns - 2  # the two degenerate boxes removed, the outside one kept...
    assert boxes.max() <= 96  # ...and clipped to the image
    assert len(out[7]["instances"]) == 0  # no annotations: an all-background image

    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data fault")]
    kinds = [
        "image missing",
        "image truncated or corrupt",
        "image unreadable",
        "16-bit image",
        "grayscale, palette, RGBA",
        "box of zero or negative size",
        "box outside the image",
    ]
    for kind in kinds:
        assert sum(kind in w for w in warnings) == 1, (kind, warnings)
    counts = summarize_data_faults(str(log))
    assert counts == {
        "16-bit image (skipped; convert it to 8 bits)": 1,
        "box of zero or negative size (removed)": 1,
        "box outside the image (clipped)": 1,
        "grayscale, palette, RGBA or CMYK image (read as RGB)": 2,
        "image missing (skipped)": 1,
        "image truncated or corrupt (skipped)": 1,
        "image unreadable (skipped)": 1,
    }


def test_training_on_a_broken_dataset_completes_and_counts_faults(broken, tmp_path):
    out = tmp_path / "out"
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        *FAST,
        "DATALOADER.NUM_WORKERS",
        "2",
        "DATASETS.COCO_JSON",
        str([["broken_train", str(broken / "broken.json"), str(broken / "train")]]),
        "DATASETS.TRAIN",
        "('broken_train',)",
        "SOLVER.MAX_ITER",
        "12",
        "OUTPUT_DIR",
        str(out),
        check=True,
    )
    assert "Removed 1 images with no usable annotations" in proc.output
    assert os.path.isfile(out / "model_final.pth")
    summary = [line for line in proc.output.splitlines() if "Data faults during training" in line]
    for kind in ("image missing", "image truncated", "image unreadable", "16-bit image"):
        assert sum(kind in line for line in summary) == 1, summary
