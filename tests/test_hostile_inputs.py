"""Hostile and careless input, round 3 (issue 24): configs that would run code, run folders
shared by two processes, the tools' surfaces. Each test provokes the fault for real, small and
in-process where the process boundary is not the point."""

import json
import os

import pytest

from helpers import QUICKSTART, REPO, assert_one_line_error, run_here

QUICKSTART_FILE = os.path.join(REPO, QUICKSTART[1])


def _tagged(path, marker, base=QUICKSTART_FILE, key="SEED"):
    """A config whose Python tag would create ``marker`` when constructed."""
    path.write_text(
        f'_BASE_: "{base}"\n{key}: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    return str(path)


# ---- 1. configs that would run code ------------------------------------------------------------


@pytest.mark.parametrize(
    "script,args",
    [
        ("train_net.py", []),
        ("tools/sweep.py", ["--dry-run", "--out", "{tmp}/sweep"]),
        ("tools/anchor_stats.py", []),
        ("tools/pretrain_backbone.py", ["--out", "{tmp}/pb"]),
        ("tools/submit_slurm.py", ["--local", "--"]),
        ("demo.py", ["--input", "{tmp}/none.jpg", "--output", "{tmp}/demo"]),
        ("tools/cache_features.py", []),
        ("tools/benchmark_proxy.py", ["--out", "{tmp}/bp.json"]),
        ("tools/benchmark_loader.py", ["--out", "{tmp}/bl.json"]),
    ],
)
def test_a_python_tag_in_a_config_is_refused_in_every_entry_point(tmp_path, script, args):
    marker = tmp_path / "ran"
    config = _tagged(tmp_path / "tagged.yaml", marker)
    args = [a.format(tmp=tmp_path) for a in args]
    argv = (
        [*args, "--config-file", config]
        if script == "tools/submit_slurm.py"
        else ["--config-file", config, *args]
    )
    proc = run_here(script, *argv)
    assert_one_line_error(
        proc,
        os.path.basename(script),
        "tagged.yaml: line 2 holds a Python tag",
        "!!python/object/apply:os.system",
        "--unsafe-config",
    )
    assert not marker.exists()


def test_a_python_tag_in_a_base_file_is_refused_naming_that_file(tmp_path):
    marker = tmp_path / "ran"
    base = _tagged(tmp_path / "base.yaml", marker)
    (tmp_path / "top.yaml").write_text(f'_BASE_: "{base}"\n')
    proc = run_here("train_net.py", "--config-file", str(tmp_path / "top.yaml"))
    assert_one_line_error(
        proc, "train_net.py", "base.yaml (a _BASE_ of", "line 2", "--unsafe-config"
    )
    assert not marker.exists()


def test_a_base_loop_is_found_before_any_tag_runs_even_when_tags_are_allowed(tmp_path):
    marker = tmp_path / "ran"
    _tagged(tmp_path / "a.yaml", marker, base="b.yaml")
    (tmp_path / "b.yaml").write_text('_BASE_: "a.yaml"\n')
    proc = run_here("train_net.py", "--unsafe-config", "--config-file", str(tmp_path / "a.yaml"))
    assert_one_line_error(proc, "train_net.py", "_BASE_ chain loops")
    assert not marker.exists()  # not once, let alone ~500 times


def test_unsafe_config_allows_tags_in_a_file_one_trusts(tmp_path):
    from d2_focalstar.run.cli import load_config

    (tmp_path / "t.yaml").write_text(
        f'_BASE_: "{QUICKSTART_FILE}"\n'
        'OUTPUT_DIR: !!python/object/apply:os.path.join ["out", "tagged"]\n'
    )
    assert load_config(str(tmp_path / "t.yaml"), allow_unsafe=True).OUTPUT_DIR == os.path.join(
        "out", "tagged"
    )


def test_cache_features_unsafe_config_constructs_the_tag_it_was_told_to_trust(tmp_path):
    """The flag that the refusal names exists in the tool that names it: with it, the tag runs
    (and the quickstart config, which has no feature cache, then stops with its own line)."""
    marker = tmp_path / "ran"
    config = _tagged(tmp_path / "tagged.yaml", marker)
    proc = run_here("tools/cache_features.py", "--unsafe-config", "--config-file", config)
    assert_one_line_error(proc, "cache_features.py", "MODEL.FOCALSTAR.FEATURE_CACHE is empty")
    assert marker.exists()


def test_the_projects_own_configs_need_no_tags():
    from d2_focalstar.run.cli import _check_config_files

    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".yaml"):
            _check_config_files(os.path.join(REPO, "configs", name))  # a ConfigError fails the test


def _finished_run(folder, config_text):
    os.makedirs(folder)
    record = {
        "loss_type": "FL",
        "gamma": 2.0,
        "seed": 0,
        "results": {"bbox": {"AP": 30.0}},
        "datasets": {"train": ["synth_train"], "test": ["synth_val"]},
    }
    (folder / "results.json").write_text(json.dumps(record))
    (folder / "config.yaml").write_text(config_text)


@pytest.mark.parametrize("script", ["tools/compare.py", "tools/table1.py"])
def test_a_saved_config_yaml_with_a_tag_is_read_safely(tmp_path, script):
    marker = tmp_path / "ran"
    _finished_run(tmp_path / "run", f'SOLVER: !!python/object/apply:os.system ["touch {marker}"]\n')
    proc = run_here(script, str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert "Traceback" not in proc.output
    assert "config.yaml: line 1 holds a Python tag" in proc.stderr
    assert not marker.exists()


# ---- 2. one process at a time in a run folder --------------------------------------------------

TINY = [
    *QUICKSTART,
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "DATALOADER.NUM_WORKERS",
    "0",
    "DATASETS.TEST",
    "()",
    "SOLVER.MAX_ITER",
    "1",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
]


def _holding_lock(folder):
    """A process of its own holding ``folder``'s run lock, as a training there would."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom d2_focalstar.run.lock import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    time.sleep(300)\n",
            str(folder),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_training_in_a_run_folder_is_refused_naming_the_holder_until_it_dies(tmp_path):
    import signal

    out = tmp_path / "run"
    holder = _holding_lock(out)
    try:
        proc = run_here("train_net.py", *TINY, "OUTPUT_DIR", str(out))
        assert_one_line_error(
            proc,
            "train_net.py",
            f"OUTPUT_DIR {out} is in use by process {holder.pid}",
            "choose another OUTPUT_DIR",
        )
        assert not (out / "log.txt").exists() and not (out / "metrics.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder's lock does not block
        holder.wait()
    run_here("train_net.py", *TINY, "OUTPUT_DIR", str(out), check=True)
    assert (out / "model_final.pth").exists()


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path):
    from d2_focalstar.run.lock import run_folder_lock

    out = tmp_path / "sweep"
    with run_folder_lock(str(out)):  # the first sweep, running
        proc = run_here(
            "tools/sweep.py",
            *QUICKSTART,
            "--loss-types",
            "CE",
            "--out",
            str(out),
            "--",
            "SOLVER.MAX_ITER",
            "1",
        )
    assert_one_line_error(proc, "sweep.py", f"--out {out} is in use by process {os.getpid()}")
    assert not (out / "ce_s0").exists()


def _fake_scheduler(
    tmp_path, monkeypatch, sbatch='echo "Submitted batch job 4242"', squeue="exit 0"
):
    """sbatch, srun and squeue stand-ins first in PATH; each call of sbatch is counted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "sbatch_calls"
    for name, body in (
        ("sbatch", f'echo x >> "{calls}"\n{sbatch}'),
        ("srun", "exit 0"),
        ("squeue", squeue),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return lambda: len(calls.read_text().splitlines()) if calls.exists() else 0


def test_sweep_slurm_again_does_not_submit_runs_whose_jobs_are_queued(tmp_path, monkeypatch):
    sbatch_calls = _fake_scheduler(
        tmp_path, monkeypatch, squeue='echo "4242_0 PENDING"; echo "4242_1 RUNNING"'
    )
    sweep = [
        "tools/sweep.py",
        *QUICKSTART,
        "--loss-types",
        "CE",
        "FL",
        "--slurm",
        "--out",
        str(tmp_path / "s"),
    ]
    run_here(*sweep, check=True)
    assert sbatch_calls() == 1
    again = run_here(*sweep, check=True)
    assert (
        sbatch_calls() == 1
        and again.stdout.count("is still queued or running: not submitted again") == 2
    )
    monkeypatch.setenv(
        "PATH", os.environ["PATH"].replace(str(tmp_path / "bin"), str(tmp_path / "ended"))
    )
    (tmp_path / "ended").mkdir()
    for name in ("sbatch", "srun"):
        os.symlink(tmp_path / "bin" / name, tmp_path / "ended" / name)
    (tmp_path / "ended" / "squeue").write_text("#!/bin/sh\nexit 0\n")  # the jobs have ended
    (tmp_path / "ended" / "squeue").chmod(0o755)
    run_here(*sweep, check=True)
    assert sbatch_calls() == 2


# ---- 3. keep_runs copies regular files and replaces nothing unasked ---------------------------


def test_keep_runs_refuses_a_symlink_to_a_file_elsewhere(tmp_path):
    _finished_run(tmp_path / "runs" / "r", "SEED: 1\n")
    os.remove(tmp_path / "runs" / "r" / "config.yaml")
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0\n")
    os.symlink(secret, tmp_path / "runs" / "r" / "config.yaml")
    proc = run_here(
        "tools/keep_runs.py", str(tmp_path / "runs" / "r"), "--to", str(tmp_path / "kept")
    )
    assert_one_line_error(
        proc, "keep_runs.py", "config.yaml: a symlink: only regular files are copied"
    )
    assert not (tmp_path / "kept" / "r").exists()


def test_keep_runs_does_not_replace_a_kept_run_without_overwrite(tmp_path):
    _finished_run(tmp_path / "runs" / "r", "SEED: 1\n")
    keep = ["tools/keep_runs.py", str(tmp_path / "runs" / "r"), "--to", str(tmp_path / "kept")]
    run_here(*keep, check=True)
    (tmp_path / "runs" / "r" / "config.yaml").write_text("SEED: 2\n")
    assert_one_line_error(run_here(*keep), "keep_runs.py", "already kept in", "--overwrite")
    assert (tmp_path / "kept" / "r" / "config.yaml").read_text() == "SEED: 1\n"
    run_here(*keep, "--overwrite", check=True)
    assert (tmp_path / "kept" / "r" / "config.yaml").read_text() == "SEED: 2\n"


def test_keep_runs_to_a_file_or_onto_the_run_itself_is_one_line(tmp_path):
    _finished_run(tmp_path / "runs" / "r", "SEED: 1\n")
    (tmp_path / "file").write_text("")
    assert_one_line_error(
        run_here(
            "tools/keep_runs.py", str(tmp_path / "runs" / "r"), "--to", str(tmp_path / "file")
        ),
        "keep_runs.py",
        "is a file",
    )
    assert_one_line_error(
        run_here(
            "tools/keep_runs.py", str(tmp_path / "runs" / "r"), "--to", str(tmp_path / "runs")
        ),
        "keep_runs.py",
        "would be copied onto itself",
    )


# ---- 5 and 11. detections and results no detector writes ---------------------------------------


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    from d2_focalstar.data.synthetic_coco import synthetic_coco

    root = tmp_path_factory.mktemp("gt")
    gt, dets = synthetic_coco(num_images=8, num_categories=2, seed=0)
    (root / "gt.json").write_text(json.dumps(gt))
    return str(root / "gt.json"), dets


def _run_with(folder, loss_type, gt_file, detections_bytes, name="coco_instances_results.json.gz"):
    """A finished run evaluated on ``gt_file`` whose saved detections file holds these bytes."""
    os.makedirs(folder / "inference")
    gamma = None if loss_type == "CE" else 2.0
    record = {
        "loss_type": loss_type,
        "params": {"gamma": gamma} if gamma else {},
        "gamma": gamma,
        "seed": 0,
        "alpha": 0.25,
        "datasets": {"train": ["t"], "test": ["synth_val"]},
        "results": {
            "bbox": {"AP": 10.0, "AP50": 20.0, "AP75": 5.0, "APs": 1.0, "APm": 2.0, "APl": 3.0}
        },
    }
    (folder / "results.json").write_text(json.dumps(record))
    (folder / "config.yaml").write_text(
        f"DATASETS:\n  COCO_JSON: [[synth_val, {gt_file}, {os.path.dirname(gt_file)}]]\n"
    )
    (folder / "inference" / name).write_bytes(detections_bytes)


def _gz(records):
    import gzip

    return gzip.compress(json.dumps(records).encode())


BAD_DETECTIONS = {
    "nan score": (
        lambda d: _gz([d[0], {**d[1], "score": float("nan")}]),
        "detection 1",
        "score nan",
    ),
    "negative score": (lambda d: _gz([{**d[0], "score": -0.5}]), "detection 0", "score -0.5"),
    "inf box": (
        lambda d: _gz([{**d[0], "bbox": [1, 2, float("inf"), 3]}]),
        "detection 0",
        "bbox [1, 2, inf, 3]",
    ),
    "nan box": (
        lambda d: _gz([{**d[0], "bbox": [float("nan"), 2, 3, 3]}]),
        "detection 0",
        "bbox [nan",
    ),
    "string score": (lambda d: _gz([{**d[0], "score": "0.9"}]), "detection 0", "score '0.9'"),
    "no image_id": (
        lambda d: _gz([{k: v for k, v in d[0].items() if k != "image_id"}]),
        "detection 0",
        "no 'image_id'",
    ),
    "unknown category": (
        lambda d: _gz([{**d[0], "category_id": 99}]),
        "has category_id 99",
        "the ground truth",
    ),
    "truncated gzip": (lambda d: _gz(d)[:40], "not a whole gzip file", ""),
    "not gzip": (lambda d: json.dumps(d).encode(), "not a whole gzip file", ""),
    "not JSON": (
        lambda d: __import__("gzip").compress(b"{{{ nope"),
        "not a detections JSON file",
        "",
    ),
    "an object": (lambda d: _gz({"detections": d}), "a JSON dict, where a list of detections", ""),
}


@pytest.mark.parametrize("script", ["tools/compare.py", "tools/table1.py"])
@pytest.mark.parametrize("case", list(BAD_DETECTIONS))
def test_detections_no_detector_writes_are_refused_naming_the_file_and_record(
    tmp_path, ground_truth, case, script
):
    gt_file, dets = ground_truth
    make, *needles = BAD_DETECTIONS[case]
    loss_types = ("FL", "FLSTAR") if script == "tools/compare.py" else ("FL", "CE")
    _run_with(tmp_path / "good", loss_types[0], gt_file, _gz(dets))
    _run_with(tmp_path / "bad", loss_types[1], gt_file, make(dets))
    proc = run_here(
        script,
        str(tmp_path / "good"),
        str(tmp_path / "bad"),
        "--resamples",
        "5",
        "--out",
        str(tmp_path / "cmp"),
    )
    assert_one_line_error(proc, os.path.basename(script), *[n for n in needles if n])
    assert "bad" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ['"31.2"', "[31.2]"])
def test_a_results_json_whose_metric_is_not_a_number_is_skipped_naming_it(tmp_path, value):
    _finished_run(tmp_path / "run", "SEED: 1\n")
    (tmp_path / "run" / "results.json").write_text(
        '{"loss_type": "FL", "results": {"bbox": {"AP": %s}}}' % value
    )
    proc = run_here("tools/compare.py", str(tmp_path / "run"), "--out", str(tmp_path / "c"))
    assert "bbox.AP=" in proc.stderr and "is not a number" in proc.stderr
    assert_one_line_error(proc, "compare.py", "none of the folders holds a finished run")


def test_a_results_json_nested_200k_deep_is_skipped_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("[" * 200_000 + "]" * 200_000)
    proc = run_here("tools/compare.py", str(tmp_path / "run"), "--out", str(tmp_path / "c"))
    assert "nested too deep" in proc.stderr
    assert_one_line_error(proc, "compare.py", "none of the folders holds a finished run")


def _coco_train_file(tmp_path, change):
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [4, 4, 20, 20],
                "area": 400,
                "iscrowd": 0,
            }
        ],
    }
    change(data)
    (tmp_path / "images").mkdir()
    (tmp_path / "train.json").write_text(json.dumps(data))
    return str(tmp_path / "train.json"), str(tmp_path / "images")


@pytest.mark.parametrize(
    "case,change,needle",
    [
        (
            "nan_box",
            lambda d: d["annotations"][0].update(bbox=[float("nan"), 4, 20, 20]),
            "has bbox [nan, 4, 20, 20]",
        ),
        (
            "twice_declared",
            lambda d: d["categories"].append({"id": 2, "name": "c"}),
            "category id 2 is declared 2 times",
        ),
    ],
)
def test_a_coco_json_with_a_nan_box_or_a_category_id_declared_twice_does_not_train(
    tmp_path, case, change, needle
):
    json_file, images = _coco_train_file(tmp_path, change)
    name = f"hostile_{case}"
    proc = run_here(
        "train_net.py",
        *TINY,
        "DATASETS.COCO_JSON",
        str([[name, json_file, images]]),
        "DATASETS.TRAIN",
        f"('{name}',)",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    )
    assert_one_line_error(proc, "train_net.py", json_file, needle)


# ---- 4. a command's outputs: all written at the end, or none -----------------------------------


def test_compare_that_fails_leaves_the_previous_outputs_and_one_that_succeeds_leaves_no_stale_ones(
    tmp_path, ground_truth
):
    gt_file, dets = ground_truth
    _run_with(tmp_path / "fl", "FL", gt_file, _gz(dets))
    _run_with(tmp_path / "flstar", "FLSTAR", gt_file, _gz(dets[: len(dets) // 2]))
    # training curves for one run; the other is like a run of --eval-only (no metrics.json)
    (tmp_path / "fl" / "metrics.json").write_text(
        "".join(json.dumps({"iteration": i, "total_loss": 2.0 - i / 10}) + "\n" for i in range(5))
    )
    runs, out = [str(tmp_path / "fl"), str(tmp_path / "flstar")], str(tmp_path / "cmp" / "c")
    run_here("tools/compare.py", *runs, "--resamples", "5", "--out", out, check=True)
    before = {n: (tmp_path / "cmp" / n).read_bytes() for n in os.listdir(tmp_path / "cmp")}
    assert set(before) == {"c.md", "c.csv", "c_intervals.md", "c_intervals.csv", "c_curves.png"}
    proc = run_here(
        "tools/compare.py", runs[0], "--versus", "nothing", "--resamples", "5", "--out", out
    )
    assert_one_line_error(proc, "compare.py", "--versus 'nothing' is not one of the settings")
    assert {n: (tmp_path / "cmp" / n).read_bytes() for n in os.listdir(tmp_path / "cmp")} == before
    run_here("tools/compare.py", runs[0], "--resamples", "0", "--out", out, check=True)
    # no stale intervals
    assert sorted(os.listdir(tmp_path / "cmp")) == ["c.csv", "c.md", "c_curves.png"]
    # no curves to draw (the eval-only run alone): no empty figure, and no stale one
    proc = run_here("tools/compare.py", runs[1], "--resamples", "0", "--out", out, check=True)
    assert "no training curves" in proc.stderr
    assert sorted(os.listdir(tmp_path / "cmp")) == ["c.csv", "c.md"]


def test_compare_out_where_nothing_can_be_written_is_one_line(tmp_path):
    _finished_run(tmp_path / "run", "SEED: 1\n")
    (tmp_path / "file").write_text("")
    proc = run_here(
        "tools/compare.py", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "sub" / "c")
    )
    assert_one_line_error(proc, "compare.py", "cannot write there")


# ---- 7. resampling without bound ---------------------------------------------------------------


@pytest.mark.parametrize("script", ["tools/compare.py", "tools/table1.py"])
def test_resamples_above_the_bound_are_refused_naming_the_flag(tmp_path, script):
    _finished_run(tmp_path / "run", "SEED: 1\n")
    proc = run_here(
        script, str(tmp_path / "run"), "--resamples", "1000000000", "--out", str(tmp_path / "c")
    )
    assert proc.returncode == 2 and "--many-resamples" in proc.stderr.strip().splitlines()[-1]
    assert "1,000,000,000" in proc.stderr and not (tmp_path / "c.md").exists()


# ---- 6 and 8. signals: a line, and nothing left running ----------------------------------------


def _wait(predicate, proc, timeout=300):
    import time

    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the command ended first"
        assert time.time() < end, "timed out waiting"
        time.sleep(0.2)


def _processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text in f.read().decode(errors="replace"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _signalled(cmd, out, signum, ready, env=None):
    """Run ``cmd`` as a process of its own, send it ``signum`` once ``ready()``; the finished
    process with .stderr and .output."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, *cmd],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _wait(ready, proc)
    finally:
        proc.send_signal(signum)
        stdout, proc.stderr = proc.communicate(timeout=120)
    proc.output = stdout + proc.stderr
    return proc


LONG = [*TINY[:-4], "SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "1"]


def test_sigterm_to_train_net_is_the_ctrl_c_line_with_status_143(tmp_path):
    """In this process (the signal reaches the command's handler, which is the point): SIGTERM
    sent once the first checkpoint is written."""
    import signal
    import threading
    import time

    out = tmp_path / "out"

    def terminate_after_first_checkpoint():
        end = time.time() + 300
        while not (out / "last_checkpoint").exists() and time.time() < end:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_after_first_checkpoint, daemon=True).start()
    proc = run_here("train_net.py", *LONG, "OUTPUT_DIR", str(out))
    assert proc.returncode == 143
    assert_one_line_error(
        proc,
        "train_net.py",
        "terminated (SIGTERM); the last checkpoint is",
        str(out),
        "continue with --resume",
    )


def test_sigterm_to_a_local_slurm_job_stops_its_training_too(tmp_path):
    import signal

    out = tmp_path / "out"
    try:
        _sigterm_to_a_local_slurm_job(out)
    finally:  # a failure must not leave a training writing a checkpoint per iteration behind
        for pid in _processes_mentioning(str(out)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _sigterm_to_a_local_slurm_job(out):
    import signal
    import time

    proc = _signalled(
        [
            "tools/submit_slurm.py",
            "--local",
            "--nodes",
            "1",
            "--gpus-per-node",
            "1",
            "--time",
            "30",
            "--",
            *LONG,
            "OUTPUT_DIR",
            str(out),
        ],
        out,
        signal.SIGTERM,
        lambda: any("train_net.py" in _cmdline(p) for p in _processes_mentioning(str(out))),
    )
    assert proc.returncode == 143
    assert_one_line_error(
        proc, "submit_slurm.py", "terminated (SIGTERM): the local job was stopped"
    )
    end = time.time() + 30
    while _processes_mentioning(str(out)) and time.time() < end:
        time.sleep(0.5)
    assert not _processes_mentioning(str(out)), "the job's training lives on"


def test_a_preemption_signal_that_names_no_signal_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "BOGUS")
    proc = run_here("train_net.py", *TINY, "OUTPUT_DIR", str(tmp_path / "out"))
    assert_one_line_error(
        proc, "train_net.py", "SUBMITIT_PREEMPT_SIGNAL='BOGUS' names no signal", "USR2"
    )


# ---- 7 and 10. the scheduler: hangs, odd answers, arguments out of range -----------------------


def test_an_sbatch_that_hangs_is_one_line_after_the_timeout_and_leaves_no_pickles(
    tmp_path, monkeypatch
):
    import time

    _fake_scheduler(tmp_path, monkeypatch, sbatch="exec sleep 300")
    start = time.time()
    proc = run_here(
        "tools/submit_slurm.py",
        "--gpus-per-node",
        "1",
        "--sbatch-timeout-s",
        "2",
        "--",
        *QUICKSTART,
        "OUTPUT_DIR",
        str(tmp_path / "run"),
    )
    assert_one_line_error(
        proc, "submit_slurm.py", "sbatch did not answer within 2 s", "nothing was submitted"
    )
    assert time.time() - start < 60
    assert not [f for _, _, fs in os.walk(tmp_path / "run") for f in fs if f.endswith(".pkl")]


def test_an_sbatch_answer_without_a_job_id_is_one_line_and_leaves_no_pickles(tmp_path, monkeypatch):
    _fake_scheduler(tmp_path, monkeypatch, sbatch='echo "Submitted"')
    proc = run_here(
        "tools/submit_slurm.py",
        "--gpus-per-node",
        "1",
        "--",
        *QUICKSTART,
        "OUTPUT_DIR",
        str(tmp_path / "run"),
    )
    assert_one_line_error(
        proc, "submit_slurm.py", "sbatch answered 'Submitted', which holds no job id", "squeue"
    )
    assert not [f for _, _, fs in os.walk(tmp_path / "run") for f in fs if f.endswith(".pkl")]


@pytest.mark.parametrize(
    "script,option,value",
    [
        ("tools/submit_slurm.py", "--cpus-per-task", "0"),
        ("tools/submit_slurm.py", "--cpus-per-task", "-4"),
        ("tools/submit_slurm.py", "--signal-delay-s", "-100"),
        ("tools/submit_slurm.py", "--max-timeouts", "-5"),
        ("tools/sweep.py", "--nodes", "0"),
        ("tools/sweep.py", "--nodes", "-2"),
    ],
)
def test_scheduler_options_out_of_range_are_refused_before_sbatch(
    tmp_path, monkeypatch, script, option, value
):
    sbatch_calls = _fake_scheduler(tmp_path, monkeypatch)
    if script == "tools/sweep.py":
        argv = [*QUICKSTART, "--slurm", option, value, "--out", str(tmp_path / "s")]
    else:
        argv = [
            "--gpus-per-node",
            "1",
            option,
            value,
            "--",
            *QUICKSTART,
            "OUTPUT_DIR",
            str(tmp_path / "run"),
        ]
    proc = run_here(script, *argv)
    assert proc.returncode == 2 and "Traceback" not in proc.output
    assert f"{option} {value}: must be at least" in proc.stderr.strip().splitlines()[-1]
    assert sbatch_calls() == 0


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize("case", ["typo", "invalid", "loop"])
def test_sweep_on_a_bad_config_is_one_line(tmp_path, case, dry_run):
    config = tmp_path / "c.yaml"
    config.write_text(
        {
            "typo": f'_BASE_: "{QUICKSTART_FILE}"\nSOLVER:\n  MAX_ITERS: 3\n',
            "invalid": "SOLVER: [1,\n",
            "loop": '_BASE_: "c.yaml"\n',
        }[case]
    )
    proc = run_here(
        "tools/sweep.py", "--config-file", str(config), *dry_run, "--out", str(tmp_path / "s")
    )
    assert_one_line_error(
        proc,
        "sweep.py",
        str(config),
        {"typo": "did you mean SOLVER.MAX_ITER", "invalid": "not valid YAML", "loop": "loops"}[
            case
        ],
    )


# ---- 9. a checkpoint that cannot be written ----------------------------------------------------


def test_a_checkpoint_over_the_file_size_limit_is_one_line_naming_the_last_complete_one(tmp_path):
    import resource

    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # ulimit -f 20000: logs fit, a checkpoint not
    resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, hard))
    try:
        proc = run_here(
            "train_net.py",
            *TINY[:-4],
            "SOLVER.MAX_ITER",
            "3",
            "SOLVER.CHECKPOINT_PERIOD",
            "1",
            "OUTPUT_DIR",
            str(out),
        )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line_error(
        proc,
        "train_net.py",
        f"cannot write checkpoint {out / 'model_0000000.pth'}",
        "(EFBIG)",
        "the last complete checkpoint is none yet",
        "--resume",
    )
    # the partial file went with the failure
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ---- 12. weights, inputs and outputs -----------------------------------------------------------


@pytest.mark.parametrize("script", ["train_net.py", "tools/pretrain_backbone.py"])
def test_a_checkpoint_that_is_a_bare_tensor_is_one_line(tmp_path, script):
    import torch

    bare = tmp_path / "bare.pth"
    torch.save(torch.zeros(5), bare)
    argv = (
        [
            *QUICKSTART,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(bare),
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ]
        if script == "train_net.py"
        else ["--from-detector", str(bare), "--out", str(tmp_path / "out")]
    )
    assert_one_line_error(
        run_here(script, *argv),
        os.path.basename(script),
        f"{bare} cannot be read as a checkpoint",
        "it holds a Tensor, not a dict of weights",
    )


LOSS_DOC = (
    "# keys\n<!-- loss table: python tools/loss_table.py -->\nold\n"
    "<!-- end of loss table -->\nafter\n"
)


@pytest.mark.parametrize("case", ["folder", "missing", "binary"])
def test_loss_table_write_to_what_is_not_a_markdown_file_is_one_line(tmp_path, case):
    target = tmp_path / "doc.md"
    if case == "folder":
        target.mkdir()
    elif case == "binary":
        target.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    proc = run_here("tools/loss_table.py", "--write", str(target))
    assert proc.returncode == 2 and "Traceback" not in proc.output
    assert {"folder": "a folder", "missing": "no such file", "binary": "not a text file"}[
        case
    ] in proc.stderr
    assert not os.path.isfile(target) or target.read_bytes().startswith(b"\x89PNG")


def test_loss_table_write_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "real.md").write_text(LOSS_DOC)
    os.symlink(tmp_path / "real.md", tmp_path / "link.md")
    run_here("tools/loss_table.py", "--write", str(tmp_path / "link.md"), check=True)
    assert os.path.islink(tmp_path / "link.md")
    text = (tmp_path / "real.md").read_text()
    assert "FLSTAR" in text and "old" not in text and text.endswith("after\n")


@pytest.mark.parametrize("images", ["0", "-5"])
def test_anchor_stats_needs_at_least_one_image(images):
    proc = run_here("tools/anchor_stats.py", *QUICKSTART, "--images", images)
    assert proc.returncode == 2 and f"--images {images}: must be at least 1" in proc.stderr


def test_a_loss_type_with_a_newline_is_not_put_into_the_tables(tmp_path):
    _finished_run(tmp_path / "run", "SEED: 1\n")
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    (tmp_path / "run" / "results.json").write_text(
        json.dumps({**record, "loss_type": "FL\n| x | y |"})
    )
    proc = run_here("tools/compare.py", str(tmp_path / "run"), "--out", str(tmp_path / "c"))
    assert "lacks 'loss_type'" in proc.stderr
    assert_one_line_error(proc, "compare.py", "none of the folders holds a finished run")


def test_the_preemption_signal_outside_slurm_says_the_training_goes_on(tmp_path, monkeypatch):
    import signal
    import threading
    import time

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    previous = signal.getsignal(signal.SIGUSR2)

    def signal_once_the_hook_listens():
        end = time.time() + 300
        while signal.getsignal(signal.SIGUSR2) == previous and time.time() < end:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    threading.Thread(target=signal_once_the_hook_listens, daemon=True).start()
    proc = run_here(
        "train_net.py",
        *TINY[:-4],
        "SOLVER.MAX_ITER",
        "4",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        check=True,
    )
    assert "on SIGUSR2 (not a SLURM job: nothing stops it, the training goes on" in proc.output
