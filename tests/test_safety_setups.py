"""
TEST.SAFETY.SETUP: the CityPersons protocols ("reasonable" and the script's other setups) give
the numbers of CityPersons' own evaluation script on a fixture of scenes and detections
(tests/data/citypersons: make_fixture.py writes it; expected.json holds the script's numbers and
how they were obtained, outside this repository).
"""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from d2_focalstar import add_focalstar_config, check_focalstar_config, register_coco_json_datasets
from d2_focalstar.config import ConfigError
from d2_focalstar.evaluation.safety import SAFETY_SETUPS, SafetyEvaluator, class_miss_rate_curve

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "citypersons")


@pytest.fixture(scope="module")
def citypersons_dataset(tmp_path_factory):
    """The fixture's ground truth registered as a user would: DATASETS.COCO_JSON."""
    cfg = get_cfg()
    add_focalstar_config(cfg)
    name = "focalstar_test_citypersons_fixture"
    images = tmp_path_factory.mktemp("citypersons_images")
    cfg.DATASETS.COCO_JSON = [[name, os.path.join(FIXTURE, "gt.json"), str(images)]]
    register_coco_json_datasets(cfg)
    DatasetCatalog.get(name)  # as the test loader does before the evaluator: sets thing_classes
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _detections_as_outputs():
    """dt.json (COCO results, XYWH) as the model's outputs, one per image of gt.json."""
    with open(os.path.join(FIXTURE, "dt.json")) as f:
        detections = json.load(f)
    with open(os.path.join(FIXTURE, "gt.json")) as f:
        image_ids = [im["id"] for im in json.load(f)["images"]]
    inputs, outputs = [], []
    for image_id in image_ids:
        mine = [d for d in detections if d["image_id"] == image_id]
        xywh = np.array([d["bbox"] for d in mine], dtype=np.float64).reshape(-1, 4)
        inst = Instances((512, 1024))
        inst.pred_boxes = Boxes(
            torch.from_numpy(BoxMode.convert(xywh, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        )
        inst.scores = torch.tensor([d["score"] for d in mine], dtype=torch.float64)
        inst.pred_classes = torch.zeros(len(mine), dtype=torch.int64)
        inputs.append({"image_id": image_id})
        outputs.append({"instances": inst})
    return inputs, outputs


@pytest.mark.parametrize(
    "setup", ["reasonable", "reasonable_small", "heavy_occlusion", "citypersons_all"]
)
def test_citypersons_setups_give_the_official_scripts_numbers(citypersons_dataset, setup):
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)["lamr"][setup]
    evaluator = SafetyEvaluator(citypersons_dataset, ["pedestrian"], distributed=False, setup=setup)
    evaluator.process(*_detections_as_outputs())
    lamr = evaluator.evaluate()["safety"]["LAMR-pedestrian"]
    assert lamr == pytest.approx(expected, abs=0.01)


def test_reasonable_differs_from_all_on_the_fixture(citypersons_dataset):
    """The fixture makes the setups disagree, so the comparison above tests the rules."""
    lamrs = {}
    for setup in ("all", "reasonable"):
        evaluator = SafetyEvaluator(
            citypersons_dataset, ["pedestrian"], distributed=False, setup=setup
        )
        evaluator.process(*_detections_as_outputs())
        lamrs[setup] = evaluator.evaluate()["safety"]["LAMR-pedestrian"]
    assert abs(lamrs["all"] - lamrs["reasonable"]) > 5


def _one_image(gt_boxes_xywh, detections_xyxy, scores, **annotation_keys):
    anns = []
    for i, box in enumerate(gt_boxes_xywh):
        a = {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
        a.update({k: v[i] for k, v in annotation_keys.items()})
        anns.append(a)
    records = {1: {"image_id": 1, "annotations": anns}}
    predictions = [
        {
            "image_id": 1,
            "boxes": np.array(detections_xyxy, dtype=np.float64),
            "scores": np.array(scores, dtype=np.float64),
            "classes": np.zeros(len(scores), dtype=np.int64),
        }
    ]
    return records, predictions


def test_reasonable_ignores_short_and_occluded_pedestrians_and_flagged_regions():
    # gt: 49 px tall (too short), 100 px at visibility 0.5 (too occluded), a flagged region,
    # and one reasonable pedestrian; one detection on each, and a 39 px detection elsewhere.
    gt = [[0, 0, 20, 49], [100, 0, 41, 100], [200, 0, 150, 150], [400, 0, 41, 100]]
    dets = [
        [0, 0, 20, 49],
        [100, 0, 141, 100],
        [220, 10, 260, 110],
        [400, 0, 441, 100],
        [600, 0, 616, 39],
    ]
    records, predictions = _one_image(
        gt, dets, [0.9, 0.8, 0.7, 0.6, 0.95], vis_ratio=[1.0, 0.5, 1.0, 0.9], ignore=[0, 0, 1, 0]
    )
    mr, fppi, num_gt = class_miss_rate_curve(records, predictions, 0, SAFETY_SETUPS["reasonable"])
    # Counted: the one reasonable pedestrian, found by the only detection left that is neither
    # on ignored ground truth nor under 40 px (the 49 px one is 49 px tall: kept, and ignored).
    assert num_gt == 1
    assert mr.tolist() == [0.0] and fppi.tolist() == [0.0]
    mr, fppi, num_gt = class_miss_rate_curve(records, predictions, 0, SAFETY_SETUPS["all"])
    assert num_gt == 4  # "all" counts every box that is not a crowd
    # There the 39 px detection and the one inside the region (IoU 0.18 with its box) are false
    # positives; the loader folds "ignore" into "iscrowd", which "all" would ignore too.
    assert fppi[-1] == 2.0


def test_an_ignore_flag_in_a_coco_json_is_read_as_iscrowd(citypersons_dataset):
    """detectron2's load_coco_json refuses "ignore" (an assertion); the registration reads it."""
    with open(os.path.join(FIXTURE, "gt.json")) as f:
        flagged = sum(a["ignore"] for a in json.load(f)["annotations"])
    records = DatasetCatalog.get(citypersons_dataset)
    crowd = sum(a.get("iscrowd", 0) for r in records for a in r["annotations"])
    assert flagged > 0 and crowd == flagged
    assert all("vis_ratio" in a for r in records for a in r["annotations"])


def test_a_bad_setup_names_the_key_and_the_allowed_values():
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.TEST.SAFETY.SETUP = "caltech"
    with pytest.raises(
        ConfigError,
        match=r"TEST\.SAFETY\.SETUP='caltech': allowed 'all', "
        r"'reasonable'",
    ):
        check_focalstar_config(cfg)
