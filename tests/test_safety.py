"""Safety metrics (LAMR, recall at a FPPI budget) against values computed by hand."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from d2_focalstar import add_focalstar_config
from d2_focalstar.evaluation.safety import (
    SafetyEvaluator,
    build_safety_evaluator,
    log_average_miss_rate,
    match_detections,
    miss_rate_fppi_curve,
    recall_at_fppi,
)

# The 9 reference FPPI: 0.01, 0.0178, 0.0316, 0.0562, 0.1, 0.178, 0.316, 0.562, 1.


# ---------------------------------------------------------------------------- matching


def test_match_greedy_by_score_with_duplicate_as_false_positive():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
    # Given out of score order. By score: .9 takes GT 0 (IoU 1); .8 overlaps GT 0 at
    # IoU 90/100 = .9 but GT 0 is taken and GT 1 is far: a duplicate, FP; .7 takes GT 1; .6 FP.
    dets = [[50, 50, 60, 60], [0, 0, 10, 10], [20, 0, 30, 10], [1, 0, 10, 10]]
    scores, is_tp, num_gt = match_detections(dets, [0.6, 0.9, 0.7, 0.8], gt, [False, False], 0.5)
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7, 0.6])
    assert is_tp.tolist() == [True, False, True, False]
    assert num_gt == 2


def test_match_takes_the_ground_truth_of_highest_iou():
    gt = [[0, 0, 10, 10], [3, 0, 13, 10]]  # A, B
    # det 1 [2,0,12,10]: IoU A = 80/120 = .667, IoU B = 90/110 = .818 -> takes B.
    # det 2 [-1,0,9,10]: IoU A = 90/110 = .818, IoU B = 60/140 = .43 -> takes A: TP.
    # Had det 1 taken A (the first above threshold), det 2 would be left with B at .43: FP.
    _, is_tp, _ = match_detections(
        [[2, 0, 12, 10], [-1, 0, 9, 10]], [0.9, 0.8], gt, [False, False], 0.5
    )
    assert is_tp.tolist() == [True, True]


def test_match_drops_detection_on_crowd_instead_of_false_positive():
    gt = [[0, 0, 10, 10], [50, 50, 100, 100]]  # a person and a crowd
    # .9 lies inside the crowd: intersection over its own area = 100/100 = 1 -> dropped (plain
    # IoU would be 100/2500 = .04, an FP). .8 takes the person; .7 matches nothing: FP.
    dets = [[60, 60, 70, 70], [0, 0, 10, 10], [200, 200, 210, 210]]
    scores, is_tp, num_gt = match_detections(dets, [0.9, 0.8, 0.7], gt, [False, True], 0.5)
    np.testing.assert_allclose(scores, [0.8, 0.7])
    assert is_tp.tolist() == [True, False]
    assert num_gt == 1  # the crowd is not a box to find


def test_match_without_ground_truth_or_detections():
    scores, is_tp, num_gt = match_detections(
        np.zeros((2, 4)) + [0, 0, 5, 5], [0.3, 0.5], np.zeros((0, 4)), [], 0.5
    )
    assert scores.tolist() == [0.5, 0.3] and is_tp.tolist() == [False, False] and num_gt == 0
    scores, is_tp, num_gt = match_detections(np.zeros((0, 4)), [], [[0, 0, 5, 5]], [False], 0.5)
    assert len(scores) == len(is_tp) == 0 and num_gt == 1


# ---------------------------------------------------------------------------- curve, LAMR, recall

# 2 images, 3 GT; by descending score: TP, FP, TP, FP, FP, TP.
#   cum TP    1    1    2    2    2    3     recall = cum TP / 3
#   cum FP    0    1    1    2    3    3     FPPI   = cum FP / 2
#   miss    2/3  2/3  1/3  1/3  1/3   0
#   FPPI     0   .5   .5    1   1.5  1.5
CURVE_SCORES = [0.5, 0.9, 0.7, 0.4, 0.8, 0.6]
CURVE_TP = [False, True, True, True, False, False]
CURVE_MISS = [2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 0]
CURVE_FPPI = [0, 0.5, 0.5, 1, 1.5, 1.5]


def test_curve_sorts_by_score_and_accumulates():
    miss, fppi = miss_rate_fppi_curve(CURVE_SCORES, CURVE_TP, num_gt=3, num_images=2)
    np.testing.assert_allclose(miss, CURVE_MISS)
    np.testing.assert_allclose(fppi, CURVE_FPPI)


def test_curve_counts_images_without_detections():
    # The same detections over 4 images (2 of them without any): FPPI halves.
    _, fppi = miss_rate_fppi_curve(CURVE_SCORES, CURVE_TP, num_gt=3, num_images=4)
    np.testing.assert_allclose(fppi, np.array(CURVE_FPPI) / 2)


def test_lamr_of_the_curve():
    # Refs .01 ... .316 (7 of them) are below FPPI .5: the last point with FPPI <= ref is the
    # first (FPPI 0), miss 2/3. Refs .562 and 1: last point with FPPI <= ref has miss 1/3.
    # LAMR = exp((7 ln(2/3) + 2 ln(1/3)) / 9) = (2/3)^(7/9) (1/3)^(2/9) = 0.5715
    expected = (2 / 3) ** (7 / 9) * (1 / 3) ** (2 / 9)
    assert log_average_miss_rate(CURVE_MISS, CURVE_FPPI) == pytest.approx(expected)
    assert expected == pytest.approx(0.5715, abs=1e-4)


def test_lamr_constant_miss_rate_is_that_miss_rate():
    # One point at FPPI 0 with miss .5: every ref reads .5, the geometric mean is .5.
    assert log_average_miss_rate([0.5], [0.0]) == pytest.approx(0.5)


def test_lamr_refs_below_the_first_point_count_as_full_miss():
    # First point at FPPI .1: refs .01, .0178, .0316, .0562 have no point -> 1; the other 5
    # (.1 included: FPPI <= ref) read .5. LAMR = (1^4 * .5^5)^(1/9) = .5^(5/9) = 0.6804.
    assert log_average_miss_rate([0.5], [0.1]) == pytest.approx(0.5 ** (5 / 9))
    assert 0.5 ** (5 / 9) == pytest.approx(0.6804, abs=1e-4)


def test_lamr_edge_cases():
    assert log_average_miss_rate([], []) == 1.0  # no detections: everything missed
    assert log_average_miss_rate([0.0], [0.0]) == pytest.approx(1e-10)  # floored, not log(0)
    miss, fppi = miss_rate_fppi_curve([0.9], [False], num_gt=0, num_images=1)
    assert np.isnan(miss).all() and math.isnan(log_average_miss_rate(miss, fppi))


def test_recall_at_fppi_budget():
    recall = 1 - np.array(CURVE_MISS)  # 1/3 1/3 2/3 2/3 2/3 1 at FPPI 0 .5 .5 1 1.5 1.5
    assert recall_at_fppi(recall, CURVE_FPPI, 0.1) == pytest.approx(1 / 3)  # point at FPPI 0
    assert recall_at_fppi(recall, CURVE_FPPI, 0.5) == pytest.approx(2 / 3)  # last at FPPI .5
    assert recall_at_fppi(recall, CURVE_FPPI, 1.5) == pytest.approx(1.0)
    assert recall_at_fppi([0.5], [0.2], 0.1) == 0.0  # first FP comes too early
    assert recall_at_fppi([], [], 0.1) == 0.0


# ---------------------------------------------------------------------------- the evaluator

CLASSES = ["person", "car", "tree"]


def _ann(xywh, cls, iscrowd=0):
    return {
        "bbox": xywh,
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": CLASSES.index(cls),
        "iscrowd": iscrowd,
    }


# Ground truth, XYWH (XYXY in the comments).
RECORDS = [
    {
        "image_id": 1,
        "height": 200,
        "width": 200,
        "annotations": [
            _ann([0, 0, 10, 20], "person"),  # P1 [0,0,10,20]
            _ann([50, 0, 10, 20], "person"),  # P2 [50,0,60,20], never detected
            _ann([100, 100, 40, 20], "car"),  # C1 [100,100,140,120]
            _ann([0, 50, 10, 10], "tree"),
        ],
    },
    {
        "image_id": 2,
        "height": 200,
        "width": 200,
        "annotations": [
            _ann([0, 0, 10, 20], "person"),  # P3
            _ann([100, 0, 100, 100], "person", iscrowd=1),
        ],
    },  # crowd [100,0,200,100]
    {"image_id": 3, "height": 200, "width": 200, "annotations": []},
    {
        "image_id": 4,
        "height": 200,
        "width": 200,
        "annotations": [_ann([0, 0, 20, 20], "car")],
    },  # C2, never detected
]


def _output(*dets):
    """A model output: dets are (XYXY box, score, class name)."""
    inst = Instances((200, 200))
    inst.pred_boxes = Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([d[1] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([CLASSES.index(d[2]) for d in dets], dtype=torch.int64)
    return {"instances": inst}


OUTPUTS = {
    1: _output(
        ([0, 0, 10, 20], 0.9, "person"),  # TP on P1
        ([1, 0, 11, 20], 0.8, "person"),  # IoU 180/220 with P1, taken: FP
        ([100, 100, 140, 120], 0.95, "car"),  # TP on C1
        ([0, 50, 10, 60], 0.99, "tree"),
    ),  # not a safety class here
    2: _output(
        ([120, 10, 130, 30], 0.85, "person"),  # inside the crowd: dropped
        ([0, 0, 10, 20], 0.6, "person"),
    ),  # TP on P3
    3: _output(),  # no detections, still an image
    4: _output(([50, 50, 70, 70], 0.7, "car")),  # FP
}


@pytest.fixture
def dataset():
    name = "d2fs_safety_test_tiny"
    DatasetCatalog.register(name, lambda: [dict(r) for r in RECORDS])
    MetadataCatalog.get(name).set(thing_classes=list(CLASSES))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _run(evaluator, image_ids):
    evaluator.reset()
    for i in image_ids:
        evaluator.process([{"image_id": i}], [OUTPUTS[i]])
    return evaluator.evaluate()


def test_evaluator_end_to_end(dataset, tmp_path):
    # person, 4 images, 3 GT (P1 P2 P3; the crowd is not counted), kept by score:
    #   .9 TP, .8 FP, .6 TP -> miss 2/3 2/3 1/3 at FPPI 0 .25 .25.
    #   Refs .01 ... .178 (6) read 2/3; .316 .562 1 (3) read 1/3:
    #   LAMR = (2/3)^(6/9) (1/3)^(3/9) = 0.52913; recall at .1 FPPI: the first point, 1/3.
    # car, 2 GT: .95 TP, .7 FP -> miss 1/2 1/2 at FPPI 0 .25: LAMR 1/2, recall at .1 = 1/2.
    # "bicycle" is not in the dataset: skipped.
    evaluator = SafetyEvaluator(
        dataset,
        ["person", "bicycle", "car"],
        fp_per_image=0.1,
        iou_threshold=0.5,
        output_dir=str(tmp_path / "out"),
    )
    results = _run(evaluator, [1, 2, 3, 4])
    lamr_person = 100 * (2 / 3) ** (2 / 3) * (1 / 3) ** (1 / 3)
    expected = {
        "LAMR": (lamr_person + 50) / 2,
        "R@0.1FPPI": (100 / 3 + 50) / 2,
        "LAMR-person": lamr_person,
        "R@0.1FPPI-person": 100 / 3,
        "LAMR-car": 50.0,
        "R@0.1FPPI-car": 50.0,
    }
    assert lamr_person == pytest.approx(52.913, abs=1e-3)
    assert list(results) == ["safety"]
    assert results["safety"] == pytest.approx(expected)
    written = json.loads((tmp_path / "out" / "safety_metrics.json").read_text())
    assert written["safety"] == pytest.approx(expected)
    assert written["num_images"] == 4 and written["num_gt"] == {"person": 3, "car": 2}


def test_evaluator_counts_images_without_detections(dataset):
    # Image 1 with person dets .9 FP (far from any GT), .8 TP on P1; image 3 has none. 2 GT,
    # 2 images: recall 0, 1/2 at FPPI 1/2, 1/2 -> recall at .5 FPPI = 1/2. Were image 3 not
    # counted, FPPI would be 1, 1 and the recall at .5 FPPI 0.
    OUTPUTS_1 = _output(([150, 150, 160, 170], 0.9, "person"), ([0, 0, 10, 20], 0.8, "person"))
    evaluator = SafetyEvaluator(dataset, ["person"], fp_per_image=0.5)
    evaluator.process([{"image_id": 1}, {"image_id": 3}], [OUTPUTS_1, OUTPUTS[3]])
    assert evaluator.evaluate()["safety"]["R@0.5FPPI-person"] == pytest.approx(50.0)


def test_evaluator_class_without_ground_truth_is_nan_and_left_out_of_the_mean(dataset):
    # Image 2 only: person has 1 GT (P3), found at FPPI 0 (the crowd det is dropped): miss 0,
    # LAMR = 100 * 1e-10, recall 100. tree has no GT there: NaN, not in the means.
    evaluator = SafetyEvaluator(dataset, ["person", "tree"])
    res = _run(evaluator, [2])["safety"]
    assert math.isnan(res["LAMR-tree"]) and math.isnan(res["R@0.1FPPI-tree"])
    assert res["LAMR"] == res["LAMR-person"] == pytest.approx(1e-8)
    assert res["R@0.1FPPI"] == res["R@0.1FPPI-person"] == pytest.approx(100.0)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def safety_log():
    # On the module's logger itself: caplog listens on the root logger, which detectron2's
    # setup_logger, if a test before has called it, may have cut off by propagate = False.
    logger, handler = logging.getLogger("d2_focalstar.evaluation.safety"), _Records()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_classes_missing_from_the_dataset_are_skipped_with_one_warning(dataset, safety_log):
    evaluator = SafetyEvaluator(dataset, ["person", "bicycle", "stop sign"])
    warnings = [r.getMessage() for r in safety_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'bicycle'" in warnings[0] and "'stop sign'" in warnings[0]
    assert sorted(_run(evaluator, [1])["safety"]) == [
        "LAMR",
        "LAMR-person",
        "R@0.1FPPI",
        "R@0.1FPPI-person",
    ]


def test_no_safety_class_in_the_dataset_gives_no_results(dataset, safety_log):
    evaluator = SafetyEvaluator(dataset, ["bicycle", "bus"])
    assert _run(evaluator, [1, 2]) == {}
    assert any("none of the safety classes" in r.getMessage() for r in safety_log.records)


def test_build_from_config(dataset):
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.TEST.SAFETY.CLASSES = ["car"]
    cfg.TEST.SAFETY.FP_PER_IMAGE = 0.25
    # car over images 1-4: .95 TP, .7 FP at FPPI 0, .25 -> recall at .25 FPPI is 1/2.
    res = _run(build_safety_evaluator(cfg, dataset, None), [1, 2, 3, 4])["safety"]
    assert sorted(res) == ["LAMR", "LAMR-car", "R@0.25FPPI", "R@0.25FPPI-car"]
    assert res["R@0.25FPPI-car"] == pytest.approx(50.0)
    cfg.TEST.SAFETY.ENABLED = False
    assert build_safety_evaluator(cfg, dataset, None) is None
