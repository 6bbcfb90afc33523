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
from d2_focalstar.run.results import RunRecordError, load_run, run_state
from d2_focalstar.study.fig4 import loss_curves, plot_fig4
from d2_focalstar.study.sweep import SweepRun, plan_sweep
from d2_focalstar.study.tables import comparison_rows, setting_names, to_csv, to_markdown
from helpers import FAST, QUICKSTART, REPO, assert_one_line_error, run_here


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
    runs = plan_sweep(["CE", "FL", "FLSTAR"], [0, 1], {("FLSTAR", "gamma"): [0.125, 0.5]})
    assert [r.name for r in runs] == [
        "ce_s0",
        "ce_s1",
        "fl_g2_s0",
        "fl_g2_s1",
        "flstar_g0.125_s0",
        "flstar_g0.125_s1",
        "flstar_g0.5_s0",
        "flstar_g0.5_s1",
    ]
    # without values: the table's (FL*: the proposal's gammas; FL: its default gamma)
    assert [r.name for r in plan_sweep(["FLSTAR", "FL"], [0])] == [
        "flstar_g0.125_s0",
        "flstar_g0.25_s0",
        "flstar_g0.5_s0",
        "fl_g2_s0",
    ]
    assert SweepRun("FLSTAR", (("gamma", 0.5),), 1).opts() == [
        "MODEL.FOCALSTAR.LOSS_TYPE",
        "FLSTAR",
        "SEED",
        "1",
        "MODEL.FOCALSTAR.GAMMA",
        "0.5",
    ]
    assert SweepRun("FL", (("gamma", 2.0),), 0).opts()[-2:] == [
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA",
        "2.0",
    ]
    # another detector's keys: its own node
    assert SweepRun("FL", (("gamma", 1.0),), 0, alpha=0.75).opts("MODEL.FCOS")[-4:] == [
        "MODEL.FCOS.FOCAL_LOSS_GAMMA",
        "1.0",
        "MODEL.FCOS.FOCAL_LOSS_ALPHA",
        "0.75",
    ]


def test_sweep_plan_of_table_1_alphas_and_any_parameter():
    """RetinaNet's Table 1: CE at three alphas, FL at four gammas; names say what differs."""
    runs = plan_sweep(["CE", "FL"], [0], {("FL", "gamma"): [0.5, 5]}, alphas=[0.25, 0.75])
    assert [r.name for r in runs] == [
        "ce_a0.25_s0",
        "ce_a0.75_s0",
        "fl_g0.5_a0.25_s0",
        "fl_g5_a0.25_s0",
        "fl_g0.5_a0.75_s0",
        "fl_g5_a0.75_s0",
    ]
    assert runs[1].opts()[-2:] == ["MODEL.RETINANET.FOCAL_LOSS_ALPHA", "0.75"]
    capped = plan_sweep(["FLSTAR"], [0], {("FLSTAR", "max_factor"): [10]})
    assert [r.name for r in capped] == [
        "flstar_g0.125_cap10_s0",
        "flstar_g0.25_cap10_s0",
        "flstar_g0.5_cap10_s0",
    ]


def test_sweep_plan_of_learning_rates_and_its_command(tmp_path):
    """--base-lrs: each setting at each rate, the rate in the folder name and in the opts that
    reach the run's config; bad rates and a rate given twice are one-line errors."""
    runs = plan_sweep(["CE", "FL"], [0, 1], alphas=[0.75], base_lrs=[0.005, 0.02])
    assert [r.name for r in runs] == [
        "ce_a0.75_s0_lr0.005",
        "ce_a0.75_s1_lr0.005",
        "ce_a0.75_s0_lr0.02",
        "ce_a0.75_s1_lr0.02",
        "fl_g2_a0.75_s0_lr0.005",
        "fl_g2_a0.75_s1_lr0.005",
        "fl_g2_a0.75_s0_lr0.02",
        "fl_g2_a0.75_s1_lr0.02",
    ]
    assert runs[2].opts()[-2:] == ["SOLVER.BASE_LR", "0.02"]
    assert "SOLVER.BASE_LR" not in plan_sweep(["CE"], [0])[0].opts()
    args = [*QUICKSTART, "--loss-types", "FL", "--out", str(tmp_path)]
    proc = run_here("tools/sweep.py", *args, "--base-lrs", "0.01", "0.04", "--dry-run")
    assert proc.returncode == 0, proc.output[-3000:]
    assert "fl_g2_s0_lr0.01: new" in proc.output and "SOLVER.BASE_LR 0.04)" in proc.output
    for bad, needle in (
        (["--base-lrs", "0"], "--base-lrs 0: a learning rate must be a positive"),
        (["--base-lrs", "0.01", "--", "SOLVER.BASE_LR", "0.02"], "give one"),
    ):
        proc = run_here("tools/sweep.py", *args, "--dry-run", *bad)
        assert proc.returncode == 2 and needle in proc.stderr, proc.output[-2000:]


def _fake_run(
    folder,
    loss_type,
    gamma,
    seed,
    ap,
    lamr=None,
    max_factor=100.0,
    lr=None,
    weights=None,
    datasets=None,
    amp=None,
):
    """A finished run's folder; weights, datasets ((train, test) lists) and amp are left out of
    results.json where None, as in files written before they were recorded."""
    os.makedirs(folder)
    if lr is not None:  # the solver settings as detectron2's config.yaml of the run has them
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(
                f"MODEL:\n  DEVICE: cpu\nSOLVER:\n  BASE_LR: {lr}\n  IMS_PER_BATCH: 8\n"
                "  MAX_ITER: 600\n"
            )
    results = {
        "bbox": {
            "AP": ap,
            "AP50": ap + 20,
            "AP75": ap - 5,
            "APs": ap - 10,
            "APm": ap + 5,
            "APl": float("nan"),
        }
    }
    if lamr is not None:
        results["safety"] = {"LAMR": lamr, "R@0.1FPPI": 100 - lamr, "LAMR-person": lamr}
    record = {
        "loss_type": loss_type,
        "gamma": gamma,
        "seed": seed,
        "max_factor": max_factor,
        "results": results,
    }
    if weights is not None:
        record["weights"] = weights
    if datasets is not None:
        record["datasets"] = {"train": datasets[0], "test": datasets[1]}
    if amp is not None:  # a solver record in results.json: load_run reads only the recipe's keys
        # (warm-up, clipping) from config.yaml
        record["solver"] = {"amp": amp, **({"base_lr": lr} if lr is not None else {})}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(record, f)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for it in range(0, 40, 10):
            f.write(
                json.dumps(
                    {
                        "iteration": it,
                        "loss_cls": 1.0 / (it + 1),
                        "loss_box_reg": 0.5,
                        "total_loss": 1.5,
                    }
                )
                + "\n"
            )
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
    records = [
        load_run(str(runs / n)) for n in ("fl_s0", "fl_s1", "flstar_s0", "flstar_s1", "ce_s0")
    ]
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
    assert [r["AP"] for r in table if r["setting"] == "FLSTAR g=0.25"] == [
        "31.00",
        "35.00",
        "33.00",
    ]


def test_a_non_default_cap_is_a_setting_of_its_own(runs):
    _fake_run(runs / "capped_s0", "FLSTAR", 0.25, 0, 40.0, max_factor=10.0)
    records = [load_run(str(runs / n)) for n in ("fl_s0", "flstar_s0", "flstar_s1", "capped_s0")]
    means = {r["setting"]: r for r in comparison_rows(records)[1] if r["run"] == "mean"}
    assert means["FLSTAR g=0.25"]["AP"] == 33.0 and means["FLSTAR g=0.25 cap=10"]["AP"] == 40.0


def test_compare_command_on_fixture_folders(runs, tmp_path):
    proc = run_here(
        "tools/compare.py",
        *[str(runs / n) for n in ("fl_s0", "fl_s1", "flstar_s0", "flstar_s1")],
        str(tmp_path / "not_a_run"),
        "--out",
        str(tmp_path / "cmp" / "table"),
        check=True,
    )
    assert "| mean | FLSTAR g=0.25 |" in proc.stdout
    assert "skipped" in proc.stderr and "not_a_run" in proc.stderr
    for ext in (".md", ".csv", "_curves.png"):
        assert os.path.getsize(tmp_path / "cmp" / f"table{ext}") > 100


def test_compare_skips_runs_whose_files_are_cut_short_or_not_a_record_naming_them(runs, tmp_path):
    """A half-written results.json, one without its keys, a metrics.json with a null line: the
    comparison goes on without them (or without the line), a warning names each file."""
    (runs / "half").mkdir()
    (runs / "half" / "results.json").write_text('{"loss_type": "FL", "results": {"bbox": {"AP": 3')
    (runs / "keyless").mkdir()
    (runs / "keyless" / "results.json").write_text('{"seed": 0}')
    (runs / "gone").mkdir()  # a seed that diverged: named in the table's file, not averaged
    (runs / "gone" / "results.json").write_text(
        '{"loss_type": "FL", "results": {}, "seed": 4, "iteration": 433, '
        '"diverged": "Loss became infinite or NaN at iteration=433!"}'
    )
    with open(runs / "fl_s1" / "metrics.json", "a") as f:
        f.write("\nnull\n")
    record = json.loads((runs / "flstar_s0" / "results.json").read_text())
    (runs / "flstar_s0" / "results.json").write_text(
        json.dumps(dict(record, weights_sha256="ab" * 32))
    )
    proc = run_here(
        "tools/compare.py",
        *[str(runs / n) for n in ("fl_s0", "fl_s1", "half", "keyless", "gone", "flstar_s0")],
        "--resamples",
        "0",
        "--out",
        str(tmp_path / "cmp" / "table"),
        check=True,
    )
    assert "| mean | FLSTAR g=0.25 |" in proc.stdout and "| fl_s1 |" in proc.stdout
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "| gone |" not in table and "| mean | FL g=2 | 2 |" in table
    assert (
        "Diverged (recorded, never retried; not in the rows, means or intervals): "
        "gone (seed 4, iteration 433).\n" in table
    )
    # a run from other weights (its SHA-256): the table says it compares two starting points
    assert "\nStarted from 2 different weights: " in table
    assert "sha256 not recorded: fl_s0, fl_s1, gone;" in table
    assert table.endswith("sha256 abababababab: flstar_s0.\n")
    lines = proc.stderr.splitlines()
    assert any(
        f"skipped {runs / 'half' / 'results.json'}: not valid JSON" in line for line in lines
    )
    assert any(
        f"skipped {runs / 'keyless' / 'results.json'}: lacks 'loss_type'" in line for line in lines
    )
    assert any(
        f"{runs / 'fl_s1' / 'metrics.json'}: 1 line(s) that are not the record" in line
        for line in lines
    )
    assert os.path.getsize(tmp_path / "cmp" / "table_curves.png") > 100
    (runs / "odd").mkdir()  # keys of the wrong type: refused by load_run, not a crash in the table
    (runs / "odd" / "results.json").write_text(
        '{"loss_type": "FL", "results": {}, "params": [2], "seed": "a"}'
    )
    with pytest.raises(RunRecordError, match=r"odd/results.json: 'params' is \[2\], 'seed' is 'a'"):
        load_run(str(runs / "odd"))


@pytest.mark.filterwarnings("ignore:No artists with labels")  # plot() is replaced by a recorder
def test_training_curves_use_the_last_record_of_each_iteration(tmp_path, monkeypatch):
    """metrics.json of a run killed after iteration 29 and resumed from its checkpoint at 19:
    iterations 20-29 twice, out of order; the resumed run's records are the ones drawn."""
    import matplotlib.axes

    from d2_focalstar.run.results import read_metrics
    from d2_focalstar.study.curves import plot_training_curves

    lines = [{"iteration": i, "total_loss": 10.0 - i / 10} for i in range(0, 30, 5)]  # first run
    # resumed at 20
    lines += [{"iteration": i, "total_loss": 1.0 - i / 100} for i in range(20, 40, 5)]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = read_metrics(str(tmp_path))
    assert [r["iteration"] for r in rows] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert [r["total_loss"] for r in rows][3:6] == [8.5, 0.8, 0.75]  # 20 and 25: the resumed run's
    drawn = []
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda self, x, y, *a, **k: drawn.append((list(x), list(y)))
    )
    plot_training_curves([str(tmp_path)], str(tmp_path / "curves.png"))
    assert drawn == [([r["iteration"] for r in rows], [r["total_loss"] for r in rows])]


@pytest.mark.parametrize("out", ["", "figures/"])
def test_plot_losses_needs_a_file_name_in_its_prefix(tmp_path, out):
    proc = run_here("tools/plot_losses.py", "--out", out)
    assert_one_line_error(proc, "plot_losses.py", f"--out {out!r} is not a path prefix")
    assert not [n for n in os.listdir(REPO) if n.endswith((".png.png", ".svg.png"))]


@pytest.mark.parametrize("out", ["", "tables/"])
def test_compare_needs_a_file_name_in_its_prefix(tmp_path, out):
    proc = run_here("tools/compare.py", str(tmp_path), "--out", out)
    assert_one_line_error(proc, "compare.py", f"--out {out!r} is not a path prefix")
    assert not [n for n in os.listdir(REPO) if n in (".md", ".csv", "_curves.png")]


def test_run_state(tmp_path):
    assert run_state(str(tmp_path / "absent")) == "new"
    # killed before its last_checkpoint was written
    (tmp_path / "model_0000004.pth").write_bytes(b"")
    assert run_state(str(tmp_path)) == "interrupted"
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    assert run_state(str(tmp_path)) == "interrupted"
    (tmp_path / "results.json").write_text("{}")
    assert run_state(str(tmp_path)) == "done"


def test_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path):
    out = tmp_path / "sweep"
    sweep = [
        "tools/sweep.py",
        *QUICKSTART,
        "--loss-types",
        "CE",
        "FL",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--",
        *FAST,
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "1",
    ]
    first = run_here(*sweep, check=True)
    assert "ce_s0: new" in first.stdout and "fl_g2_s0: new" in first.stdout
    for name, loss_type in (("ce_s0", "CE"), ("fl_g2_s0", "FL")):
        record = load_run(str(out / name))
        assert record["loss_type"] == loss_type and record["iteration"] == 2

    # interrupt fl_g2_s0 after its first checkpoint: drop what the end of training wrote
    fl = out / "fl_g2_s0"
    os.remove(fl / "results.json")
    os.remove(fl / "model_final.pth")
    (fl / "last_checkpoint").write_text("model_0000000.pth")
    again = run_here(*sweep, check=True)
    assert "ce_s0: done" in again.stdout and "fl_g2_s0: interrupted" in again.stdout
    assert load_run(str(fl))["iteration"] == 2
    log = (fl / "log.txt").read_text()
    resumed = log[log.rindex("Command line arguments") :]  # the second train_net.py of this folder
    assert "resume=True" in resumed and "model_0000000.pth" in resumed
    assert "Starting training from iteration 1" in resumed

    # a run that died in its final evaluation: resumed from model_final, no step left to run,
    # it still records the iteration it finished at
    os.remove(fl / "results.json")
    again = run_here(*sweep, check=True)
    assert "fl_g2_s0: interrupted" in again.stdout
    assert load_run(str(fl))["iteration"] == 2

    # the same folder, another warm-up: its finished runs are not this sweep's, and are named
    cut = sweep.index("--")
    other = run_here(*sweep[:cut], "--dry-run", *sweep[cut:], "SOLVER.WARMUP_ITERS", "7")
    assert_one_line_error(
        other, "sweep.py", "2 finished run(s)", f"{out / 'ce_s0'}: warmup_iters 2 (the config: 7)"
    )


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
        [
            sys.executable,
            "tools/sweep.py",
            *QUICKSTART,
            "--loss-types",
            "CE",
            "FL",
            "--jobs",
            "2",
            "--status-every",
            "1",
            "--out",
            str(out),
            "--",
            *FAST,
            "SOLVER.MAX_ITER",
            "100000",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    from d2_focalstar.fileio import write_json

    _fake_run(runs / "collapsed_s0", "FLSTAR", 0.5, 0, float("nan"))
    path = runs / "collapsed_s0" / "results.json"
    write_json(str(path), json.loads(path.read_text()))
    assert '"AP": null' in path.read_text()
    _fake_run(runs / "collapsed_s1", "FLSTAR", 0.5, 1, 0.5)
    _fake_run(runs / "collapsed_s2", "FLSTAR", 0.5, 2, float("nan"))
    assert '"AP": NaN' in (runs / "collapsed_s2" / "results.json").read_text()
    records = [
        load_run(str(runs / n))
        for n in ("fl_s0", "fl_s1", "collapsed_s0", "collapsed_s1", "collapsed_s2")
    ]
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
    assert setting_names(records) == [
        "FL g=2",
        "FLSTAR g=0.5",
        "FLSTAR g=0.5",
        "FLSTAR g=0.5 lr=0.005",
    ]
    means = {r["setting"]: r for r in comparison_rows(records)[1] if r["run"] == "mean"}
    assert means["FLSTAR g=0.5"]["AP"] == 11.0 and means["FLSTAR g=0.5 lr=0.005"]["AP"] == 40.0


def test_results_json_records_the_solver_settings(tmp_path):
    from d2_focalstar.run.results import write_results

    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.OUTPUT_DIR, cfg.SOLVER.BASE_LR = str(tmp_path), 0.005
    write_results(cfg, {"bbox": {"AP": 1.0}}, 7)
    assert load_run(str(tmp_path))["solver"] == {
        "base_lr": 0.005,
        "max_iter": cfg.SOLVER.MAX_ITER,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "amp": False,
        "warmup_iters": cfg.SOLVER.WARMUP_ITERS,
        "clip_gradients": cfg.SOLVER.CLIP_GRADIENTS.ENABLED,
    }
    cfg.SOLVER.AMP.ENABLED = True
    write_results(cfg, {"bbox": {"AP": 1.0}}, 7)
    assert load_run(str(tmp_path))["solver"]["amp"] is True


def test_results_json_records_the_bytes_of_the_weights_a_run_started_from(tmp_path):
    """The same config and seed build another trunk on another CPU: the record names the weights
    file by its SHA-256, and Table 1's rows refuse runs from two starting points, naming them."""
    import hashlib

    import torch

    from d2_focalstar.run.results import write_results
    from d2_focalstar.study.ablation import ablation
    from d2_focalstar.study.table1 import table1_rows

    weights = tmp_path / "trunk.pth"
    weights.write_bytes(b"trunk B" * 100_000)
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS = str(tmp_path / "run"), str(weights)
    write_results(cfg, {"bbox": {"AP": 1.0}}, 7)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    record = load_run(cfg.OUTPUT_DIR)
    assert record["weights_sha256"] == sha
    assert record["provenance"]["cpu"]["threads"] == torch.get_num_threads()
    cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS = str(tmp_path / "random_init"), ""
    write_results(cfg, {"bbox": {"AP": 1.0}}, 7)
    assert load_run(cfg.OUTPUT_DIR)["weights_sha256"] is None
    # an evaluation alone: its weights are the checkpoint it evaluated, not a starting point
    cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS = str(tmp_path / "eval"), str(weights)
    write_results(cfg, {"bbox": {"AP": 1.0}}, None)
    assert "weights_sha256" not in load_run(cfg.OUTPUT_DIR)

    old = [_rate_record("CE", None, 0.75, 0.005, s, 50.0) for s in (0, 1)]  # no hash recorded
    new = [dict(_rate_record("FL", 2.0, 0.25, 0.02, 0, 52.0), weights_sha256=sha)]
    rows, _ = table1_rows(old + [_rate_record("FL", 2.0, 0.25, 0.02, 0, 52.0)])  # one point
    assert sum(r["seeds"] for r in rows) == 3
    table1_rows([dict(r, weights_sha256=sha) for r in old] + new)  # one trunk, recorded
    with pytest.raises(RunRecordError, match="started from 2") as e:
        table1_rows(old + new)
    message = str(e.value)
    assert "not recorded: CE_None_0.75_0.005_s0, CE_None_0.75_0.005_s1" in message
    assert f"sha256 {sha[:12]}: FL_2.0_0.25_0.02_s0" in message and "\n" not in message
    # without a SHA-256, other paths are other starting points; no file: random init or a URL
    moved = [dict(r, weights="output/other_trunk.pth") for r in old[:1]]
    with pytest.raises(RunRecordError, match="started from 2"):
        table1_rows(old[1:] + moved + [_rate_record("FL", 2.0, 0.25, 0.02, 0, 52.0)])
    urls = [dict(r, weights_sha256=None, weights="detectron2://R-18.pkl") for r in old]
    with pytest.raises(RunRecordError, match="'detectron2://R-18.pkl' no file: CE_None"):
        table1_rows(urls + [dict(new[0], weights_sha256=None, weights="")])
    # the ablation names its step
    with pytest.raises(ValueError, match="^step 'trunks': .*started from 2"):
        ablation([("trunks", old + new)], num_resamples=10)


def test_table1_refuses_runs_of_two_warm_ups_read_from_the_record_or_its_config(tmp_path):
    """The proxy's warm-up went from 300 to 1,000 iterations before Table 1 on the committed
    trunk: a run of each recipe in one table would compare recipes, not losses. The record holds
    the warm-up and clipping; an older one without them is read from its saved config.yaml."""
    from d2_focalstar.run.results import recipes, write_results
    from d2_focalstar.study.table1 import table1_rows

    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.OUTPUT_DIR, cfg.SOLVER.WARMUP_ITERS = str(tmp_path / "new"), 1000
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    write_results(cfg, {"bbox": {"AP": 1.0}}, 7)
    assert load_run(cfg.OUTPUT_DIR)["solver"]["warmup_iters"] == 1000
    old = tmp_path / "old"  # a record written before the recipe was: its config.yaml says
    old.mkdir()
    (old / "config.yaml").write_text(
        "SOLVER:\n  BASE_LR: 0.005\n  MAX_ITER: 3000\n  WARMUP_ITERS: 300\n"
        "  CLIP_GRADIENTS:\n    ENABLED: false\n"
    )
    record = {k: v for k, v in load_run(cfg.OUTPUT_DIR).items() if k != "folder"}
    record["solver"] = {"base_lr": 0.005, "max_iter": 3000}
    (old / "results.json").write_text(json.dumps(record))
    assert load_run(str(old))["solver"]["warmup_iters"] == 300
    assert load_run(str(old))["solver"]["clip_gradients"] is False

    def warm(r, w):
        return dict(r, solver=dict(r["solver"], warmup_iters=w, clip_gradients=False))

    ce = [warm(_rate_record("CE", None, 0.75, 0.005, s, 50.0), 1000) for s in (0, 1)]
    fl = _rate_record("FL", 2.0, 0.25, 0.02, 0, 52.0)
    rows, _ = table1_rows(ce + [warm(fl, 1000)])
    assert sum(r["seeds"] for r in rows) == 3
    rows, _ = table1_rows(ce + [fl])  # a record that does not say: not counted as another
    assert sum(r["seeds"] for r in rows) == 3
    with pytest.raises(RunRecordError, match="runs of one recipe, these have 2") as e:
        table1_rows(ce + [warm(fl, 300)])
    message = str(e.value)
    assert "warmup_iters=1000 clip_gradients=False: CE_None_0.75_0.005_s0, CE_None" in message
    assert message.count("warmup_iters=300 clip_gradients=False: FL_2.0_0.25_0.02_s0") == 1
    clipped = dict(fl, solver=dict(fl["solver"], warmup_iters=1000, clip_gradients=True))
    assert len(recipes(ce + [clipped])) == 2
    # a record giving only part of the recipe conflicts with none that agrees on that part
    partial = dict(fl, solver=dict(fl["solver"], warmup_iters=1000))
    assert recipes(ce + [partial]) == ["warmup_iters=1000 clip_gradients=False"]
    # compare.py never averages two recipes as seeds of one setting
    assert setting_names([ce[0], ce[1], warm(ce[0], 300)]) == ["CE", "CE", "CE warmup=300"]
    assert setting_names(ce + [clipped])[-1] == "FL g=2 lr=0.02 clip=on alpha=0.25"


def test_a_diverged_run_is_a_result_until_a_training_starts_again_in_its_folder(tmp_path):
    from d2_focalstar.run.results import RunDiverged, forget_divergence, write_results

    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.OUTPUT_DIR, cfg.SEED = str(tmp_path), 3
    write_results(cfg, {}, 84, diverged="Loss became infinite or NaN at iteration=84!")
    assert run_state(str(tmp_path)) == "diverged"
    with pytest.raises(RunDiverged, match="diverged at iteration 84 .Loss became") as e:
        load_run(str(tmp_path))
    assert e.value.record["seed"] == 3 and e.value.record["solver"]["base_lr"] == cfg.SOLVER.BASE_LR
    forget_divergence(str(tmp_path))
    assert run_state(str(tmp_path)) == "new"
    write_results(cfg, {"bbox": {"AP": 1.0}}, 7)  # a finished run's record is never removed
    forget_divergence(str(tmp_path))
    assert run_state(str(tmp_path)) == "done"


def _means(records):
    return {r["setting"]: r for r in comparison_rows(records)[1] if r["run"] == "mean"}


def test_runs_that_differ_in_weights_are_not_seeds_of_one_setting(runs):
    # most start from scratch (''), two from ImageNet, one from a run's own final model
    for seed in (2, 3):
        _fake_run(runs / f"scratch_s{seed}", "FLSTAR", 0.25, seed, 30.0, weights="")
    for seed in (0, 1):
        _fake_run(
            runs / f"imagenet_s{seed}",
            "FLSTAR",
            0.25,
            seed,
            50.0,
            weights="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
        )
    _fake_run(runs / "finetune_s0", "FLSTAR", 0.25, 0, 60.0, weights="output/coco/model_final.pth")
    names = ("flstar_s0", "scratch_s2", "scratch_s3", "imagenet_s0", "imagenet_s1", "finetune_s0")
    records = [load_run(str(runs / n)) for n in names]
    # flstar_s0 does not say: no setting of its own
    assert setting_names(records) == (
        ["FLSTAR g=0.25"] * 3
        + ["FLSTAR g=0.25 weights=R-50.pkl"] * 2
        + ["FLSTAR g=0.25 weights=model_final.pth"]
    )
    means = _means(records)
    assert means["FLSTAR g=0.25 weights=R-50.pkl"]["AP"] == 50.0
    assert means["FLSTAR g=0.25"]["seeds"] == "3"

    # two files of one name are two initialisations: their names tell them apart
    _fake_run(runs / "other_s0", "FLSTAR", 0.25, 0, 70.0, weights="output/voc/model_final.pth")
    names = setting_names(records + [load_run(str(runs / "other_s0"))])
    assert names[-2:] == [
        "FLSTAR g=0.25 weights=output/coco/model_final.pth",
        "FLSTAR g=0.25 weights=output/voc/model_final.pth",
    ]


def test_runs_that_differ_in_datasets_are_not_seeds_of_one_setting(runs):
    usual = (["a_train"], ["a_val"])
    _fake_run(runs / "a_s0", "FL", 2.0, 0, 30.0, datasets=usual)
    _fake_run(runs / "a_s1", "FL", 2.0, 1, 32.0, datasets=usual)
    _fake_run(runs / "ab_s0", "FL", 2.0, 0, 40.0, datasets=(["a_train", "b_train"], ["a_val"]))
    _fake_run(runs / "b_s0", "FL", 2.0, 0, 50.0, datasets=(["a_train"], ["b_val"]))
    records = [load_run(str(runs / n)) for n in ("a_s0", "a_s1", "ab_s0", "b_s0", "fl_s1")]
    assert setting_names(records) == [
        "FL g=2",
        "FL g=2",
        "FL g=2 train=a_train+b_train",
        "FL g=2 test=b_val",
        "FL g=2",
    ]
    means = _means(records)
    assert means["FL g=2"]["AP"] == pytest.approx((30 + 32 + 32) / 3)  # fl_s1 does not say: usual
    assert (
        means["FL g=2 train=a_train+b_train"]["AP"] == 40.0
        and means["FL g=2 test=b_val"]["AP"] == 50.0
    )


def test_mixed_precision_runs_are_not_seeds_of_one_setting(runs):
    # fl_s0, fl_s1: written before results.json recorded amp; unknown never makes a setting
    _fake_run(runs / "fp32_s2", "FL", 2.0, 2, 34.0, amp=False)
    _fake_run(runs / "amp_s0", "FL", 2.0, 0, 20.0, amp=True)
    records = [load_run(str(runs / n)) for n in ("fl_s0", "fl_s1", "fp32_s2", "amp_s0")]
    assert setting_names(records) == ["FL g=2", "FL g=2", "FL g=2", "FL g=2 amp=on"]
    means = _means(records)
    assert means["FL g=2"]["seeds"] == "3" and means["FL g=2"]["AP"] == 32.0
    assert means["FL g=2 amp=on"]["AP"] == 20.0
    # most runs in mixed precision: the full-precision one is the odd one
    _fake_run(runs / "amp_s1", "FL", 2.0, 1, 22.0, amp=True)
    records = [load_run(str(runs / n)) for n in ("fl_s0", "fp32_s2", "amp_s0", "amp_s1")]
    assert setting_names(records) == ["FL g=2", "FL g=2 amp=off", "FL g=2", "FL g=2"]


def test_each_setting_is_compared_with_fl_at_its_own_knobs(tmp_path):
    for name, loss, gamma, seed, ap, lr in (
        ("fl_s0", "FL", 2.0, 0, 30.0, 0.02),
        ("fl_g1_s0", "FL", 1.0, 0, 50.0, 0.02),
        ("ce_s0", "CE", 0.0, 0, 40.0, 0.02),
        ("ce_s1", "CE", 0.0, 1, 42.0, 0.02),
        ("fl_lo_s0", "FL", 2.0, 0, 10.0, 0.005),
        ("ce_lo_s0", "CE", 0.0, 0, 25.0, 0.005),
        ("flstar_x_s0", "FLSTAR", 0.25, 0, 33.0, 0.001),
    ):
        _fake_run(tmp_path / name, loss, gamma, seed, ap, lamr=60.0, lr=lr)
    records = [load_run(str(p)) for p in sorted(tmp_path.iterdir())]
    columns, rows = comparison_rows(records)
    means = {r["setting"]: r for r in rows if r["run"] == "mean"}
    assert means["CE"]["AP vs FL"] == 11.0  # 41 vs FL g=2 (not FL g=1, first by name)
    assert means["FL g=1"]["AP vs FL"] == 20.0
    assert means["CE lr=0.005"]["AP vs FL"] == 15.0  # 25 vs FL at lr 0.005 (10), not at 0.02
    assert means["FL g=2 lr=0.005"]["AP vs FL"] == 0.0
    # no FL at lr 0.001: no difference, rather than one to FL at another learning rate
    x = means["FLSTAR g=0.25 lr=0.001"]
    assert all(math.isnan(x[f"{m} vs FL"]) for m in columns[3:])
    md = to_markdown(columns, rows)
    assert "| mean | FLSTAR g=0.25 lr=0.001 | 1 | 33.00 | 53.00 | 28.00 |" in md
    assert "| mean | CE lr=0.005 | 1 | 25.00 (+15.00) |" in md
    table = list(csv.DictReader(io.StringIO(to_csv(columns, rows))))
    assert [r["AP vs FL"] for r in table if r["setting"] == "FLSTAR g=0.25 lr=0.001"] == ["", ""]


def test_without_fl_g2_the_baseline_is_the_first_fl_by_name(tmp_path):
    _fake_run(tmp_path / "fl_g3", "FL", 3.0, 0, 20.0)
    _fake_run(tmp_path / "fl_g1", "FL", 1.0, 0, 10.0)
    _fake_run(tmp_path / "flstar", "FLSTAR", 0.25, 0, 30.0)
    records = [load_run(str(tmp_path / n)) for n in ("fl_g3", "fl_g1", "flstar")]
    for order in (records, records[::-1]):
        assert _means(order)["FLSTAR g=0.25"]["AP vs FL"] == 20.0  # vs FL g=1


def _sweep_module():
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, "tools", "sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_warns_when_its_runs_will_share_gpus(monkeypatch):
    warning = _sweep_module().gpu_sharing_warning
    assert warning(2, 1, ["0", "1"]) is None and warning(1, 4, ["0", "1", "2", "3"]) is None
    line = warning(2, 2, ["0", "1", "2"])
    assert "--jobs 2 x --num-gpus 2 = 4 GPUs wanted, 3 visible" in line and "share GPUs" in line
    assert warning(12, 1, []) is None  # CPU runs: nothing to share

    def dry_run(visible, *more):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        return run_here("tools/sweep.py", *QUICKSTART, *more, "--dry-run", "--out", "unused")

    assert (
        dry_run("0,1", "--jobs", "3").stdout.count("3 GPUs wanted, 2 visible: runs will share GPUs")
        == 1
    )
    assert "warning" not in dry_run("", "--jobs", "3").stdout
    # more GPUs per run than there are: every run would fail, so the sweep does not start
    proc = dry_run("0,1", "--num-gpus", "4")
    assert proc.returncode == 2 and "--num-gpus 4: only 2 GPUs visible (0,1)" in proc.stderr


def test_last_line_of_a_log(tmp_path):
    last_line = _sweep_module().last_line
    log = tmp_path / "sweep.log"
    log.write_text("x" * 100000 + "\nTraceback ...\ntrain_net.py: error: bad\n\n  \n")
    assert last_line(str(log)) == "train_net.py: error: bad"
    assert last_line(str(tmp_path / "absent.log")) is None
    log.write_text("")
    assert last_line(str(log)) is None


def test_a_failed_run_shows_its_reason_and_log(tmp_path):
    """With --jobs > 1 a run's output is in its log: a failure prints the log's last line (the
    reason) and its path, and the final message lists every failed run with its log, in the
    sweep's order (not the order they happened to end in)."""
    out = tmp_path / "sweep"
    # a config the sweep accepts (it checks the file and opts), whose runs fail at their start
    proc = run_here(
        "tools/sweep.py",
        *QUICKSTART,
        "--loss-types",
        "CE",
        "FL",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--",
        *FAST,
        "DATASETS.TRAIN",
        "('nope_train',)",
        check=False,
    )
    logs = [out / "ce_s0" / "sweep.log", out / "fl_g2_s0" / "sweep.log"]
    for name, log in zip(("ce_s0", "fl_g2_s0"), logs):
        assert (
            f"{name}: failed, {log} ends: train_net.py: error: DATASETS.TRAIN: dataset "
            "'nope_train' is not registered"
        ) in proc.stdout, proc.output[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"sweep.py: 2 run(s) failed: ce_s0 (log {logs[0]}), fl_g2_s0 (log {logs[1]}) "
        "(rerun to retry them)"
    )


def test_a_run_that_diverges_is_a_result_the_sweep_does_not_retry(tmp_path):
    """A diverged run is recorded (its results.json) and reported as diverged, not failed; the
    sweep exits 0 and, run again, leaves it as it is: retrying until a seed survives would
    favour the unstable setting."""
    args = [*QUICKSTART, "--loss-types", "FLSTAR", "--gammas", "0.25", "--base-lrs", "50", "0.001"]
    args += ["--out", str(tmp_path)]
    opts = ["--", *FAST, "SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "0"]
    opts += ["SOLVER.CLIP_GRADIENTS.ENABLED", "False"]
    proc = run_here("tools/sweep.py", *args, *opts)
    assert proc.returncode == 0, proc.output[-3000:]
    assert "1 run(s) diverged: flstar_g0.25_s0_lr50 (recorded in their results.json" in proc.stdout
    assert run_state(str(tmp_path / "flstar_g0.25_s0_lr50")) == "diverged"
    assert run_state(str(tmp_path / "flstar_g0.25_s0_lr0.001")) == "done"
    proc = run_here("tools/sweep.py", *args, *opts)
    assert proc.returncode == 0, proc.output[-3000:]
    assert "flstar_g0.25_s0_lr50: diverged" in proc.stdout and "exit" not in proc.stdout


def test_evaluations_of_each_runs_own_checkpoint_stay_seeds_of_one_setting(tmp_path):
    """--eval-only records the checkpoint it evaluated as its weights, a different file for each
    run: that is not a setting, so the seeds are still averaged and compared with FL."""
    for loss, gamma, seed in (
        ("FL", 2.0, 0),
        ("FL", 2.0, 1),
        ("FLSTAR", 0.25, 0),
        ("FLSTAR", 0.25, 1),
    ):
        folder = tmp_path / f"{loss}_s{seed}"
        _fake_run(folder, loss, gamma, seed, 30.0 + seed)
        path = folder / "results.json"
        record = json.loads(path.read_text())
        record.update(iteration=None, weights=f"output/sweep/{loss}_s{seed}/model_final.pth")
        path.write_text(json.dumps(record))
    records = [load_run(str(p)) for p in sorted(tmp_path.iterdir())]
    means = {r["setting"]: r for r in comparison_rows(records)[1] if r["run"] == "mean"}
    assert set(means) == {"FL g=2", "FLSTAR g=0.25"}
    assert means["FLSTAR g=0.25"]["seeds"] == "2" and means["FLSTAR g=0.25"]["AP vs FL"] == 0.0


@pytest.mark.parametrize(
    "study, table",
    [
        ("study_cpu", "compare_cpu"),
        ("study_gpu", "compare_gpu"),
        ("proxy_shapes", "proxy_shapes_vs_ce"),
        ("proxy_shapes_long", "proxy_shapes_long_vs_ce"),
    ],
)
def test_committed_study_tables_rebuild_from_their_result_files(study, table):
    """docs/RESULTS.md's tables come from docs/results/<table>.md, which the comparison code must
    rebuild, unchanged, from the committed per-run files (as tools/rebuild_results.sh does)."""
    docs = os.path.join(os.path.dirname(__file__), "..", "docs", "results")
    folder = os.path.join(docs, study)
    runs = sorted(
        os.path.join(folder, d)
        for d in os.listdir(folder)
        if os.path.isdir(os.path.join(folder, d))
    )
    assert len(runs) >= 6
    columns, rows = comparison_rows([load_run(r) for r in runs])
    with open(os.path.join(docs, f"{table}.md")) as f:
        assert to_markdown(columns, rows) == f.read()


def test_sweep_takes_an_fcos_config_unchanged():
    """The same sweep command on an FCOS config sets the FCOS node's keys."""
    proc = run_here(
        "tools/sweep.py",
        "--config-file",
        "configs/quickstart_fcos_flstar.yaml",
        "--loss-types",
        "FL",
        "CE",
        "--fl-gamma",
        "1",
        "--alphas",
        "0.5",
        "--dry-run",
        check=True,
    )
    assert (
        "fl_g1_a0.5_s0: new (MODEL.FOCALSTAR.LOSS_TYPE FL SEED 0 MODEL.FCOS.FOCAL_LOSS_GAMMA 1.0 "
        "MODEL.FCOS.FOCAL_LOSS_ALPHA 0.5)" in proc.stdout
    )
    assert "ce_a0.5_s0: new" in proc.stdout and "RETINANET" not in proc.stdout


def _run_with_detections(
    folder, loss_type, gamma, seed, gt_file, detections, test="synth_val", gz=False, alpha=0.25
):
    """A finished run whose config registers its test set from ``gt_file`` (DATASETS.COCO_JSON)
    and whose COCOEvaluator saved ``detections`` (None: saved nothing)."""
    import gzip

    os.makedirs(folder / "inference")
    params = {"gamma": gamma} if loss_type != "CE" else {}
    record = {
        "loss_type": loss_type,
        "params": params,
        "gamma": gamma,
        "seed": seed,
        "alpha": alpha,
        "datasets": {"train": ["synth_train"], "test": [test]},
        "results": {
            "bbox": {
                "AP": 10.0 + seed,
                "AP50": 20.0,
                "AP75": 5.0,
                "APs": 1.0,
                "APm": 2.0,
                "APl": 3.0,
            }
        },
    }
    (folder / "results.json").write_text(json.dumps(record))
    (folder / "config.yaml").write_text(
        f"DATASETS:\n  COCO_JSON: [[{test}, {gt_file}, {os.path.dirname(gt_file)}]]\n"
        "TEST:\n  SAFETY:\n    ENABLED: true\n    CLASSES: [class1]\n    IOU_THRESHOLD: 0.5\n"
    )
    if detections is not None:
        path = folder / "inference" / ("coco_instances_results.json" + (".gz" if gz else ""))
        data = json.dumps(detections).encode()
        path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture(scope="module")
def runs_with_detections(tmp_path_factory):
    from d2_focalstar.data.synthetic_coco import synthetic_coco

    root = tmp_path_factory.mktemp("boot")
    gt, dets = synthetic_coco(num_images=80, num_categories=4, seed=2)
    (root / "gt.json").write_text(json.dumps(gt))
    rng = np.random.default_rng(0)
    worse = [d for d in dets if not (d["score"] > 0.5 and rng.random() < 0.5)]
    other = {**gt, "images": gt["images"][:40]}
    (root / "other.json").write_text(json.dumps(other))
    _run_with_detections(root / "flstar_s0", "FLSTAR", 0.25, 0, str(root / "gt.json"), dets)
    _run_with_detections(
        root / "flstar_s1", "FLSTAR", 0.25, 1, str(root / "gt.json"), dets, gz=True
    )
    _run_with_detections(root / "fl_s0", "FL", 2.0, 0, str(root / "gt.json"), worse)
    _run_with_detections(root / "fl_s1", "FL", 2.0, 1, str(root / "gt.json"), worse)
    _run_with_detections(root / "ce_s0", "CE", 0.0, 0, str(root / "gt.json"), None)  # saved nothing
    _run_with_detections(
        root / "elsewhere_s0",
        "CE",
        0.0,
        0,
        str(root / "other.json"),
        [d for d in dets if d["image_id"] <= 40],
        test="other_val",
    )
    return root


def test_compare_adds_paired_bootstrap_intervals_from_saved_detections(
    runs_with_detections, tmp_path
):
    root = runs_with_detections
    proc = run_here(
        "tools/compare.py",
        *[str(root / n) for n in ("flstar_s0", "flstar_s1", "fl_s0", "fl_s1", "ce_s0")],
        "--resamples",
        "100",
        "--out",
        str(tmp_path / "cmp"),
        check=True,
    )
    text = (tmp_path / "cmp_intervals.md").read_text()
    row = next(
        line for line in text.splitlines() if line.startswith("| FLSTAR g=0.25 | FL g=2 | 2 vs 2 |")
    )
    diff, interval = row.split(" | ")[3].split(" ", 1)
    low, high = (float(v) for v in interval.strip("[]").split(", "))
    assert float(diff) > 0 and 0 < low <= float(diff) <= high  # the better detections, by a margin
    assert "Paired bootstrap over the 80 test images, 100 resamples" in text
    # the run that saved no detections is named and left out; CE has no FL to compare with here
    assert "ce_s0: no saved detections" in proc.stderr and "| CE |" not in text
    assert list(csv.DictReader(open(tmp_path / "cmp_intervals.csv")))[0]["AP low"] == f"{low:.2f}"


def test_intervals_against_a_chosen_setting_and_refusals(runs_with_detections, tmp_path):
    root = runs_with_detections
    folders = [str(root / n) for n in ("flstar_s0", "fl_s0", "fl_s1")]
    proc = run_here(
        "tools/compare.py",
        *folders,
        "--versus",
        "FLSTAR g=0.25",
        "--resamples",
        "20",
        "--out",
        str(tmp_path / "v"),
        check=True,
    )
    assert "| FL g=2 | FLSTAR g=0.25 | 2 vs 1 | -" in (tmp_path / "v_intervals.md").read_text()
    assert_one_line_error(
        run_here(
            "tools/compare.py", *folders, "--versus", "CE alpha=0.75", "--out", str(tmp_path / "x")
        ),
        "compare.py",
        "--versus 'CE alpha=0.75' is not one of the settings",
    )
    # runs on another dataset: their difference gets no interval, said in one line naming both
    proc = run_here(
        "tools/compare.py",
        str(root / "flstar_s0"),
        str(root / "elsewhere_s0"),
        "--versus",
        "FLSTAR g=0.25",
        "--out",
        str(tmp_path / "y"),
    )
    assert_one_line_error(
        proc, "compare.py", "evaluated on different datasets", "other_val", "synth_val"
    )


def _drop_confident(dets, share, seed):
    """Detections made worse: ``share`` of those above 0.5 removed."""
    rng = np.random.default_rng(seed)
    return [d for d in dets if not (d["score"] > 0.5 and rng.random() < share)]


def _table1_runs(root, quality, seeds=(0, 1), runs="runs"):
    """Runs of {(loss, gamma, alpha, lr or None): share of confident detections dropped}, each
    with its detections and their AP."""
    from d2_focalstar.data.synthetic_coco import synthetic_coco
    from d2_focalstar.evaluation.bootstrap import RunEvaluation

    gt, dets = synthetic_coco(num_images=80, num_categories=4, seed=3)
    (root / "gt.json").write_text(json.dumps(gt))
    for (loss, gamma, alpha, lr), share in quality.items():
        for seed in seeds:
            folder = root / runs / f"{loss}_{gamma}_{alpha}_{lr}_s{seed}"
            kept = _drop_confident(dets, share, seed)
            _run_with_detections(
                folder, loss, gamma, seed, str(root / "gt.json"), kept, alpha=alpha
            )
            # its AP: that of its detections
            record = json.loads((folder / "results.json").read_text())
            record["results"]["bbox"]["AP"] = RunEvaluation(gt, kept).metrics()["AP"]
            if lr is not None:
                record["solver"] = {"base_lr": lr, "max_iter": 3000}
            (folder / "results.json").write_text(json.dumps(record))
    return sorted(map(str, (root / runs).iterdir()))


@pytest.mark.parametrize("fl_better", [True, False])
def test_table1_checks_the_calibration_against_the_paper(tmp_path, fl_better):
    """tools/table1.py: the paper's numbers beside the runs', and each check decided by the runs:
    FL g=2 above the best CE only where its detections are better by a margin the bootstrap sees."""
    quality = {
        ("CE", None, 0.25, None): 0.6,
        ("CE", None, 0.75, None): 0.3,
        ("FL", 1.0, 0.25, None): 0.2,
        ("FL", 2.0, 0.25, None): 0.0 if fl_better else 0.7,
        ("FL", 5.0, 0.25, None): 0.5,  # a gamma outside 1-2: check 2 can fail
    }
    folders = _table1_runs(tmp_path, quality)
    out = tmp_path / "t1"
    proc = run_here(
        "tools/table1.py",
        *folders,
        "--resamples",
        "200",
        "--out",
        str(out),
        check=True,
    )
    text = (tmp_path / "t1.md").read_text()
    assert text in proc.stdout
    assert "| CE |  | 0.75 | 31.1 | +0.0 | 0.75 |  | 2 |" in text and "best CE |" in text
    assert "| FL | 2 | 0.25 | 34.0 | +2.9 | 0.25 |  | 2 |" in text
    assert "| FL | 0.5 | 0.5 | 32.9 | +1.8 |  |  | 0 | not run |" in text
    assert "Rates tried" not in text
    assert "- CE alpha 0.75 above CE alpha 0.25: **met**" in text
    fl2 = next(line for line in text.splitlines() if line.startswith("- FL g=2 above the best CE"))
    low = float(fl2.split("[")[1].split(",")[0])
    if fl_better:
        assert (
            "**met**" in fl2
            and low > 0
            and "best gamma 2" in text
            and "Calibrated: **yes**" in text
        )
    else:
        assert "**not met**" in fl2 and "best gamma 1" in text and "Calibrated: **no**" in text


def test_gamma_profile_check_is_measured_only_where_it_could_fail():
    """Check 2 (FL's best gamma is 1 or 2) needs a finished gamma outside 1-2: gamma 1 and 2
    alone always peak inside; a gamma whose seeds all diverged is named, not counted."""
    from d2_focalstar.study.table1 import gamma_profile_check

    def row(gamma, mean, seeds=1, diverged=0, lr=0.01, rates=()):
        return dict(
            loss="FL",
            gamma=gamma,
            mean=mean,
            seeds=seeds,
            diverged=diverged,
            lr=lr,
            rates=list(rates),
        )

    ce = dict(loss="CE", gamma=None, mean=60.0, seeds=3, diverged=0, lr=0.005, rates=[])
    g1, g2 = row(1.0, 50.0), row(2.0, 54.0)
    g5_gone = row(5.0, math.nan, seeds=0, diverged=2, rates=[(0.01, 0.0, 1, 1), (0.02, 0.0, 1, 1)])
    assert gamma_profile_check([ce, g1, g2]) == (
        "FL's gamma profile peaks at 1-2",
        "not measured",
        "no FL gamma outside 1-2 has a finished seed",
    )
    assert gamma_profile_check([ce, g1, g2, g5_gone])[1:] == (
        "not measured",
        "no FL gamma outside 1-2 has a finished seed; "
        "gamma 5 diverged at every rate tried (0.01, 0.02)",
    )
    assert gamma_profile_check([ce, row(5.0, 40.0), row(0.5, 45.0, seeds=0, diverged=1)])[1:] == (
        "not measured",
        "no FL gamma 1 or 2 has a finished seed; gamma 0.5 diverged at every rate tried (0.01)",
    )
    assert gamma_profile_check([g2, row(5.0, 40.0)])[1:] == (
        "met",
        "best gamma 2 (54.00 AP) of 2, 5",
    )
    assert gamma_profile_check([g1, g2, row(0.5, 55.0)])[1] == "not met"


def test_table1_puts_each_loss_at_its_own_best_rate(tmp_path):
    """Runs of a row at several learning rates: the rate with the higher mean AP on the seeds
    both have is the row's, named in the table, and the interval is against the picked CE; FL
    at its good rate is above CE only because the rate was not shared. Runs that differ in
    another knob besides the rate are still refused."""
    quality = {
        ("CE", None, 0.75, 0.005): 0.3,
        ("CE", None, 0.75, 0.02): 0.8,  # CE's rate is 0.005
        ("FL", 2.0, 0.25, 0.005): 0.7,  # FL at CE's rate: below CE
        ("FL", 2.0, 0.25, 0.02): 0.0,
    }
    folders = _table1_runs(tmp_path, quality)
    args = ["--resamples", "200", "--out", str(tmp_path / "t1")]
    text = run_here("tools/table1.py", *folders, *args, check=True).stdout
    assert "| CE |  | 0.75 | 31.1 | +0.0 | 0.75 | 0.005 | 2 |" in text
    assert "| FL | 2 | 0.25 | 34.0 | +2.9 | 0.25 | 0.02 | 2 |" in text
    tried = next(line for line in text.splitlines() if line.startswith("Rates tried"))
    assert "CE alpha 0.75: **0.005: " in tried and "FL g=2 alpha 0.25: 0.005: " in tried
    assert "**0.02: " in tried.split("FL g=2")[1]
    fl2 = next(line for line in text.splitlines() if line.startswith("- FL g=2 above the best CE"))
    assert "**met**" in fl2
    # the sweep arguments of each row at its rate (gpu_checks.sh: seeds 1-4 after the grid)
    proc = run_here("tools/table1.py", *folders, "--sweep-args", check=True)
    assert proc.stdout.splitlines() == [
        "--loss-types CE --alphas 0.75 --base-lrs 0.005",
        "--loss-types FL --param FL.gamma=2 --alphas 0.25 --base-lrs 0.02",
    ]
    # FL only at CE's rate: below it
    at_one_rate = [f for f in folders if "_0.02_" not in f or "CE" in f]
    text = run_here("tools/table1.py", *at_one_rate, *args, check=True).stdout
    assert "| FL | 2 | 0.25 | 34.0 | +2.9 | 0.25 | 0.005 | 2 |" in text
    fl2 = next(line for line in text.splitlines() if line.startswith("- FL g=2 above the best CE"))
    assert "**not met**" in fl2
    # CE at a third rate, the best on seed 0, diverged on seed 1: a diverged seed counts as AP 0,
    # so 0.005 stays CE's rate (left out instead, 0.01 would win on the one seed both finished)
    more = _table1_runs(tmp_path, {("CE", None, 0.75, 0.01): 0.0}, runs="more")
    path = tmp_path / "more" / "CE_None_0.75_0.01_s1" / "results.json"
    record = json.loads(path.read_text())
    record.update(results={}, iteration=84, diverged="Loss became infinite or NaN at iteration=84!")
    path.write_text(json.dumps(record))
    proc = run_here("tools/table1.py", *folders, *more, *args, check=True)
    assert "| CE |  | 0.75 | 31.1 | +0.0 | 0.75 | 0.005 | 2 |" in proc.stdout
    assert "0.01: " in proc.stdout and " (1 of 2 diverged)" in proc.stdout
    assert "diverged: " in proc.stderr and "CE_None_0.75_0.01_s1" in proc.stderr
    # at that rate alone: the row says so, its mean is its finished seed's
    proc = run_here("tools/table1.py", *more, *args, check=True)
    assert "| CE |  | 0.75 | 31.1 | +0.0 | 0.75 | 0.01 | 1 + 1 diverged |" in proc.stdout
    assert "Diverged seeds (" in proc.stdout
    # another knob differs too: not one setting at several rates
    for seed in (0, 1):
        path = tmp_path / "runs" / f"FL_2.0_0.25_0.02_s{seed}" / "results.json"
        record = json.loads(path.read_text())
        record["solver"]["max_iter"] = 6000
        path.write_text(json.dumps(record))
    assert_one_line_error(
        run_here("tools/table1.py", *folders, *args), "table1.py", "FL gamma=2.0", "give one"
    )


def test_ablation_gives_the_gap_and_its_interval_at_each_step(tmp_path):
    """tools/ablation.py: per step, FL g=2 against the best CE at their best rates, with the
    interval; a step without runs is 'not run' and the next step's move is not from it; the gap's
    move between two run steps is the difference of their gaps."""
    before = _table1_runs(
        tmp_path, {("CE", None, 0.75, None): 0.2, ("FL", 2.0, 0.25, None): 0.7}, runs="before"
    )
    after = _table1_runs(
        tmp_path,
        {
            ("CE", None, 0.75, 0.005): 0.6,
            ("CE", None, 0.75, 0.02): 0.9,  # CE's rate: 0.005
            ("FL", 2.0, 0.25, 0.005): 0.8,
            ("FL", 2.0, 0.25, 0.02): 0.0,  # FL's rate: 0.02
        },
        runs="after",
    )
    args = ["--resamples", "100", "--out", str(tmp_path / "abl")]
    steps = ["--step", "before", *before, "--step", "+ lever", "--step", "after", *after]
    proc = run_here("tools/ablation.py", *steps, *args, check=True)
    text = (tmp_path / "abl.md").read_text()
    assert text in proc.stdout
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines()[2:5]}
    assert rows["+ lever"] == ["not run", "not run", "not run", " |"]
    gaps = {}
    for step, sign in (("before", -1), ("after", +1)):
        ce, fl, gap, moved = rows[step]
        d, interval = gap.strip("*").split(" ", 1)
        low, high = (float(v) for v in interval.strip("*[]").split(", "))
        assert sign * low > 0 and sign * high > 0 and gap.startswith("**")  # excludes 0: bold
        assert low <= float(d) <= high
        gaps[step] = float(d)
        assert "alpha 0.75" in ce and "2 seeds" in ce and "2 seeds" in fl
        assert moved == " |"  # the step before 'after' was not run
    assert "lr 0.005 of 2 tried (0.005-0.02)" in rows["after"][0]
    assert "lr 0.02 of 2 tried (0.005-0.02)" in rows["after"][1]
    # the gap is table1.py's FL g=2 against the best CE on the same runs
    t1 = run_here("tools/table1.py", *after, *args[:2], "--out", str(tmp_path / "t1")).stdout
    fl2 = next(line for line in t1.splitlines() if line.startswith("| FL | 2 |"))
    assert fl2.split(" | ")[-1] == rows["after"][2].strip("*") + " |"
    # two run steps in a row: the move is the difference of their gaps
    proc = run_here("tools/ablation.py", "--step", "a", *before, "--step", "b", *after, *args)
    b = next(line for line in proc.stdout.splitlines() if line.startswith("| b |"))
    assert b.split(" | ")[4] == f"{gaps['after'] - gaps['before']:+.2f} |"
    # CE diverged at every rate of a step: said so, and no gap
    for path in (tmp_path / "after").glob("CE_*/results.json"):
        record = json.loads(path.read_text())
        record.update(results={}, iteration=39, diverged="Loss became infinite or NaN")
        path.write_text(json.dumps(record))
    proc = run_here("tools/ablation.py", "--step", "a", *before, "--step", "b", *after, *args)
    b = next(line for line in proc.stdout.splitlines() if line.startswith("| b |"))
    # (both rates failed on both seeds: the tie goes to the lower rate)
    assert b.split(" | ")[1:3] == [
        "all diverged (alpha 0.75, lr 0.005 of 2 tried (0.005-0.02), 2 seeds)",
        rows["after"][1],
    ]
    assert b.endswith("|  |  |")
    # a step whose folders hold no run, and a step mixing two settings: one line naming it
    assert_one_line_error(
        run_here("tools/ablation.py", "--step", "empty", str(tmp_path), *args),
        "ablation.py",
        "step 'empty': none of its folders is a run",
    )
    for seed in (0, 1):  # FL g=2 of 'after' at another schedule too: not one setting
        path = tmp_path / "after" / f"FL_2.0_0.25_0.02_s{seed}" / "results.json"
        record = json.loads(path.read_text())
        record["solver"]["max_iter"] = 6000
        path.write_text(json.dumps(record))
    assert_one_line_error(
        run_here("tools/ablation.py", "--step", "after", *after, *args),
        "ablation.py",
        "step 'after'",
        "FL gamma=2.0",
    )


def test_ablation_configs_change_one_thing_per_step():
    """configs/proxy80_ablation/: each step differs from the one before only in what its label
    says, and the last differs from the round-3 proxy only in the schedule (and speed settings)."""

    def load(name):  # the files alone (load_config also checks that the weights exist)
        cfg = get_cfg()
        add_focalstar_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, "configs", name))
        return cfg

    def flat(cfg, prefix=""):
        out = {}
        for k, v in cfg.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    def changed(a, b):
        fa, fb = (flat(load(c)) for c in (a, b))
        return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)} - {"OUTPUT_DIR"}

    chain = [
        "proxy_shapes_flstar.yaml",
        "proxy80_ablation/1_classes.yaml",
        "proxy80_ablation/2_no_clipping.yaml",
        "proxy80_ablation/3_neutral_trunk.yaml",
    ]
    steps = [changed(a, b) for a, b in zip(chain, chain[1:])]
    assert steps[0] == {
        "MODEL.RETINANET.NUM_CLASSES",
        "DATASETS.TRAIN",
        "DATASETS.TEST",
        "TEST.SAFETY.CLASSES",
    }
    assert steps[1] == {"SOLVER.CLIP_GRADIENTS.ENABLED"}
    assert steps[2] == {"MODEL.WEIGHTS", "MODEL.BACKBONE.FREEZE_AT"}
    schedule = {"SOLVER.IMS_PER_BATCH", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS"}
    rate = {"SOLVER.BASE_LR"}  # the round-2 proxy's; the ablation runs a rate grid
    speed = {
        "SOLVER.CHECKPOINT_PERIOD",
        "TEST.EVAL_PERIOD",
        "DATALOADER.NUM_WORKERS",
        "MODEL.BACKBONE.NAME",  # the cached trunk's, the same ResNet
        "MODEL.FOCALSTAR.FEATURE_CACHE",
    }
    assert changed(chain[-1], "proxy80_flstar.yaml") == schedule | rate | speed


def _rate_record(loss, gamma, alpha, lr, seed, ap, diverged=False):
    record = {
        "loss_type": loss,
        "params": {} if gamma is None else {"gamma": gamma},
        "gamma": gamma,
        "alpha": alpha,
        "seed": seed,
        "solver": {"base_lr": lr, "max_iter": 3000},
        "results": {} if diverged else {"bbox": {"AP": ap}},
        "folder": f"{loss}_{gamma}_{alpha}_{lr}_s{seed}",
    }
    if diverged:
        record.update(diverged="Loss became infinite or NaN", iteration=84)
    return record


def test_table1_rate_pick_does_not_depend_on_the_other_runs_given():
    """Where every rate of a row diverged on the grid's seed, the row keeps the rate whose seeds
    were run after the grid (more finished seeds), then the lowest, whatever the other rows'
    rates; a finished run with no AP (it detected nothing: COCO's NaN) counts as AP 0 and does
    not take the seeds the rates share away."""
    from d2_focalstar.study.table1 import table1_rows

    grid = [_rate_record("CE", None, 0.75, lr, 0, None, True) for lr in (0.0025, 0.005, 0.02)]
    fl = [_rate_record("FL", 2.0, 0.25, 0.02, s, 40.0) for s in range(5)]
    rows, _ = table1_rows(grid + fl[:1])
    ce = next(r for r in rows if r["loss"] == "CE" and r["paper_alpha"] == 0.75)
    assert ce["lr"] == 0.0025 and ce["diverged"] == 1 and ce["seeds"] == 0
    more = [_rate_record("CE", None, 0.75, 0.0025, s, 15.0) for s in (1, 2, 3, 4)]
    rows, _ = table1_rows(grid + more + fl)  # 0.02 now the most common rate of all runs
    ce = next(r for r in rows if r["loss"] == "CE" and r["paper_alpha"] == 0.75)
    assert ce["lr"] == 0.0025 and ce["seeds"] == 4 and ce["diverged"] == 1
    # a rate that detected nothing (NaN AP) on seed 0: still scored on seed 0, as 0
    runs = [_rate_record("CE", None, 0.75, 0.005, s, 30.0 if s == 0 else 25.0) for s in range(5)]
    runs += [_rate_record("CE", None, 0.75, 0.02, 0, 29.0)]
    runs += [_rate_record("CE", None, 0.75, 0.04, 0, float("nan"))]
    rows, _ = table1_rows(runs)
    ce = next(r for r in rows if r["loss"] == "CE" and r["paper_alpha"] == 0.75)
    assert ce["lr"] == 0.005 and ce["seeds"] == 5
    assert [(lr, score) for lr, score, _, _ in ce["rates"]] == [
        (0.005, 30.0),
        (0.02, 29.0),
        (0.04, 0.0),
    ]
