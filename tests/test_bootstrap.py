"""The paired bootstrap over images: without resampling it is COCOeval (AP, AP50, APs to 1e-6)
and the safety metrics' LAMR; a resample equals COCOeval on the resampled image set; intervals
cover what they should; runs on other image sets are refused."""

import contextlib
import copy
import io
import math

import numpy as np
import pytest

from d2_focalstar.data.synthetic_coco import synthetic_coco
from d2_focalstar.evaluation.bootstrap import BootstrapError, RunEvaluation, paired_bootstrap
from d2_focalstar.evaluation.safety import (
    log_average_miss_rate,
    match_detections,
    miss_rate_fppi_curve,
)


def cocoeval_stats(gt, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100 * ev.stats


@pytest.fixture(scope="module")
def data():
    return synthetic_coco(num_images=120, num_categories=6, seed=1)


def test_without_resampling_it_is_cocoeval(data):
    gt, dets = data
    stats = cocoeval_stats(gt, dets)
    got = RunEvaluation(gt, dets).metrics()
    assert got["AP"] == pytest.approx(stats[0], abs=1e-6)
    assert got["AP50"] == pytest.approx(stats[1], abs=1e-6)
    assert got["APs"] == pytest.approx(stats[3], abs=1e-6)
    assert 5 < got["AP"] < 95  # neither trivial nor empty


def test_without_resampling_lamr_is_the_safety_metrics(data):
    """The mean over classes of the LAMR computed straight from safety.py's functions."""
    gt, dets = data
    classes = ["class1", "class2", "class9"]  # class9 is not in the data: skipped
    got = RunEvaluation(gt, dets, classes).metrics()["LAMR"]
    want = []
    for cid in (1, 2):
        scores, tps, num_gt = [], [], 0
        for img in gt["images"]:
            anns = [
                a
                for a in gt["annotations"]
                if a["image_id"] == img["id"] and a["category_id"] == cid
            ]
            mine = [d for d in dets if d["image_id"] == img["id"] and d["category_id"] == cid]
            xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
            s, t, n = match_detections(
                np.array([xyxy(d["bbox"]) for d in mine]).reshape(-1, 4),
                [d["score"] for d in mine],
                np.array([xyxy(a["bbox"]) for a in anns]).reshape(-1, 4),
                [bool(a["iscrowd"]) for a in anns],
            )
            scores.append(s)
            tps.append(t)
            num_gt += n
        mr, fppi = miss_rate_fppi_curve(
            np.concatenate(scores), np.concatenate(tps), num_gt, len(gt["images"])
        )
        want.append(100 * log_average_miss_rate(mr, fppi))
    assert got == pytest.approx(np.mean(want), abs=1e-9)


def resampled(gt, dets, counts):
    """The data with image i present counts[i] times (copies get new ids), as a resample draws
    it."""
    new_gt = {"images": [], "annotations": [], "categories": gt["categories"]}
    new_dets = []
    by_id = {img["id"]: i for i, img in enumerate(sorted(gt["images"], key=lambda m: m["id"]))}
    for img in gt["images"]:
        for copy_ in range(int(counts[by_id[img["id"]]])):
            new_id = img["id"] * 1000 + copy_
            new_gt["images"].append({**img, "id": new_id})
            new_gt["annotations"] += [
                {**a, "id": len(new_gt["annotations"]) + j + 1, "image_id": new_id}
                for j, a in enumerate(a for a in gt["annotations"] if a["image_id"] == img["id"])
            ]
            new_dets += [{**d, "image_id": new_id} for d in dets if d["image_id"] == img["id"]]
    return new_gt, new_dets


def test_a_resample_is_cocoeval_on_the_resampled_images(data):
    """Weights are image multiplicities: the weighted accumulation equals COCOeval run on the
    data with each image copied that many times (and dropped where 0)."""
    gt, dets = data
    run = RunEvaluation(gt, dets, ["class1", "class2"])
    counts = np.random.default_rng(3).multinomial(
        len(gt["images"]), np.ones(len(gt["images"])) / len(gt["images"])
    )
    got = run.metrics(counts.astype(float))
    stats = cocoeval_stats(*resampled(gt, dets, counts))
    assert got["AP"] == pytest.approx(stats[0], abs=1e-6)
    assert got["AP50"] == pytest.approx(stats[1], abs=1e-6)
    assert got["APs"] == pytest.approx(stats[3], abs=1e-6)
    assert got["LAMR"] == pytest.approx(
        RunEvaluation(*resampled(gt, dets, counts), ["class1", "class2"]).metrics()["LAMR"],
        abs=1e-6,
    )
    assert got["AP"] != pytest.approx(run.metrics()["AP"], abs=1e-3)  # the resample changed it


def _worse(dets, drop=0.15, seed=5):
    """The same detector with some of its best detections lost: clearly lower AP."""
    rng = np.random.default_rng(seed)
    return [d for d in dets if not (d["score"] > 0.5 and rng.random() < drop * 3)]


def test_interval_excludes_zero_for_a_real_difference_and_covers_it_for_none(data):
    gt, dets = data
    good = RunEvaluation(gt, dets, name="good")
    bad = RunEvaluation(gt, _worse(dets), name="bad")
    res = paired_bootstrap([good], [bad], num_resamples=200, seed=0, metrics=("AP", "AP50"))
    assert (
        res["AP"]["diff"] > 0
        and res["AP"]["low"] > 0
        and res["AP"]["low"] < res["AP"]["diff"] < res["AP"]["high"]
    )
    # two runs with the same detections: the difference is exactly 0 in every resample
    same = paired_bootstrap([good], [RunEvaluation(gt, dets)], num_resamples=50, metrics=("AP",))
    assert same["AP"]["diff"] == same["AP"]["low"] == same["AP"]["high"] == 0
    # seeded: the same interval again
    again = paired_bootstrap([good], [bad], num_resamples=200, seed=0, metrics=("AP", "AP50"))
    assert again == res


def test_several_seeds_are_averaged_on_each_resample(data):
    gt, dets = data
    a1, a2 = RunEvaluation(gt, dets), RunEvaluation(gt, _worse(dets, seed=7))
    b = RunEvaluation(gt, _worse(dets, seed=9))
    res = paired_bootstrap([a1, a2], [b], num_resamples=20, metrics=("AP",))
    assert res["AP"]["a"] == pytest.approx((a1.metrics()["AP"] + a2.metrics()["AP"]) / 2)
    assert res["AP"]["diff"] == pytest.approx(res["AP"]["a"] - b.metrics()["AP"])


def test_other_image_sets_are_refused(data):
    gt, dets = data
    fewer = {**gt, "images": gt["images"][:-1]}
    with pytest.raises(BootstrapError, match="a and b were evaluated on different image sets"):
        paired_bootstrap(
            [RunEvaluation(gt, dets, name="a")],
            [
                RunEvaluation(
                    fewer, [d for d in dets if d["image_id"] != gt["images"][-1]["id"]], name="b"
                )
            ],
            num_resamples=2,
        )
    with pytest.raises(
        BootstrapError, match="c: detections of 1 images that the ground truth does not have"
    ):
        RunEvaluation(fewer, dets, name="c")


def test_no_detections_at_all_is_zero_ap_not_an_error(data):
    gt, _ = data
    m = RunEvaluation(gt, [], ["class1"]).metrics()
    assert m["AP"] == 0 and m["LAMR"] == 100 and not math.isnan(m["APs"])


def test_benchmark_command_prints_its_row(tmp_path):
    """tools/benchmark_eval.py at a tiny size: it runs and reports (the timing itself is a
    benchmark for docs/BENCHMARKS.md, not a test)."""
    import json

    from helpers import run_here

    out = tmp_path / "b.json"
    proc = run_here(
        "tools/benchmark_eval.py",
        "--images",
        "40",
        "--resamples",
        "3",
        "--out",
        str(out),
        check=True,
    )
    assert "| paired bootstrap of AP, AP50, APs, LAMR (a pair of runs) | 40 |" in proc.stdout
    row = json.loads(out.read_text())["bootstrap"]
    assert row["resamples"] == 3 and row["bootstrap_s"] > 0 and row["images"] == 40
    assert row["same_numbers"] is True and row["reference_bootstrap_s"] > 0


def test_batched_resamples_equal_the_one_at_a_time_path(data):
    """The vectorised bootstrap (all resamples of a batch scored at once, on the compressed
    curve points) gives exactly the reference path's numbers for a fixed seed, with several
    seeds per setting, a safety class and resamples that leave a category without ground truth."""
    gt, dets = data
    a = [
        RunEvaluation(gt, dets, ["class1", "class2"]),
        RunEvaluation(gt, _worse(dets, seed=7), ["class1", "class2"]),
    ]
    b = [RunEvaluation(gt, _worse(dets, seed=9), ["class1", "class2"])]
    reference = paired_bootstrap(a, b, num_resamples=40, seed=3, batch=0)
    for batch in (1, 7, 100):
        got = paired_bootstrap(a, b, num_resamples=40, seed=3, batch=batch)
        assert got == reference, batch
    weights = np.stack(
        [
            np.bincount(np.random.default_rng(i).integers(0, 120, 120), minlength=120)
            for i in range(5)
        ]
    )
    weights[0] = 0
    weights[0, :3] = 1  # three images only: some categories have no ground truth in this resample
    batch = a[1].metrics_batch(weights.astype(float))
    for i, w in enumerate(weights):
        one = a[1].metrics(w.astype(float))
        for m, v in one.items():
            assert (math.isnan(v) and math.isnan(batch[m][i])) or batch[m][i] == v, (i, m)


def test_long_resampling_reports_progress_and_eta(data):
    import io as _io

    from d2_focalstar.study.intervals import resampling_progress

    gt, dets = data
    stream = _io.StringIO()
    paired_bootstrap(
        [RunEvaluation(gt, dets)],
        [RunEvaluation(gt, _worse(dets))],
        num_resamples=30,
        batch=10,
        metrics=("AP",),
        progress=resampling_progress("x vs y", stream, every_s=0),
    )
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "x vs y: 10/30 resamples",
        "x vs y: 20/30 resamples",
        "x vs y: 30/30 resamples",
    ]
    assert all("ETA" in line for line in lines) and lines[-1].endswith("ETA 0 s")
