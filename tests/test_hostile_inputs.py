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
    path.write_text(f'_BASE_: "{base}"\n{key}: !!python/object/apply:os.system ["touch {marker}"]\n')
    return str(path)


# ---- 1. configs that would run code ------------------------------------------------------------

@pytest.mark.parametrize("script,args", [
    ("train_net.py", []),
    ("tools/sweep.py", ["--dry-run", "--out", "{tmp}/sweep"]),
    ("tools/anchor_stats.py", []),
    ("tools/pretrain_backbone.py", ["--out", "{tmp}/pb"]),
    ("tools/submit_slurm.py", ["--local", "--"]),
    ("demo.py", ["--input", "{tmp}/none.jpg", "--output", "{tmp}/demo"]),
])
def test_a_python_tag_in_a_config_is_refused_in_every_entry_point(tmp_path, script, args):
    marker = tmp_path / "ran"
    config = _tagged(tmp_path / "tagged.yaml", marker)
    args = [a.format(tmp=tmp_path) for a in args]
    argv = ([*args, "--config-file", config] if script == "tools/submit_slurm.py"
            else ["--config-file", config, *args])
    proc = run_here(script, *argv)
    assert_one_line_error(proc, os.path.basename(script), "tagged.yaml: line 2 holds a Python tag",
                          "!!python/object/apply:os.system", "--unsafe-config")
    assert not marker.exists()


def test_a_python_tag_in_a_base_file_is_refused_naming_that_file(tmp_path):
    marker = tmp_path / "ran"
    base = _tagged(tmp_path / "base.yaml", marker)
    (tmp_path / "top.yaml").write_text(f'_BASE_: "{base}"\n')
    proc = run_here("train_net.py", "--config-file", str(tmp_path / "top.yaml"))
    assert_one_line_error(proc, "train_net.py", "base.yaml (a _BASE_ of", "line 2", "--unsafe-config")
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

    (tmp_path / "t.yaml").write_text(f'_BASE_: "{QUICKSTART_FILE}"\n'
                                     'OUTPUT_DIR: !!python/object/apply:os.path.join ["out", "tagged"]\n')
    assert load_config(str(tmp_path / "t.yaml"), allow_unsafe=True).OUTPUT_DIR == os.path.join("out", "tagged")


def test_the_projects_own_configs_need_no_tags():
    from d2_focalstar.run.cli import _check_config_files

    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".yaml"):
            _check_config_files(os.path.join(REPO, "configs", name))  # a ConfigError fails the test


def _finished_run(folder, config_text):
    os.makedirs(folder)
    record = {"loss_type": "FL", "gamma": 2.0, "seed": 0, "results": {"bbox": {"AP": 30.0}},
              "datasets": {"train": ["synth_train"], "test": ["synth_val"]}}
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
