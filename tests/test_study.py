"""The study tools: Fig. 4 from the loss functions, sweeps that skip and resume, and Table 2
from result folders."""
import csv
import io
import json
import math
import os

import numpy as np
import pytest
from detectron2.config import get_cfg

from d2_focalstar.config import add_focalstar_config
from d2_focalstar.study import (
    SweepRun,
    comparison_rows,
    load_run,
    loss_curves,
    plan_sweep,
    plot_fig4,
    run_state,
    setting_names,
    to_csv,
    to_markdown,
)
from helpers import FAST, QUICKSTART, run


def test_fig4_curves_come_from_the_loss_functions():
    p_t = np.array([0.1, 0.5, 0.9])
    c = loss_curves(p_t)
    log2 = math.log(2)
    for label in ("CE", "FL*, g=0.125", "FL*, g=0.25", "FL*, g=0.5"):
        assert c[label][0][1] == pytest.approx(log2)  # factor 1 at p_t = 0.5
    assert c["FL, g=2"][0][1] == pytest.approx(0.25 * log2)
    np.testing.assert_allclose(c["CE"][1], 1 - p_t)  # |dCE/dx| = 1 - p_t
    # FL*: loss = odds^g * CE with odds = (1-p)/p; at p_t = 0.1, odds = 9
    assert c["FL*, g=0.5"][0][0] == pytest.approx(3 * -math.log(0.1))
    # the hard example gets a larger gradient than under CE, the easy one a smaller one
    assert c["FL*, g=0.5"][1][0] > c["CE"][1][0] and c["FL*, g=0.5"][1][2] < c["CE"][1][2]


def test_fig4_plot_writes_png_and_svg(tmp_path):
    png, svg = plot_fig4(str(tmp_path / "fig4"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in open(svg).read(2000)
    # byte for byte the same the second time (no date, fixed ids): the committed copy diffs clean
    again = plot_fig4(str(tmp_path / "again"))
    for a, b in zip((png, svg), again):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_sweep_plan():
    runs = plan_sweep(["CE", "FL", "FLSTAR"], [0.125, 0.5], [0, 1])
    assert [r.name for r in runs] == ["ce_s0", "ce_s1", "fl_g2_s0", "fl_g2_s1", "flstar_g0.125_s0",
                                      "flstar_g0.125_s1", "flstar_g0.5_s0", "flstar_g0.5_s1"]
    assert SweepRun("FLSTAR", 0.5, 1).opts() == [
        "MODEL.FOCALSTAR.LOSS_TYPE", "FLSTAR", "SEED", "1", "MODEL.FOCALSTAR.GAMMA", "0.5"]
    assert SweepRun("FL", 2.0, 0).opts()[-2:] == ["MODEL.RETINANET.FOCAL_LOSS_GAMMA", "2.0"]


def _fake_run(folder, loss_type, gamma, seed, ap, lamr=None, max_factor=100.0, lr=None):
    os.makedirs(folder)
    if lr is not None:  # the solver settings as detectron2's config.yaml of the run has them
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(f"MODEL:\n  DEVICE: cpu\nSOLVER:\n  BASE_LR: {lr}\n  IMS_PER_BATCH: 8\n  MAX_ITER: 600\n")
    results = {"bbox": {"AP": ap, "AP50": ap + 20, "AP75": ap - 5, "APs": ap - 10, "APm": ap + 5,
                        "APl": float("nan")}}
    if lamr is not None:
        results["safety"] = {"LAMR": lamr, "R@0.1FPPI": 100 - lamr, "LAMR-person": lamr}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"loss_type": loss_type, "gamma": gamma, "seed": seed, "max_factor": max_factor,
                   "results": results}, f)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for it in range(0, 40, 10):
            f.write(json.dumps({"iteration": it, "loss_cls": 1.0 / (it + 1), "loss_box_reg": 0.5,
                                "total_loss": 1.5}) + "\n")
        f.write(json.dumps({"iteration": 39, "bbox/AP": ap}) + "\n")
        f.write('{"iteration": 40, "loss_c')  # a line cut by a kill is ignored


@pytest.fixture
def runs(tmp_path):
    _fake_run(tmp_path / "fl_s0", "FL", 2.0, 0, 30.0, lamr=60.0)
    _fake_run(tmp_path / "fl_s1", "FL", 2.0, 1, 32.0, lamr=58.0)
    _fake_run(tmp_path / "flstar_s0", "FLSTAR", 0.25, 0, 31.0, lamr=50.0)
    _fake_run(tmp_path / "flstar_s1", "FLSTAR", 0.25, 1, 35.0, lamr=54.0)
    _fake_run(tmp_path / "ce_s0", "CE", 0.0, 0, 20.0)
    return tmp_path


def test_comparison_means_spread_and_difference_to_fl(runs):
    records = [load_run(str(runs / n)) for n in ("fl_s0", "fl_s1", "flstar_s0", "flstar_s1", "ce_s0")]
    columns, rows = comparison_rows(records)
    assert columns[:9] == ["run", "setting", "seeds", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert "LAMR" in columns and "R@0.1FPPI" in columns and "LAMR-person" not in columns
    means = {r["setting"]: r for r in rows if r["run"] == "mean"}
    assert means["FL g=2"]["AP"] == 31.0 and means["FL g=2"]["AP vs FL"] == 0.0
    assert means["FLSTAR g=0.25"]["AP"] == 33.0
    assert means["FLSTAR g=0.25"]["AP sd"] == pytest.approx(math.sqrt(8))  # values 31, 35
    assert means["FLSTAR g=0.25"]["AP vs FL"] == 2.0
    assert means["FLSTAR g=0.25"]["LAMR vs FL"] == -7.0  # 52 vs 59
    assert means["CE"]["AP vs FL"] == -11.0 and math.isnan(means["CE"]["AP sd"])  # one seed
    assert math.isnan(means["CE"]["LAMR"])  # no safety metrics in that run

    md = to_markdown(columns, rows)
    assert "| mean | FLSTAR g=0.25 | 2 | 33.00 ± 2.83 (+2.00) |" in md
    table = list(csv.DictReader(io.StringIO(to_csv(columns, rows))))
    assert len(table) == 5 + 3
    assert {r["setting"] for r in table if r["run"] == "mean"} == {"CE", "FL g=2", "FLSTAR g=0.25"}
    assert [r["AP"] for r in table if r["setting"] == "FLSTAR g=0.25"] == ["31.00", "35.00", "33.00"]


def test_a_non_default_cap_is_a_setting_of_its_own(runs):
    _fake_run(runs / "capped_s0", "FLSTAR", 0.25, 0, 40.0, max_factor=10.0)
    records = [load_run(str(runs / n)) for n in ("fl_s0", "flstar_s0", "flstar_s1", "capped_s0")]
    means = {r["setting"]: r for r in comparison_rows(records)[1] if r["run"] == "mean"}
    assert means["FLSTAR g=0.25"]["AP"] == 33.0 and means["FLSTAR g=0.25 cap=10"]["AP"] == 40.0


def test_compare_command_on_fixture_folders(runs, tmp_path):
    proc = run("tools/compare.py", *[str(runs / n) for n in ("fl_s0", "fl_s1", "flstar_s0", "flstar_s1")],
               str(tmp_path / "not_a_run"), "--out", str(tmp_path / "cmp" / "table"), check=True)
    assert "| mean | FLSTAR g=0.25 |" in proc.stdout
    assert "skipped" in proc.stderr and "not_a_run" in proc.stderr
    for ext in (".md", ".csv", "_curves.png"):
        assert os.path.getsize(tmp_path / "cmp" / f"table{ext}") > 100


def test_run_state(tmp_path):
    assert run_state(str(tmp_path / "absent")) == "new"
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    assert run_state(str(tmp_path)) == "interrupted"
    (tmp_path / "results.json").write_text("{}")
    assert run_state(str(tmp_path)) == "done"


def test_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path):
    out = tmp_path / "sweep"
    sweep = ["tools/sweep.py", *QUICKSTART, "--loss-types", "CE", "FL", "--seeds", "0",
             "--out", str(out), "--", *FAST, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"]
    first = run(*sweep, check=True)
    assert "ce_s0: new" in first.stdout and "fl_g2_s0: new" in first.stdout
    for name, loss_type in (("ce_s0", "CE"), ("fl_g2_s0", "FL")):
        record = load_run(str(out / name))
        assert record["loss_type"] == loss_type and record["iteration"] == 2

    # interrupt fl_g2_s0 after its first checkpoint: drop what the end of training wrote
    fl = out / "fl_g2_s0"
    os.remove(fl / "results.json")
    os.remove(fl / "model_final.pth")
    (fl / "last_checkpoint").write_text("model_0000000.pth")
    again = run(*sweep, check=True)
    assert "ce_s0: done" in again.stdout and "fl_g2_s0: interrupted" in again.stdout
    assert load_run(str(fl))["iteration"] == 2
    log = (fl / "log.txt").read_text()
    resumed = log[log.rindex("Command line arguments"):]  # the second train_net.py of this folder
    assert "resume=True" in resumed and "model_0000000.pth" in resumed
    assert "Starting training from iteration 1" in resumed

    # a run that died in its final evaluation: resumed from model_final, no step left to run,
    # it still records the iteration it finished at
    os.remove(fl / "results.json")
    again = run(*sweep, check=True)
    assert "fl_g2_s0: interrupted" in again.stdout
    assert load_run(str(fl))["iteration"] == 2


def _processes_mentioning(text):
    """PIDs of the processes whose command line holds ``text``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds processes through /proc")
def test_stopping_a_sweep_stops_its_runs_and_it_reports_their_progress(tmp_path):
    """SIGTERM to the sweep (a kill, a job scheduler) stops its trainings too instead of leaving
    them running; while they run it prints their iteration and ETA."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO

    out = tmp_path / "sweep"
    sweep = subprocess.Popen(
        [sys.executable, "tools/sweep.py", *QUICKSTART, "--loss-types", "CE", "FL", "--jobs", "2",
         "--status-every", "1", "--out", str(out), "--", *FAST, "SOLVER.MAX_ITER", "100000"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [out / "ce_s0" / "sweep.log", out / "fl_g2_s0" / "sweep.log"]
    deadline = time.time() + 300
    while time.time() < deadline and not all(p.exists() and "iter:" in p.read_text() for p in logs):
        time.sleep(1)
    time.sleep(2)  # a status line after both logs show progress
    runs = [pid for pid in _processes_mentioning(str(out)) if pid != sweep.pid]
    assert len(runs) >= 2, runs
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 130, output[-3000:]
    assert "stopping 2 run(s)" in output
    assert "running: ce_s0 iter " in output and ", eta " in output
    time.sleep(0.5)
    assert not _processes_mentioning(str(out))


def test_a_seed_without_a_value_is_counted_in_the_mean_row(runs):
    # a run with no detections at all has AP NaN: the mean is over the other seeds and says so.
    # train_net.py writes it as null (strict JSON); results.json files written before that hold
    # a bare NaN: both read as no value.
    from d2_focalstar.checkpoint import write_json

    _fake_run(runs / "collapsed_s0", "FLSTAR", 0.5, 0, float("nan"))
    path = runs / "collapsed_s0" / "results.json"
    write_json(str(path), json.loads(path.read_text()))
    assert '"AP": null' in path.read_text()
    _fake_run(runs / "collapsed_s1", "FLSTAR", 0.5, 1, 0.5)
    _fake_run(runs / "collapsed_s2", "FLSTAR", 0.5, 2, float("nan"))
    assert '"AP": NaN' in (runs / "collapsed_s2" / "results.json").read_text()
    records = [load_run(str(runs / n)) for n in ("fl_s0", "fl_s1", "collapsed_s0", "collapsed_s1",
                                                 "collapsed_s2")]
    columns, rows = comparison_rows(records)
    means = {r["setting"]: r for r in rows if r["run"] == "mean"}
    assert means["FLSTAR g=0.5"]["AP"] == 0.5 and means["FLSTAR g=0.5"]["AP n"] == 1
    md = to_markdown(columns, rows)
    assert "| mean | FLSTAR g=0.5 | 3 | 0.50 (-30.50) [1 of 3 seeds] |" in md
    assert "| mean | FL g=2 | 2 | 31.00 ± 1.41 (+0.00) |" in md  # all seeds: no count shown


def test_several_test_datasets_compare_on_the_first(runs):
    """With two DATASETS.TEST, detectron2 nests results by dataset: the comparison takes the
    first test dataset's, not NaN."""
    _fake_run(runs / "two_s0", "FLSTAR", 0.5, 0, 0.0)
    path = runs / "two_s0" / "results.json"
    record = json.loads(path.read_text())
    record["datasets"] = {"train": ["a_train"], "test": ["a_val", "b_val"]}
    record["results"] = {"b_val": {"bbox": {"AP": 10.0}}, "a_val": {"bbox": {"AP": 42.0}}}
    path.write_text(json.dumps(record))
    rows = comparison_rows([load_run(str(runs / "fl_s0")), load_run(str(runs / "two_s0"))])[1]
    assert [r["AP"] for r in rows if r["run"] == "two_s0"] == [42.0]


def test_runs_that_differ_in_learning_rate_are_not_seeds_of_one_setting(runs):
    # the fixture runs have no solver record and no config.yaml: they count as "unknown"
    _fake_run(runs / "lr_a_s0", "FLSTAR", 0.5, 0, 10.0, lr=0.02)
    _fake_run(runs / "lr_a_s1", "FLSTAR", 0.5, 1, 12.0, lr=0.02)
    _fake_run(runs / "lr_b_s0", "FLSTAR", 0.5, 0, 40.0, lr=0.005)
    records = [load_run(str(runs / n)) for n in ("fl_s0", "lr_a_s0", "lr_a_s1", "lr_b_s0")]
    assert records[1]["solver"] == {"base_lr": 0.02, "max_iter": 600, "ims_per_batch": 8}
    assert setting_names(records) == ["FL g=2", "FLSTAR g=0.5", "FLSTAR g=0.5", "FLSTAR g=0.5 lr=0.005"]
    means = {r["setting"]: r for r in comparison_rows(records)[1] if r["run"] == "mean"}
    assert means["FLSTAR g=0.5"]["AP"] == 11.0 and means["FLSTAR g=0.5 lr=0.005"]["AP"] == 40.0


def test_results_json_records_the_solver_settings(tmp_path):
    from d2_focalstar.engine import write_results
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.OUTPUT_DIR, cfg.SOLVER.BASE_LR = str(tmp_path), 0.005
    write_results(cfg, {"bbox": {"AP": 1.0}}, 7)
    assert load_run(str(tmp_path))["solver"] == {"base_lr": 0.005, "max_iter": cfg.SOLVER.MAX_ITER,
                                                 "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH}
