"""Fractal pretraining: the generator is deterministic and well-formed; the command writes a
backbone that MODEL.WEIGHTS loads into a FrozenBN detector, resumes after a kill to the same
weights, and reuses a finished output."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from d2_focalstar.study.pretrain import FractalSet, FractalSpec, random_ifs, render_ifs
from helpers import REPO, run_here

SMALL = [
    "--iterations",
    "12",
    "--batch-size",
    "4",
    "--image-size",
    "48",
    "--object-sizes",
    "8",
    "20",
    "--eval-images",
    "16",
    "--classes",
    "8",
    "--checkpoint-every",
    "4",
]


def test_fractals_are_deterministic_and_multi_label():
    spec = FractalSpec(num_classes=8, image_size=48, min_size=8, max_size=20, seed=3)
    a, b = FractalSet(spec), FractalSet(spec)
    for i in (0, 7, 12345):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert np.array_equal(ia, ib) and np.array_equal(ta, tb)
        assert ia.shape == (48, 48, 3) and ia.dtype == np.uint8
        assert 1 <= ta.sum() <= spec.max_objects and set(np.unique(ta)) <= {0.0, 1.0}
    assert not np.array_equal(a[0][0], a[1][0])
    other = FractalSet(FractalSpec(num_classes=8, image_size=48, min_size=8, max_size=20, seed=4))
    assert not np.array_equal(a[0][0], other[0][0])


def test_random_ifs_is_contractive_and_its_fractal_fills_its_box():
    rng = np.random.default_rng(0)
    for _ in range(20):
        maps, probs = random_ifs(rng)
        assert 2 <= len(maps) <= 4 and probs.sum() == pytest.approx(1)
        assert max(np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False).max() for m in maps) < 1
        density = render_ifs(maps, probs, rng, 32)
        assert density.max() == 1 and density.min() == 0
        mask = density > 0
        assert mask.any(axis=0).sum() >= 2 and mask.any(axis=1).sum() >= 2  # not a point
        assert mask.mean() < 0.9  # not a filled square


def pretrain_args(out, *extra):
    return [
        "tools/pretrain_backbone.py",
        "--config-file",
        "configs/proxy_flstar.yaml",
        "--out",
        str(out),
        *SMALL,
        *extra,
    ]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    proc = run_here(*pretrain_args(out), check=True)
    return out, proc.output


def test_progress_eta_and_record(pretrained):
    out, log = pretrained
    assert "pretrain iter 12/12" in log and "eta" in log
    import json

    record = json.loads((out / "pretrain.json").read_text())
    assert (
        record["settings"]["iterations"] == 12 and record["depth"] == 18 and record["seconds"] > 0
    )
    assert 0 <= record["held_out_mAP"] <= 100 and "chance_mAP" in record
    assert not (out / "pretrain_state.pth").exists()  # the resume state is gone once finished


def test_model_weights_load_it_into_the_proxys_frozen_backbone(pretrained):
    """Through the project's safe loader, every weight and BN statistic of the ResNet lands in
    the detector (FrozenBN, stem and res2 frozen); only FPN and heads stay at their init."""
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    from d2_focalstar.run.checkpoint import SafeCheckpointer
    from d2_focalstar.run.cli import load_config

    out, _ = pretrained
    weights = str(out / "backbone.pth")
    cfg = load_config(
        os.path.join(REPO, "configs/proxy_flstar.yaml"),
        ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"],
    )
    model = build_model(cfg)
    checkpointer = SafeCheckpointer(model)
    checkpointer.load(weights)
    assert not [k for k in checkpointer.missing_keys if k.startswith("backbone.bottom_up.")]
    assert any(k.startswith("head.") for k in checkpointer.missing_keys)
    saved = torch.load(weights, weights_only=True)["model"]
    norm = model.backbone.bottom_up.res3[0].conv1.norm
    assert isinstance(norm, FrozenBatchNorm2d)
    torch.testing.assert_close(
        norm.running_var, saved["backbone.bottom_up.res3.0.conv1.norm.running_var"]
    )
    torch.testing.assert_close(
        model.backbone.bottom_up.stem.conv1.weight, saved["backbone.bottom_up.stem.conv1.weight"]
    )


def test_a_killed_pretraining_resumes_to_the_same_weights_and_a_finished_one_is_reused(
    pretrained, tmp_path
):
    out, _ = pretrained
    proc = subprocess.Popen(
        [sys.executable, *pretrain_args(tmp_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while (
        not (tmp_path / "pretrain_state.pth").exists()
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "backbone.pth").exists()
    again = run_here(*pretrain_args(tmp_path))
    assert again.returncode == 0 and "Resuming the pretraining from iteration" in again.output
    a = torch.load(out / "backbone.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "backbone.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    reused = run_here(*pretrain_args(tmp_path))
    assert reused.returncode == 0 and "exists with these settings: reused" in reused.output


def test_the_resnet_of_a_trained_detector_becomes_a_backbone_checkpoint(tmp_path):
    from detectron2.modeling import build_model

    from d2_focalstar.run.checkpoint import SafeCheckpointer
    from d2_focalstar.run.cli import load_config

    cfg = load_config(os.path.join(REPO, "configs/quickstart_flstar.yaml"), ["MODEL.DEVICE", "cpu"])
    detector = build_model(cfg)
    SafeCheckpointer(detector, save_dir=str(tmp_path)).save("model_final")
    proc = run_here(
        "tools/pretrain_backbone.py",
        "--from-detector",
        str(tmp_path / "model_final.pth"),
        "--out",
        str(tmp_path / "bb"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = torch.load(tmp_path / "bb" / "backbone.pth", weights_only=True)["model"]
    assert saved and all(k.startswith("backbone.bottom_up.") for k in saved)
    torch.testing.assert_close(
        saved["backbone.bottom_up.res4.0.conv1.weight"],
        detector.backbone.bottom_up.res4[0].conv1.weight,
    )
    bad = run_here(
        "tools/pretrain_backbone.py",
        "--from-detector",
        str(tmp_path / "nope.pth"),
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
        "pretrain_backbone.py: error:"
    )
