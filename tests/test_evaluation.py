"""COCO evaluation through faster-coco-eval (d2_focalstar/evaluation/coco.py): the 12 numbers of
pycocotools to 1e-6, on a synthetic COCO-like set and through detectron2's COCOEvaluator on the
embedded data; pycocotools when faster-coco-eval is missing; detectron2's own fast path kept
where its _C is built."""

import contextlib
import io

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, coco_evaluation
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import d2_focalstar  # noqa: F401  registers the embedded datasets
from d2_focalstar.data.synthetic_coco import synthetic_coco
from d2_focalstar.evaluation import coco as evaluation
from d2_focalstar.evaluation.coco import FastCOCOEvaluator, evaluate_coco

pytest.importorskip("faster_coco_eval")


def _coco(gt):
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_faster_coco_eval_gives_pycocotools_twelve_numbers_on_a_synthetic_set():
    gt, dets = synthetic_coco(300, seed=3)  # ~2,200 boxes, 30,000 detections, 80 classes
    official = evaluate_coco(_coco(gt), [dict(d) for d in dets], "pycocotools")
    fast = evaluate_coco(_coco(gt), [dict(d) for d in dets], "fast")
    assert len(official) == len(fast) == 12
    # AP and AR100: not a degenerate case
    assert 0.05 < official[0] < 0.95 and 0.05 < official[8] < 1
    np.testing.assert_allclose(fast, official, rtol=0, atol=1e-6)


def _shapes_predictions(seed=0):
    """Detections for the embedded validation set: its boxes jittered (some badly, some missed)
    and false positives, as a detector's output."""
    rng = np.random.default_rng(seed)
    inputs, outputs = [], []
    for record in DatasetCatalog.get("focalstar_shapes_val"):
        h, w = record["height"], record["width"]
        boxes, scores, classes = [], [], []
        for ann in record["annotations"]:
            if rng.random() < 0.15:
                continue
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            jitter = rng.normal(0, 0.15 * rng.random(), size=4) * (x1 - x0 + y1 - y0) / 2
            boxes.append([x0 + jitter[0], y0 + jitter[1], x1 + jitter[2], y1 + jitter[3]])
            scores.append(0.3 + 0.7 * rng.random())
            classes.append(ann["category_id"] if rng.random() < 0.9 else int(rng.integers(4)))
        for _ in range(20):  # false positives
            x0, y0 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            size = rng.uniform(8, 60)
            boxes.append([x0, y0, min(w, x0 + size), min(h, y0 + size)])
            scores.append(0.5 * rng.random())
            classes.append(int(rng.integers(4)))
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor(scores, dtype=torch.float32)
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inputs.append({"image_id": record["image_id"]})
        outputs.append({"instances": inst})
    return inputs, outputs


def _run(evaluator, inputs, outputs):
    evaluator.reset()
    evaluator.process(inputs, outputs)
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()


def test_coco_evaluator_on_the_embedded_data_gives_the_same_numbers_fast_and_official(monkeypatch):
    from faster_coco_eval import COCOeval_faster

    calls = []
    evaluate = COCOeval_faster.evaluate
    monkeypatch.setattr(COCOeval_faster, "evaluate", lambda self: calls.append(1) or evaluate(self))
    inputs, outputs = _shapes_predictions()

    fast = FastCOCOEvaluator("focalstar_shapes_val")
    assert fast.implementation.startswith("faster-coco-eval") and fast._use_fast_impl
    fast_results = _run(fast, inputs, outputs)
    assert calls, "faster-coco-eval was not what evaluated"
    assert coco_evaluation.COCOeval_opt is COCOeval  # detectron2's module is left as it was

    official = FastCOCOEvaluator("focalstar_shapes_val", use_fast_impl=False)
    assert official.implementation == "pycocotools" and not official._use_fast_impl
    calls.clear()
    official_results = _run(official, inputs, outputs)
    assert not calls

    np.testing.assert_allclose(
        fast.coco_stats["bbox"], official.coco_stats["bbox"], rtol=0, atol=1e-6
    )
    assert 5 < official_results["bbox"]["AP"] < 95
    # the results dict detectron2 reports (AP..APl and per-class AP, in percent) agrees too
    assert fast_results["bbox"].keys() == official_results["bbox"].keys()
    for key, value in official_results["bbox"].items():
        # APl: none
        assert fast_results["bbox"][key] == pytest.approx(value, abs=1e-4, nan_ok=True), key
    # and stock detectron2's evaluator (pycocotools here, without _C) says the same
    stock = _run(COCOEvaluator("focalstar_shapes_val"), inputs, outputs)
    assert stock["bbox"]["AP"] == pytest.approx(fast_results["bbox"]["AP"], abs=1e-4)


def test_without_faster_coco_eval_the_evaluator_is_pycocotools(monkeypatch):
    monkeypatch.setattr(evaluation, "fast_cocoeval", lambda: None)
    evaluator = FastCOCOEvaluator("focalstar_shapes_val")
    assert evaluator.implementation == "pycocotools" and not evaluator._use_fast_impl
    assert evaluator._substitute is None


def test_detectron2s_own_fast_path_is_kept_where_its_extension_is_built(monkeypatch):
    class BuiltCOCOevalOpt(COCOeval):  # what detectron2 imports when its _C loads
        pass

    monkeypatch.setattr(coco_evaluation, "COCOeval_opt", BuiltCOCOevalOpt)
    evaluator = FastCOCOEvaluator("focalstar_shapes_val")
    assert evaluator.implementation == "detectron2 COCOeval_opt"
    assert evaluator._use_fast_impl and evaluator._substitute is None


def test_benchmark_times_both_implementations_and_checks_they_agree(tmp_path):
    """tools/benchmark_eval.py --sections cocoeval at a tiny size: the row of docs/BENCHMARKS.md
    (its timing there comes from the full-size command, not from this test)."""
    import json

    from helpers import run_here

    out = tmp_path / "cocoeval.json"
    proc = run_here(
        "tools/benchmark_eval.py",
        "--sections",
        "cocoeval",
        "--images",
        "30",
        "--out",
        str(out),
        check=True,
    )
    assert "| COCO evaluation of one run (COCOEvaluator's 12 numbers) | 30 |" in proc.stdout
    report = json.loads(out.read_text())
    assert "bootstrap" not in report
    row = report["cocoeval"]
    assert row["pycocotools_s"] > 0 and row["faster_coco_eval_s"] > 0 and row["max_abs_diff"] < 1e-6
    assert row["faster_coco_eval"].startswith("faster-coco-eval")
