"""tools/benchmark.py --cpu-smoke (every variant runs and computes the same loss as the
reference), and the other speed tools: the offline instruction count and the GPU-session script."""

import json
import os

import pytest
import torch

from helpers import assert_one_line_error, run, run_here


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run_here(
        "tools/benchmark.py", "--cpu-smoke", "--out", str(out), check=True, interpreter=True
    )
    with open(out) as f:
        return json.load(f), proc.stdout


def test_every_loss_variant_agrees_with_the_reference(smoke):
    report, _ = smoke
    rows = report["loss"]
    assert not [r for r in rows if "error" in r]
    variants = {r["variant"] for r in rows}
    assert {
        "detectron2 stock FL (fvcore jit, one-hot)",
        "torchvision FL (one-hot)",
        "fused FL (Triton)",
        "fused FL* (Triton)",
    } <= variants
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16"}
    compared = [r for r in rows if r["agrees_with_reference"] is not None]
    assert len(compared) == 4 * 3  # stock, torchvision, fused FL, fused FL*, in each dtype
    assert all(r["agrees_with_reference"] for r in compared), [
        r["variant"] for r in compared if not r["agrees_with_reference"]
    ]
    n, a, k = report["meta"]["logits_shape"]  # images x anchors x classes
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}
    for r in rows:
        assert r["ms"] > 0
        # the traffic the issue counts: the logits read in the forward, read again and the
        # gradient written in the backward, each one tensor of the logits' shape and dtype
        assert r["loss_shape_bytes"] == n * a * k * itemsize[r["dtype"]]
        assert r["gpu_ms"] is None  # CUDA events only on a GPU: the GB/s come from the wall time
        assert r["effective_gbs"] == pytest.approx(
            3 * n * a * k * itemsize[r["dtype"]] / (r["ms"] / 1e3) / 1e9, rel=1e-6
        )
        assert r["pct_of_copy"] == pytest.approx(
            100 * r["effective_gbs"] / report["meta"]["copy_gbs"]
        )


def test_detectors_are_timed_and_projected(smoke):
    report, stdout = smoke
    rows = {r["system"]: r for r in report["detector"]}
    assert len(rows) == 8 and "torchvision RetinaNet" in rows
    assert {
        "RetinaNetFLStar (FL*, + cudnn.benchmark)",
        "RetinaNetFLStar (FL*, CHANNELS_LAST off)",
        "detectron2 RetinaNet (stock, + channels_last)",
    } <= set(rows)
    for r in rows.values():
        assert r["train_img_s"] == pytest.approx(
            report["meta"]["sizes"]["train_batch"] / r["train_s_per_iter"]
        )
        assert r["coco_1x_hours"] == pytest.approx(90000 * 16 / r["train_img_s"] / 3600)
    assert rows["detectron2 RetinaNet (stock)"]["train_vs_stock"] == 1.0
    assert (
        "| system | train img/s |" in stdout and "| variant | dtype | GPU ms | wall ms |" in stdout
    )


def test_fl_mode_with_the_fused_kernel_equals_stock_detectron2(smoke):
    report, stdout = smoke
    check = report["fl_mode_check"]
    assert check["fused_kernel"]  # under TRITON_INTERPRET on the CPU
    assert set(check["rel_diff"]) == {"loss_cls", "loss_box_reg"}
    assert check["losses_ours"]["loss_cls"] > 0
    assert max(check["rel_diff"].values()) < 1e-5, check
    # the kernel passed its self-check before that model used it (the JSON says so)
    assert report["fused_self_check"] and all(
        c["disagreement"] is None for c in report["fused_self_check"]
    )
    assert "failed its self-check" not in stdout
    assert "FL mode vs stock detectron2 RetinaNet" in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full benchmark runs on a GPU")
def test_full_benchmark_without_a_gpu_says_so():
    assert_one_line_error(
        run_here("tools/benchmark.py"), "tools/benchmark.py", "no CUDA device", "--cpu-smoke"
    )


def test_sass_stats_counts_the_fused_kernels_without_a_gpu(tmp_path):
    """tools/fused_sass_stats.py compiles the kernels for an H100 with Triton's own ptxas (no GPU,
    no driver) and counts their instructions. What it finds is the kernel's design: FL* takes two
    exp2 per element in the forward (2^-|y_t| and the factor) and three in the backward (plus
    1 - p_t), and no log or division instruction; CE takes one and two, and fewer instructions.
    The forward handles several blocks per program: the counts are per element of all of them.
    Each kernel keeps to 32 registers without spilling, so that an SM holds 2048 threads."""
    out = tmp_path / "sass.json"
    # a process of its own: this one runs the kernel in Triton's interpreter, which cannot compile
    # it
    proc = run(
        "tools/fused_sass_stats.py",
        "--loss-types",
        "FLSTAR",
        "CE",
        "--dtypes",
        "fp32",
        "--out",
        str(out),
        check=True,
    )
    assert "| forward | FLSTAR | fp32 |" in proc.stdout
    rows = {(r["kernel"], r["loss_type"]): r for r in json.loads(out.read_text())}
    assert len(rows) == 4
    assert rows["forward", "FLSTAR"]["mufu_per_element"] == 2
    assert rows["backward", "FLSTAR"]["mufu_per_element"] == 3
    assert rows["forward", "CE"]["mufu_per_element"] == 1
    assert rows["backward", "CE"]["mufu_per_element"] == 2
    assert rows["forward", "CE"]["per_element"] < rows["forward", "FLSTAR"]["per_element"]
    # ~30 with Triton 3.8; the earlier kernel (a software log, exp instead of exp2) took 63
    assert rows["forward", "FLSTAR"]["per_element"] < 45
    for r in rows.values():  # a model from the counts, positive and finite
        assert 0 < r["issue_bound_ms"] < 10 and r["memory_floor_ms"] > 0
        assert r["registers"] <= 32 and r["spill_stores"] == 0, r


def test_gpu_checks_script_refuses_unknown_steps_and_logs_the_ones_it_runs(tmp_path):
    """tools/gpu_checks.sh, the one command a short GPU session runs: an unknown step stops it
    before anything runs, naming the allowed ones; a step it runs (env, no GPU needed) lands in
    OUTDIR/gpu_checks.log with the versions."""
    import subprocess
    import sys

    from helpers import REPO

    env = dict(os.environ, PYTHON=sys.executable)
    bad = subprocess.run(
        ["bash", "tools/gpu_checks.sh", str(tmp_path / "bad"), "env", "bench", "benhc"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2
    assert (
        "unknown step 'benhc' (allowed: env test bench bench-loss blocks study study-lr "
        "proxy-pretrain" in bad.stderr
    )
    assert not (tmp_path / "bad").exists()
    ok = subprocess.run(
        ["bash", "tools/gpu_checks.sh", str(tmp_path / "ok"), "env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    log = (tmp_path / "ok" / "gpu_checks.log").read_text()
    assert "torch" in log and "detectron2" in log and "[gpu_checks] all steps passed" in log


_STUB_PYTHON = r"""#!/bin/bash
# a stand-in for the Python gpu_checks.sh calls: logs each call; sweep.py makes one run folder
# per rate and seed under --out (none for the third step's config: as if it failed); table1.py
# --sweep-args prints a CE and an FL row
echo "$*" >>"$STUB_LOG"
case "$1" in
  tools/sweep.py)
    case "$*" in *3_neutral_trunk*) exit 1 ;; esac
    out=; lrs=(0.01); seeds=(0); what=
    while [ $# -gt 0 ]; do
      case "$1" in
        --out) out=$2; shift ;;
        --loss-types) what=$2; shift ;;
        --base-lrs) lrs=(); while [[ "${2:-}" =~ ^[0-9.]+$ ]]; do lrs+=("$2"); shift; done ;;
        --seeds) seeds=(); while [[ "${2:-}" =~ ^[0-9]+$ ]]; do seeds+=("$2"); shift; done ;;
        --) break ;;
      esac
      shift
    done
    for lr in "${lrs[@]}"; do for s in "${seeds[@]}"; do
      run="$out/${what}_s${s}_lr${lr}"; mkdir -p "$run/inference"; echo {} >"$run/results.json"
    done; done ;;
  tools/table1.py)
    echo "--loss-types CE --alphas 0.75 --base-lrs 0.005"
    echo "--loss-types FL --param FL.gamma=2 --alphas 0.25 --base-lrs 0.02" ;;
esac
exit 0
"""


def test_gpu_checks_ablation_step_wires_its_folders(tmp_path):
    """gpu_checks.sh proxy80-ablation, with a stand-in Python: per step, the two losses' rate
    grids go to two folders (a sweep locks its --out: one folder would stop the second sweep),
    seeds 1-2 of each row read table1.py's arguments, and tools/ablation.py gets each step's
    folders, no folder (a 'not run' row, not a literal glob) for a step that made none."""
    import shutil
    import subprocess

    from helpers import REPO

    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "tools", "gpu_checks.sh"), root / "tools")
    for trunk in ("pretrain_shapes_r18",):  # made by an earlier step (the round-3 one is committed)
        (root / "output" / trunk).mkdir(parents=True)
        (root / "output" / trunk / "backbone.pth").write_text("")
    stub = tmp_path / "python"
    stub.write_text(_STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log))
    proc = subprocess.run(
        ["bash", "tools/gpu_checks.sh", str(tmp_path / "out"), "proxy80-ablation"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the failed step's sweeps
    calls = log.read_text().splitlines()
    grids = [c for c in calls if c.startswith("tools/sweep.py") and "--seeds 0 " in c]
    outs = [c.split("--out ")[1].split()[0] for c in grids]
    assert len(outs) == 8 == len(set(outs))  # 4 steps x 2 losses, a folder each
    assert "output/proxy80_ablation/1_classes_CE" in outs
    assert "output/proxy80_ablation/1_classes_FL" in outs
    seeds = [c for c in calls if c.startswith("tools/sweep.py") and "--seeds 1 2 " in c]
    assert len(seeds) == 8  # 4 steps x 2 rows, at the rows' rates (table1.py's, here stubbed)
    assert any(
        "--base-lrs 0.02 --seeds 1 2 --out output/proxy80_ablation/2_no_clipping_seeds_row2" in c
        for c in seeds
    )
    (ablation,) = [c for c in calls if c.startswith("tools/ablation.py")]
    steps = ablation.split("--step ")[1:]
    assert steps[0].startswith("round-2 proxy, the shared rate 0.01 output/")
    assert "proxy_shapes_flstar_CE/CE_s0_lr0.01/" in steps[0] and "lr0.02" not in steps[0]
    assert (
        "1_classes_FL/FL_s0_lr0.04/" in steps[2]
        and "1_classes_seeds_row1/CE_s1_lr0.005/" in steps[2]
    )
    # the step that made no run, and the round-3 proxy's runs (proxy80-table1's, not run here):
    # no folder, no literal glob
    assert steps[4] == "+ the round-3 trunk, frozen whole "
    assert steps[5].startswith("+ 3,000 iterations of 16: the round-3 proxy --out ")
    assert "*" not in ablation


def test_benchmark_takes_an_fcos_config_unchanged(tmp_path):
    """The detector rows of an FCOS config: FCOSFLStar against stock detectron2 FCOS (no
    torchvision row), and its FL mode equal to stock FCOS's losses."""
    out = tmp_path / "fcos.json"
    run_here(
        "tools/benchmark.py",
        "--cpu-smoke",
        "--sections",
        "detector",
        "--config-file",
        "configs/fcos_R50_flstar_1x.yaml",
        "--out",
        str(out),
        check=True,
        interpreter=True,
    )
    report = json.loads(out.read_text())
    rows = {r["system"]: r for r in report["detector"]}
    assert {
        "FCOSFLStar (FL*, this project)",
        "FCOSFLStar (FL, this project)",
        "detectron2 FCOS (stock)",
    } <= set(rows) and "torchvision RetinaNet" not in rows
    assert rows["detectron2 FCOS (stock)"]["train_vs_stock"] == 1.0
    check = report["fl_mode_check"]
    assert set(check["rel_diff"]) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    assert max(check["rel_diff"].values()) < 1e-5
