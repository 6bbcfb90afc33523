"""Where a run's AP goes (d2_focalstar/evaluation/diagnostics.py, tools/diagnose_runs.py): values
worked out by hand from COCO's definitions on a scene small enough to count."""

import json
import os

import pytest

from d2_focalstar.evaluation.diagnostics import detection_diagnostics
from tests.helpers import assert_one_line_error, run_here


def _box(x, y, cat, image, ann_id, crowd=0):
    return {
        "id": ann_id,
        "image_id": image,
        "category_id": cat,
        "bbox": [x, y, 10, 10],
        "area": 100,
        "iscrowd": crowd,
    }


GT = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
    "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    "annotations": [
        _box(0, 0, 1, 1, 1),  # A
        _box(20, 20, 2, 1, 2),  # B
        _box(0, 0, 1, 2, 3),  # C
        _box(80, 80, 1, 2, 4, crowd=1),  # a crowd region: not an object
    ],
}


def _det(x, y, cat, image, score):
    return {"image_id": image, "category_id": cat, "bbox": [x, y, 10, 10], "score": score}


DETS = [
    _det(0, 0, 1, 1, 0.9),  # on A, its category, the best box on A
    _det(0, 0, 2, 1, 0.5),  # on A, another category
    _det(20, 20, 1, 1, 0.8),  # on B, another category, the best box on B
    _det(20, 20, 2, 1, 0.3),  # on B, its category
    _det(50, 50, 1, 2, 0.7),  # on nothing; C is missed
]


def test_diagnostics_by_hand():
    d = detection_diagnostics(GT, DETS)
    # A and B found, C not; only A's best box names its category
    assert d["found"] == pytest.approx(100 * 2 / 3)
    assert d["named"] == pytest.approx(100 * 1 / 3)
    assert d["dets/image"] == 2.5
    assert d["score p50"] == pytest.approx(0.7)
    # COCO AP (101 recall points, boxes exact so every IoU threshold agrees): category 1 has
    # precision 1 up to recall 1/2 (51 points), category 2 precision 1/2 at every point
    assert d["AP"] == pytest.approx(100 * (51 / 101 + 0.5) / 2, abs=1e-6)
    assert d["AR100"] == pytest.approx(100 * (0.5 + 1.0) / 2, abs=1e-6)
    # class-agnostic: 0.9 (A) and 0.8 (B) are hits, the rest misses or duplicates: precision 1
    # up to recall 2/3 (67 points)
    assert d["agnostic AP"] == pytest.approx(100 * 67 / 101, abs=1e-6)
    assert d["agnostic AR100"] == pytest.approx(100 * 2 / 3, abs=1e-6)


def test_a_box_below_the_iou_is_not_on_the_object():
    shifted = [dict(d, bbox=[d["bbox"][0] + 4, *d["bbox"][1:]]) for d in DETS]  # IoU 6/14
    d = detection_diagnostics(GT, shifted)
    assert d["found"] == 0 and d["named"] == 0
    assert detection_diagnostics(GT, shifted, iou=0.4)["found"] == pytest.approx(100 * 2 / 3)


def _run(folder, gt_file, detections):
    os.makedirs(folder / "inference")
    record = {
        "loss_type": "FL",
        "params": {"gamma": 2.0},
        "gamma": 2.0,
        "alpha": 0.25,
        "seed": 0,
        "datasets": {"train": ["t"], "test": ["diag_val"]},
        "results": {"bbox": {"AP": 1.0}},
    }
    (folder / "results.json").write_text(json.dumps(record))
    (folder / "config.yaml").write_text(
        f"DATASETS:\n  COCO_JSON: [[diag_val, {gt_file}, {os.path.dirname(gt_file)}]]\n"
    )
    if detections is not None:
        (folder / "inference" / "coco_instances_results.json").write_text(json.dumps(detections))


def test_diagnose_runs_writes_the_table_and_names_a_run_without_detections(tmp_path):
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(GT))
    _run(tmp_path / "a", str(gt_file), DETS)
    proc = run_here("tools/diagnose_runs.py", str(tmp_path / "a"), "--out", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "d.md").read_text()
    assert "| a | FL g=2 | 50.25 | 75.00 | 66.34 | 66.67 | 66.67 | 33.33 |" in table
    assert (tmp_path / "d.csv").read_text().startswith("run,setting,AP,AR100,agnostic AP")

    # a diverged run (no detections, nothing to diagnose) is skipped, named
    _run(tmp_path / "c", str(gt_file), None)
    record = json.loads((tmp_path / "c" / "results.json").read_text())
    record.update(results={}, iteration=84, diverged="Loss became infinite or NaN")
    (tmp_path / "c" / "results.json").write_text(json.dumps(record))
    proc = run_here("tools/diagnose_runs.py", str(tmp_path / "a"), str(tmp_path / "c"))
    assert proc.returncode == 0 and "| a | FL g=2 | 50.25 |" in proc.stdout, proc.output[-2000:]
    assert "skipped " in proc.stderr and "diverged at iteration 84" in proc.stderr
    proc = run_here("tools/diagnose_runs.py", str(tmp_path / "c"))
    assert_one_line_error(proc, "diagnose_runs.py", "none of the folders holds a finished run")
    _run(tmp_path / "b", str(gt_file), None)
    proc = run_here("tools/diagnose_runs.py", str(tmp_path / "a"), str(tmp_path / "b"))
    assert_one_line_error(proc, "diagnose_runs.py", str(tmp_path / "b"), "no saved detections")
    proc = run_here(
        "tools/diagnose_runs.py", str(tmp_path / "a"), "--name-parts", "colour", "shape"
    )
    assert_one_line_error(proc, "diagnose_runs.py", "--name-parts", "category 'one' is not 2 words")


def test_name_parts_say_which_part_of_the_name_is_wrong():
    gt = dict(GT, categories=[{"id": 1, "name": "red circle"}, {"id": 2, "name": "red square"}])
    d = detection_diagnostics(gt, DETS, name_parts=("colour", "shape"))
    # B (a red square) is named a red circle by its best box: its shape is wrong, not its colour
    assert d["wrong colour"] == 0
    assert d["wrong shape"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="category 'one' is not 2 words"):
        detection_diagnostics(GT, DETS, name_parts=("colour", "shape"))
