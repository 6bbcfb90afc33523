"""tools/benchmark_loader.py: the COCO-like files it makes, the loader and step it times (at a tiny
size: the timings of docs/BENCHMARKS.md come from its full-size command, not from tests), and the
arithmetic of its projection."""

import importlib.util
import json
import os

import pytest
from PIL import Image

from helpers import REPO, run_here

_spec = importlib.util.spec_from_file_location(
    "benchmark_loader", os.path.join(REPO, "tools", "benchmark_loader.py")
)
bl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bl)


def test_coco_like_files_are_640x480_jpegs_of_coco_size_with_their_boxes(tmp_path):
    json_file, image_root, kb = bl.make_coco_like(str(tmp_path), 4)
    with open(json_file) as f:
        gt = json.load(f)
    assert len(gt["images"]) == 4 and len(gt["categories"]) == 80 and gt["annotations"]
    for img in gt["images"]:
        with Image.open(os.path.join(image_root, img["file_name"])) as im:
            assert im.format == "JPEG" and im.size == (640, 480) and im.mode == "RGB"
    assert 100 < kb < 250  # COCO's files average ~160 KB


def test_loader_and_step_are_timed_and_the_coco_hours_projected(tmp_path):
    """Every worker count gets a row (images/s of the process's loader, and per worker); the step
    runs on the loader's batches (on the CPU here: fp32, no AMP); the projection has a table for 1
    and 8 GPUs whose total is the sum of its parts."""
    out = tmp_path / "loader.json"
    proc = run_here(
        "tools/benchmark_loader.py",
        "--config-file",
        "configs/quickstart_flstar.yaml",
        "--images",
        "6",
        "--workers",
        "0",
        "1",
        "--batches",
        "2",
        "--warmup",
        "1",
        "--step",
        "--step-batch",
        "2",
        "--step-iters",
        "1",
        "--step-warmup",
        "0",
        "--out",
        str(out),
        "MODEL.RETINANET.NUM_CLASSES",
        "80",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "INPUT.MAX_SIZE_TRAIN",
        "96",
        check=True,
    )
    report = json.loads(out.read_text())
    rows = {r["workers"]: r for r in report["loader"]}
    assert set(rows) == {0, 1}
    for w, r in rows.items():
        assert r["img_s"] > 0 and r["images"] == 2 * 2
        assert r["img_s_per_worker"] == pytest.approx(r["img_s"] / max(w, 1))
    assert report["meta"]["mean_file_kb"] > 0 and report["meta"]["cpu"]
    step = report["step"]
    assert (step["device"], step["amp"], step["batch"], step["workers"]) == ("cpu", False, 2, 1)
    assert (
        step["img_s"] == pytest.approx(2 / step["s_per_iter"]) and 0 <= step["data_wait_share"] < 1
    )
    assert report["workers_per_gpu"]["workers"] >= 1 and report["workers_per_gpu"]["how"] in (
        "measured",
        "projected",
    )
    assert "1 GPU(s), 2 workers per GPU" in report["coco_1x_hours"]  # the quickstart config's own
    for parts in report["coco_1x_hours"].values():
        assert parts[-1]["part"] == "total"
        assert parts[-1]["hours"] == pytest.approx(sum(p["hours"] for p in parts[:-1]))
    assert "| loader workers | images/s (one process) | images/s per worker |" in proc.stdout
    assert "| train step fed by the loader |" in proc.stdout


def test_step_runs_on_the_gpu_with_amp_where_cuda_is_reported(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bl.step_settings(None, torch.cuda.is_available()) == ("cuda", True)
    assert bl.step_settings(None, False) == ("cpu", False)


def test_workers_needed_is_the_fewest_that_keep_up_else_projected():
    rows = [
        dict(workers=1, img_s=30.0, img_s_per_worker=30.0),
        dict(workers=2, img_s=55.0, img_s_per_worker=27.5),
        dict(workers=4, img_s=100.0, img_s_per_worker=25.0),
    ]
    assert bl.workers_needed(rows, 50) == (2, "measured")
    assert bl.workers_needed(rows, 123.6) == (5, "projected")  # 123.6 / 25 per worker, rounded up
    assert bl.loader_rate(rows, 4) == (100.0, "measured with 4 workers")
    assert bl.loader_rate(rows, 8)[0] == 200.0


def test_projection_of_a_coco_1x_run():
    """Steps: 90,000 x 16 images at the step rate, over the GPUs; data: what a slower loader adds;
    evaluation: COCO val's inference and the COCO API."""
    one = dict(
        (part, hours)
        for part, hours, _ in bl.project_coco_1x(123.6, 102.3, 36.0, 1, (60.0, "x"), 2)
    )
    assert one["training steps"] == pytest.approx(90000 * 16 / 123.6 / 3600)
    assert one["waiting for data (2 loader workers per GPU)"] == pytest.approx(
        (90000 * 16 / 60.0 - 90000 * 16 / 123.6) / 3600
    )
    assert one["evaluation: COCO API (faster-coco-eval)"] == pytest.approx(0.01)
    eight = dict(
        (part, hours)
        for part, hours, _ in bl.project_coco_1x(123.6, 102.3, None, 8, (500.0, "x"), 8)
    )
    assert eight["training steps"] == pytest.approx(one["training steps"] / 8)
    assert eight["waiting for data (8 loader workers per GPU)"] == 0  # the loader keeps up
