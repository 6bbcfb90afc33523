"""Datasets as users have them, by config alone: Pascal VOC through detectron2's builtin names,
YOLO folders (DATASETS.YOLO) and VOC-style folders (DATASETS.VOC_STYLE), on tiny folders these
tests write. Each registers, trains 2 iterations and is evaluated by its own evaluator through
train_net.py; each bad input is one line naming the file (and line) and the problem."""

import json
import os
import re
import shutil

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image, ImageDraw

from d2_focalstar.config import ConfigError
from d2_focalstar.data.catalog import register_config_datasets
from d2_focalstar.data.checks import check_datasets
from d2_focalstar.evaluation import EvaluatorTypeError, build_dataset_evaluator, evaluator_type_of
from d2_focalstar.run.results import load_run, run_state
from d2_focalstar.study.tables import comparison_rows, metrics_of
from helpers import REPO, assert_one_line_error, run_here
from test_model import quickstart_cfg

SIZE = 64  # pixels, square images
# boxes (class, x0, y0, x1, y1) in pixels of each image; the last image has none
OBJECTS = [
    [(0, 8, 10, 40, 50)],
    [(1, 20, 4, 60, 30), (0, 2, 30, 22, 62)],
    [(1, 10, 10, 50, 50)],
    [],
]
# 2 iterations of the quickstart's small model at 64 pixels, evaluated with every detection kept
TINY = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.RESNETS.NORM",
    "BN",
    "MODEL.BACKBONE.FREEZE_AT",
    "0",
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.RETINANET.NUM_CONVS",
    "1",
    "MODEL.RETINANET.SCORE_THRESH_TEST",
    "0.0",
    "INPUT.MIN_SIZE_TRAIN",
    f"({SIZE},)",
    "INPUT.MAX_SIZE_TRAIN",
    str(SIZE),
    "INPUT.MIN_SIZE_TEST",
    str(SIZE),
    "INPUT.MAX_SIZE_TEST",
    str(SIZE),
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "1",
    "DATALOADER.NUM_WORKERS",
    "0",
    "TEST.SAFETY.CLASSES",
    "['person']",
]


def _image(path, objects, size=(SIZE, SIZE)):
    image = Image.new("RGB", size, (90, 90, 90))
    draw = ImageDraw.Draw(image)
    for c, x0, y0, x1, y1 in objects:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(220, 40, 40) if c == 0 else (40, 40, 220))
    image.save(path)


def yolo_folder(root, names=("person", "car")):
    """root/images/*.jpg, root/labels/*.txt (normalised cx cy w h), root/classes.txt."""
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    for i, objects in enumerate(OBJECTS):
        _image(root / "images" / f"im{i}.jpg", objects)
        lines = [
            f"{c} {(x0 + x1) / 2 / SIZE:.6f} {(y0 + y1) / 2 / SIZE:.6f} {(x1 - x0) / SIZE:.6f} "
            f"{(y1 - y0) / SIZE:.6f}"
            for c, x0, y0, x1, y1 in objects
        ]
        (root / "labels" / f"im{i}.txt").write_text("".join(line + "\n" for line in lines))
    (root / "classes.txt").write_text("".join(n + "\n" for n in names))
    return root


def _xml(fileid, objects, classes, size=SIZE):
    parts = [
        f"<annotation><filename>{fileid}.jpg</filename><size><width>{size}</width>"
        f"<height>{size}</height><depth>3</depth></size>"
    ]
    for c, x0, y0, x1, y1 in objects:  # VOC: 1-based pixels
        parts.append(
            f"<object><name>{classes[c]}</name><pose>Unspecified</pose><truncated>0"
            f"</truncated><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>"
            f"{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>\n"


def voc_folder(
    root, classes=("person", "car"), splits=(("trainval", [0, 1, 2, 3]), ("test", [0, 1, 2]))
):
    """root/Annotations/*.xml, root/JPEGImages/*.jpg, root/ImageSets/Main/<split>.txt."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(root / sub)
    for i, objects in enumerate(OBJECTS):
        _image(root / "JPEGImages" / f"{i:06d}.jpg", objects)
        (root / "Annotations" / f"{i:06d}.xml").write_text(_xml(f"{i:06d}", objects, classes))
    for split, ids in splits:
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(
            "".join(f"{i:06d}\n" for i in ids)
        )
    return root


def _config(tmp_path, name, datasets):
    """A config file of the quickstart's model that names a folder dataset's train and test."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f'_BASE_: "{os.path.join(REPO, "configs", "quickstart_flstar.yaml")}"\n'
        f"MODEL:\n  RETINANET:\n    NUM_CLASSES: 2\n{datasets}"
        f'OUTPUT_DIR: "{tmp_path / "out"}"\n'
    )
    return str(path)


def _train(config_file, *opts):
    proc = run_here("train_net.py", "--config-file", config_file, *TINY, *opts)
    assert proc.returncode == 0, proc.output[-5000:]
    return proc


def _results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)["results"]


# registration


def test_a_yolo_folder_registers_with_absolute_boxes_and_its_names(tmp_path):
    root = yolo_folder(tmp_path / "y")
    cfg = quickstart_cfg(
        "DATASETS.YOLO",
        str([["y_reg", str(root / "images"), str(root / "labels"), str(root / "classes.txt")]]),
    )
    register_config_datasets(cfg)
    register_config_datasets(cfg)  # a second setup() in the same process is fine
    meta = MetadataCatalog.get("y_reg")
    assert meta.thing_classes == ["person", "car"] and meta.evaluator_type == "coco"
    dicts = DatasetCatalog.get("y_reg")
    assert [os.path.basename(d["file_name"]) for d in dicts] == [f"im{i}.jpg" for i in range(4)]
    assert all((d["width"], d["height"]) == (SIZE, SIZE) for d in dicts)
    for d, objects in zip(dicts, OBJECTS):
        assert [a["category_id"] for a in d["annotations"]] == [o[0] for o in objects]
        for a, o in zip(d["annotations"], objects):
            assert a["bbox"] == pytest.approx(o[1:], abs=1e-3)
    assert dicts[3]["annotations"] == []  # an empty label file: an image without objects


@pytest.mark.parametrize("names", ["person,car", "data.yaml-list", "data.yaml-dict"])
def test_yolo_names_come_from_a_list_or_a_data_yaml(tmp_path, names):
    root = yolo_folder(tmp_path / "y")
    if names.startswith("data.yaml"):
        listed = "[person, car]" if names.endswith("list") else "{0: person, 1: car}"
        (root / "data.yaml").write_text(f"path: .\ntrain: images\nnames: {listed}\n")
        names = str(root / "data.yaml")
    name = f"y_names_{abs(hash(names))}"
    register_config_datasets(
        quickstart_cfg(
            "DATASETS.YOLO", str([[name, str(root / "images"), str(root / "labels"), names]])
        )
    )
    assert MetadataCatalog.get(name).thing_classes == ["person", "car"]


def test_a_voc_style_folder_registers_with_the_sorted_classes_of_its_xmls(tmp_path):
    root = voc_folder(tmp_path / "v", classes=("zebra", "ant"))
    cfg = quickstart_cfg(
        "DATASETS.VOC_STYLE",
        str([["v_reg", str(root), "trainval"], ["v_reg_listed", str(root), "test", "zebra,ant"]]),
    )
    register_config_datasets(cfg)
    meta = MetadataCatalog.get("v_reg")
    assert meta.thing_classes == ["ant", "zebra"] and meta.evaluator_type == "pascal_voc"
    assert (meta.dirname, meta.split, meta.year) == (str(root), "trainval", 2012)
    assert MetadataCatalog.get("v_reg_listed").thing_classes == ["zebra", "ant"]  # as given
    dicts = DatasetCatalog.get("v_reg")  # detectron2's load_voc_instances
    assert len(dicts) == 4 and [a["category_id"] for a in dicts[1]["annotations"]] == [0, 1]
    assert dicts[0]["annotations"][0]["bbox"] == pytest.approx([8, 10, 40, 50])


# training and evaluation from a config alone


def test_a_yolo_folder_trains_and_is_evaluated_by_coco_from_a_config_alone(tmp_path):
    root = yolo_folder(tmp_path / "y")
    entry = f'["{root / "images"}", "{root / "labels"}", "{root / "classes.txt"}"]'
    config = _config(
        tmp_path,
        "yolo",
        f'DATASETS:\n  YOLO: [["y_train", {entry[1:-1]}], '
        f'["y_test", {entry[1:-1]}]]\n'
        '  TRAIN: ("y_train",)\n  TEST: ("y_test",)\n',
    )
    _train(config)
    results = _results(tmp_path / "out")
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}  # COCO's evaluator
    assert "LAMR-person" in results["safety"]
    # detectron2's COCOEvaluator wrote the folder's ground truth as COCO JSON
    assert os.path.isfile(tmp_path / "out" / "inference" / "y_test_coco_format.json")


def test_a_voc_style_folder_trains_and_is_evaluated_by_pascal_voc_from_a_config_alone(tmp_path):
    root = voc_folder(tmp_path / "v")
    config = _config(
        tmp_path,
        "voc_style",
        f'DATASETS:\n  VOC_STYLE: [["v_train", "{root}", "trainval"], '
        f'["v_test", "{root}", "test"]]\n'
        '  TRAIN: ("v_train",)\n  TEST: ("v_test",)\n',
    )
    proc = _train(config)
    assert "Evaluating v_test using 2012 metric" in proc.output  # detectron2's Pascal VOC evaluator
    results = _results(tmp_path / "out")
    assert set(results["bbox"]) == {"AP", "AP50", "AP75"}
    assert "LAMR-person" in results["safety"]


@pytest.fixture
def voc2007():
    """A tiny VOC2007 where detectron2's builtin voc_2007_* look ($DETECTRON2_DATASETS/VOC2007),
    removed afterwards; skipped where a real one is there."""
    dirname = MetadataCatalog.get("voc_2007_trainval").dirname
    if os.path.exists(dirname):
        pytest.skip(f"{dirname} exists (a real Pascal VOC?): not written over")
    from pathlib import Path

    try:
        yield voc_folder(Path(dirname), classes=("person", "car"))
    finally:
        shutil.rmtree(dirname, ignore_errors=True)


def test_pascal_voc_trains_with_the_voc_config_and_compare_reads_its_results(voc2007, tmp_path):
    out = tmp_path / "flstar"
    proc = _train(
        "configs/retinanet_R50_flstar_voc.yaml",
        "DATASETS.TRAIN",
        "('voc_2007_trainval',)",
        "OUTPUT_DIR",
        str(out),
    )
    assert "Evaluating voc_2007_test using 2007 metric" in proc.output
    results = _results(out)
    assert set(results["bbox"]) == {"AP", "AP50", "AP75"} and "LAMR-person" in results["safety"]
    assert run_state(str(out)) == "done"  # the sweep skips it
    record = load_run(str(out))
    metrics = metrics_of(record)
    assert list(metrics)[:3] == ["AP", "AP50", "AP75"] and "APs" not in metrics
    # an FL run beside it: compare.py's table, its difference to FL, no interval (no COCO dets)
    fl = tmp_path / "fl"
    shutil.copytree(out, fl)
    record = json.loads((fl / "results.json").read_text())
    record.update(loss_type="FL", params={"gamma": 2.0}, gamma=2.0)
    record["results"]["bbox"]["AP"] -= 1.0
    (fl / "results.json").write_text(json.dumps(record))
    proc = run_here(
        "tools/compare.py", str(out), str(fl), "--out", str(tmp_path / "cmp"), "--resamples", "10"
    )
    assert proc.returncode == 0, proc.output[-3000:]
    table = (tmp_path / "cmp.md").read_text()
    assert table.splitlines()[0].startswith("| run | setting | seeds | AP | AP50 | AP75 | LAMR |")
    assert "(+1.00)" in table  # FL*'s AP minus FL's


def test_the_voc_configs_have_detectron2s_pascal_voc_schedule():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from d2_focalstar.run.cli import load_config

    zoo = get_cfg()
    zoo.merge_from_file(model_zoo.get_config_file("PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml"))
    for name, loss_type in [
        ("retinanet_R50_flstar_voc.yaml", "FLSTAR"),
        ("retinanet_R50_fl_voc.yaml", "FL"),
    ]:
        cfg = load_config(os.path.join(REPO, "configs", name), [], warn_no_cuda=False)
        assert cfg.MODEL.FOCALSTAR.LOSS_TYPE == loss_type and cfg.MODEL.RETINANET.NUM_CLASSES == 20
        assert cfg.DATASETS.TRAIN == zoo.DATASETS.TRAIN and cfg.DATASETS.TEST == zoo.DATASETS.TEST
        for key in ("MAX_ITER", "STEPS", "WARMUP_ITERS", "IMS_PER_BATCH"):
            assert cfg.SOLVER[key] == zoo.SOLVER[key], key
        assert cfg.INPUT == zoo.INPUT
        assert cfg.SOLVER.BASE_LR == 0.01 and list(cfg.TEST.SAFETY.CLASSES) == ["person"]


def test_the_sweep_plans_fl_versus_flstar_on_voc(tmp_path):
    proc = run_here(
        "tools/sweep.py",
        "--config-file",
        "configs/retinanet_R50_flstar_voc.yaml",
        "--loss-types",
        "FL",
        "FLSTAR",
        "--gammas",
        "0.25",
        "--dry-run",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.output[-3000:]
    assert "fl_g2_s0: new" in proc.output and "flstar_g0.25_s0: new" in proc.output


def test_compare_tables_voc_runs_without_cocos_size_metrics(tmp_path):
    records = [
        {
            "loss_type": t,
            "params": {"gamma": g},
            "gamma": g,
            "seed": 0,
            "folder": str(tmp_path / t),
            "results": {
                "bbox": {"AP": ap, "AP50": ap + 20, "AP75": ap - 5},
                "safety": {"LAMR": 50.0},
            },
        }
        for t, g, ap in [("FL", 2.0, 40.0), ("FLSTAR", 0.25, 41.5)]
    ]
    columns, rows = comparison_rows(records)
    assert columns == ["run", "setting", "seeds", "AP", "AP50", "AP75", "LAMR"]
    assert [r["AP vs FL"] for r in rows if r["run"] == "mean"] == [0.0, 1.5]


# evaluators by evaluator_type


def test_an_unknown_evaluator_type_is_one_line_before_training(tmp_path):
    name = "cityscapes_fine_instance_seg_val"  # a builtin of evaluator_type cityscapes_instance
    with pytest.raises(
        EvaluatorTypeError,
        match=f"dataset '{name}' has evaluator_type 'cityscapes_instance'; "
        "allowed 'coco', 'pascal_voc'",
    ):
        evaluator_type_of(name)
    proc = run_here(
        "train_net.py",
        "--config-file",
        "configs/quickstart_flstar.yaml",
        *TINY,
        "DATASETS.TEST",
        f"('{name}',)",
        "OUTPUT_DIR",
        str(tmp_path),
    )
    assert_one_line_error(
        proc,
        "train_net.py",
        f"DATASETS.TEST: dataset '{name}' has evaluator_type",
        "allowed 'coco', 'pascal_voc'",
    )
    assert "Starting training" not in proc.output


def test_the_evaluator_follows_the_evaluator_type():
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    from d2_focalstar.evaluation import FastCOCOEvaluator

    assert isinstance(build_dataset_evaluator("voc_2007_test"), PascalVOCDetectionEvaluator)
    assert isinstance(build_dataset_evaluator("focalstar_shapes_val"), FastCOCOEvaluator)


# bad input: one line naming the file (and line) and the problem


def _label(root, i=1):
    return root / "labels" / f"im{i}.txt"


def _missing_label(root):
    os.remove(_label(root))
    return _label(root), "missing, the label file of image"


def _class_beyond_names(root):
    _label(root).write_text("0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n")
    return f"{_label(root)}:2", "class index 2 is beyond the 2 class names (indices 0 to 1)"


def _box_outside(root):
    _label(root).write_text("1 0.9 0.5 0.4 0.2\n")
    return f"{_label(root)}:1", f"box outside the {SIZE}x{SIZE} image"


def _not_five_numbers(root):
    _label(root).write_text("0 0.5 0.5 0.2 0.2\n\n1 0.5 0.5 0.2\n")
    return f"{_label(root)}:3", "'1 0.5 0.5 0.2' is not five numbers 'class cx cy w h'"


def _polygon(root):
    _label(root).write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    return f"{_label(root)}:1", "a segmentation polygon?"


def _missing_names(root):
    os.remove(root / "classes.txt")
    return root / "classes.txt", "does not exist"


YOLO_FAULTS = [
    _missing_label,
    _class_beyond_names,
    _box_outside,
    _not_five_numbers,
    _polygon,
    _missing_names,
]


@pytest.mark.parametrize("fault", YOLO_FAULTS, ids=[f.__name__[1:] for f in YOLO_FAULTS])
def test_a_bad_yolo_folder_is_one_line_naming_the_file(tmp_path, fault):
    root = yolo_folder(tmp_path / "y")
    where, problem = fault(root)
    name = f"y_bad{fault.__name__}"
    cfg = quickstart_cfg(
        "DATASETS.YOLO",
        str([[name, str(root / "images"), str(root / "labels"), str(root / "classes.txt")]]),
        "DATASETS.TRAIN",
        f"('{name}',)",
        "MODEL.RETINANET.NUM_CLASSES",
        "2",
    )
    with pytest.raises(ConfigError) as e:
        register_config_datasets(cfg)
        check_datasets(cfg)
    assert str(where) in str(e.value) and problem in str(e.value), str(e.value)


def _xml_file(root, i=1):
    return root / "Annotations" / f"{i:06d}.xml"


def _empty_xml(root):
    _xml_file(root).write_text("")
    return _xml_file(root), "empty"


def _unparsable_xml(root):
    _xml_file(root).write_text("<annotation>\n<size><width>64</width></size>\n<object>\n")
    return f"{_xml_file(root)}:4", "not valid XML (no element found"


def _voc_box_outside(root):
    _xml_file(root).write_text(_xml("000001", [(0, 20, 4, 70, 30)], ("person", "car")))
    return _xml_file(root), f"object 1 (person) has a box outside the {SIZE}x{SIZE} image"


def _unknown_class(root):
    text = _xml_file(root).read_text().replace("<name>car</name>", "<name>truck</name>")
    _xml_file(root).write_text(text)
    return _xml_file(root), "object 1 has class 'truck', not one of the dataset's 2 classes"


def _missing_xml(root):
    os.remove(_xml_file(root))
    return _xml_file(root), "missing, the annotation file of image '000001'"


def _no_difficult_in_test(root):
    text = _xml_file(root).read_text().replace("<difficult>0</difficult>", "")
    _xml_file(root).write_text(text)
    return _xml_file(root), "lacks <difficult>, which detectron2's Pascal VOC evaluation"


VOC_FAULTS = [
    _empty_xml,
    _unparsable_xml,
    _voc_box_outside,
    _unknown_class,
    _missing_xml,
    _no_difficult_in_test,
]


@pytest.mark.parametrize("fault", VOC_FAULTS, ids=[f.__name__[1:] for f in VOC_FAULTS])
def test_a_bad_voc_style_folder_is_one_line_naming_the_file(tmp_path, fault):
    root = voc_folder(tmp_path / "v")
    where, problem = fault(root)
    name = f"v_bad{fault.__name__}"
    cfg = quickstart_cfg(
        "DATASETS.VOC_STYLE",
        str([[name, str(root), "test", "person,car"]]),
        "DATASETS.TRAIN",
        "()",
        "DATASETS.TEST",
        f"('{name}',)",
        "MODEL.RETINANET.NUM_CLASSES",
        "2",
    )
    with pytest.raises(ConfigError) as e:
        register_config_datasets(cfg)
        check_datasets(cfg)
    assert str(where) in str(e.value) and problem in str(e.value), str(e.value)


def test_a_bad_folder_stops_train_net_before_training_in_one_line(tmp_path):
    root = yolo_folder(tmp_path / "y")
    where, problem = _class_beyond_names(root)
    entry = [str(root / "images"), str(root / "labels"), str(root / "classes.txt")]
    proc = run_here(
        "train_net.py",
        "--config-file",
        "configs/quickstart_flstar.yaml",
        *TINY,
        "DATASETS.YOLO",
        str([["y_cmd", *entry]]),
        "DATASETS.TRAIN",
        "('y_cmd',)",
        "DATASETS.TEST",
        "()",
        "MODEL.RETINANET.NUM_CLASSES",
        "2",
        "OUTPUT_DIR",
        str(tmp_path / "o"),
    )
    assert_one_line_error(proc, "train_net.py", where, problem)
    assert "Starting training" not in proc.output


def test_a_folder_entry_of_the_wrong_shape_is_refused():
    from d2_focalstar.config import check_focalstar_config

    with pytest.raises(
        ConfigError,
        match=re.escape(
            "DATASETS.YOLO[0]=['a', 'b']: allowed [name, images_dir, labels_dir, names]"
        ),
    ):
        check_focalstar_config(quickstart_cfg("DATASETS.YOLO", "[['a', 'b']]"))
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "DATASETS.VOC_STYLE[0]=['a']: allowed [name, root, "
            "image_set] or [name, root, image_set, classes]"
        ),
    ):
        check_focalstar_config(quickstart_cfg("DATASETS.VOC_STYLE", "[['a']]"))


def test_train_and_test_folders_with_other_class_lists_are_refused(tmp_path):
    train = voc_folder(tmp_path / "a", classes=("person", "car"))
    test = voc_folder(tmp_path / "b", classes=("person", "bus"))
    cfg = quickstart_cfg(
        "DATASETS.VOC_STYLE",
        str([["cls_a", str(train), "trainval"], ["cls_b", str(test), "test"]]),
        "DATASETS.TRAIN",
        "('cls_a',)",
        "DATASETS.TEST",
        "('cls_b',)",
    )
    register_config_datasets(cfg)
    with pytest.raises(
        ConfigError, match="'cls_a' has classes car, person but 'cls_b' has bus, person"
    ):
        check_datasets(cfg)
