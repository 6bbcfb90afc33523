"""End to end through train_net.py: a short CPU training learns, --eval-only reproduces it,
and a 2-process run goes through detectron2's launch (gloo without a GPU)."""

import json
import math
import os
import re

import pytest

from helpers import run, run_here

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = ["--config-file", "configs/quickstart_flstar.yaml"]
ITERS = 200  # conftest.QUICKSTART_ITERS


def train_net(*args, here=True):
    """train_net.py's output; in this process unless ``here`` is False (several processes)."""
    proc = run_here("train_net.py", *args) if here else run("train_net.py", *args, timeout=900)
    assert proc.returncode == 0, proc.output[-5000:]
    return proc.output


def coco_ap(log):
    """The bbox metrics of the last evaluation, from detectron2's 'copypaste' lines."""
    rows = re.findall(r"copypaste: (AP,AP50.*)\n.*copypaste: ([-\d.,nan]+)", log)
    assert rows, log[-3000:]
    names, values = rows[-1]
    return dict(zip(names.split(","), (float(v) for v in values.split(","))))


@pytest.fixture(scope="module")
def trained(quickstart_model):
    return quickstart_model  # conftest.py: the test run's one quickstart training


def test_short_cpu_training_learns(trained, tmp_path):
    out, log = trained
    # the same model and evaluation after one step at learning rate 0
    untrained = coco_ap(
        train_net(
            *QUICKSTART,
            "SOLVER.MAX_ITER",
            "1",
            "SOLVER.BASE_LR",
            "0.0",
            "OUTPUT_DIR",
            str(tmp_path),
        )
    )
    learned = coco_ap(log)
    assert not untrained["AP"] >= 2.0  # nan when no score passes the test threshold
    assert learned["AP"] > 20.0 and learned["AP50"] > 40.0, learned
    assert os.path.isfile(out / "model_final.pth")


def test_results_json_holds_the_final_evaluation(trained):
    out, log = trained

    def no_constants(name):  # NaN / Infinity: Python reads them, strict JSON readers do not
        raise ValueError(f"results.json is not strict JSON: {name}")

    with open(out / "results.json") as f:
        record = json.load(f, parse_constant=no_constants)
    assert (
        record["loss_type"] == "FLSTAR" and record["gamma"] == 0.25 and record["iteration"] == ITERS
    )
    assert record["results"]["bbox"]["AP"] == pytest.approx(coco_ap(log)["AP"], abs=1e-3)
    assert set(record["results"]["safety"]) >= {"LAMR", "R@0.1FPPI", "LAMR-triangle", "LAMR-cross"}


def test_the_projects_own_log_lines_reach_console_and_log_file(trained):
    """The safety table and where results went are logged like detectron2's lines, on the
    console and in OUTPUT_DIR/log.txt; the CPU fall-back warns once; fvcore's import-time
    FutureWarning is not printed."""
    out, log = trained
    with open(out / "log.txt") as f:
        log_file = f.read()
    for text in (log, log_file):
        assert re.search(r"d2_focalstar\.evaluation\.safety.*: Safety metrics on 64 images", text)
        assert f"Final metrics written to {out / 'results.json'}" in text
    assert log.count("CUDA is not available") <= 1  # once without a GPU, never with one
    assert "FutureWarning" not in log


def test_eval_only_reproduces_the_trained_ap(trained, tmp_path):
    out, log = trained
    again = coco_ap(
        train_net(
            *QUICKSTART,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
            "OUTPUT_DIR",
            str(tmp_path),
        )
    )
    for k, v in coco_ap(log).items():
        if not math.isnan(v):
            assert again[k] == pytest.approx(v, abs=1e-3), k


def test_eval_only_in_the_trainings_folder_leaves_its_files_alone(trained):
    """--eval-only into a training's OUTPUT_DIR writes into OUTPUT_DIR/eval_<checkpoint>/: the
    training's results.json (for a sweep it marks the run finished, for the comparison it is the
    run), config.yaml and inference/ files stay its own. With --resume the checkpoint is the
    training's last."""
    out, _ = trained
    kept = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".pth")]
    assert {"results.json", "config.yaml", "coco_instances_results.json"} <= {p.name for p in kept}
    before = {p: p.read_bytes() for p in kept}
    again = coco_ap(
        train_net(
            *QUICKSTART,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(out / "model_0000099.pth"),
            "OUTPUT_DIR",
            str(out),
        )
    )
    assert {p: p.read_bytes() for p in kept} == before
    with open(out / "eval_model_0000099" / "results.json") as f:
        record = json.load(f)
    assert record["iteration"] is None and record["weights"].endswith("model_0000099.pth")
    assert record["results"]["bbox"]["AP"] == pytest.approx(again["AP"], abs=1e-3)
    last = (out / "last_checkpoint").read_text().strip()
    train_net(*QUICKSTART, "--eval-only", "--resume", "OUTPUT_DIR", str(out))
    with open(out / f"eval_{os.path.splitext(last)[0]}" / "results.json") as f:
        assert json.load(f)["weights"] == str(out / last)
    assert {p: p.read_bytes() for p in kept} == before


def test_several_test_datasets_get_a_folder_each(tmp_path):
    """With two DATASETS.TEST, each evaluator writes under inference/<dataset>/: the second does
    not overwrite the first's files (the safety metrics among them)."""
    import train_net
    from d2_focalstar.data.catalog import register_coco_json_datasets
    from d2_focalstar.data.shapes import ShapesSpec, generate_shapes_dataset
    from test_model import quickstart_cfg

    generate_shapes_dataset(tmp_path / "tiny", ShapesSpec(2, 2, 64, 1, 2, 12, 20, seed=1))
    json_file, images = str(tmp_path / "tiny" / "val.json"), str(tmp_path / "tiny" / "val")
    cfg = quickstart_cfg(
        "DATASETS.COCO_JSON",
        str([[f"tiny_{k}_val", json_file, images] for k in "ab"]),
        "DATASETS.TEST",
        "('tiny_a_val', 'tiny_b_val')",
        "OUTPUT_DIR",
        str(tmp_path),
    )
    register_coco_json_datasets(cfg)
    folders = []
    for name in cfg.DATASETS.TEST:
        evaluators = train_net.Trainer.build_evaluator(cfg, name)._evaluators
        folders.append({e._output_dir for e in evaluators})
    assert folders == [{str(tmp_path / "inference" / name)} for name in cfg.DATASETS.TEST]
    one = quickstart_cfg("DATASETS.TEST", "('tiny_a_val',)", "OUTPUT_DIR", str(tmp_path))
    assert {
        e._output_dir for e in train_net.Trainer.build_evaluator(one, "tiny_a_val")._evaluators
    } == {str(tmp_path / "inference")}


def test_default_flstar_training_does_not_diverge(trained):
    out, _ = trained
    with open(out / "config.yaml") as f:
        cfg = f.read()
    # the run used the defaults: FL* with the default cap on its factor
    assert re.search(r"LOSS_TYPE: FLSTAR", cfg) and re.search(r"MAX_FACTOR: 100\.0", cfg)
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f if '"total_loss"' in line]
    losses = [r["total_loss"] for r in rows]
    assert rows[-1]["iteration"] == ITERS - 1
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


def test_two_process_cpu_run_through_launch(tmp_path):
    log = train_net(
        *QUICKSTART,
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.MAX_ITER",
        "6",
        "SOLVER.WARMUP_ITERS",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
        "OUTPUT_DIR",
        str(tmp_path),
        here=False,
    )
    assert "World size: 2" in log
    with open(tmp_path / "log.txt.rank1") as f:
        assert "Rank of current process: 1. World size: 2" in f.read()
    assert os.path.isfile(tmp_path / "model_final.pth")
    # evaluation was sharded over both processes and gathered: every val image was scored
    assert "Start inference on 32 batches" in log or "on 2 devices" in log
    assert not math.isnan(coco_ap(log)["AP"])
    # with weights to load (read first by the launching process): resume, and evaluate
    train_net(
        *QUICKSTART,
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "--resume",
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.MAX_ITER",
        "8",
        "SOLVER.WARMUP_ITERS",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(tmp_path),
        here=False,
    )
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["iteration"] == 8
    log = train_net(
        *QUICKSTART,
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "--eval-only",
        "MODEL.WEIGHTS",
        str(tmp_path / "model_final.pth"),
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
        here=False,
    )
    assert not math.isnan(coco_ap(log)["AP"])
