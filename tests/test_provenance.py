"""results.json's provenance: which code and libraries produced a record; readers take records
with and without it."""

import json
import re
import subprocess

import torch

import d2_focalstar
from d2_focalstar.provenance import SCHEMA_VERSION, add_provenance, git_state, provenance
from d2_focalstar.run.results import RESULTS_FILE, load_run


def test_provenance_names_the_code_and_the_libraries():
    import detectron2

    p = provenance()
    assert p["d2_focalstar"] == d2_focalstar.__version__
    assert p["torch"] == torch.__version__ and p["cuda"] == torch.version.cuda
    assert p["detectron2"] == detectron2.__version__
    assert p["cpu"]["threads"] == torch.get_num_threads() >= 1
    assert p["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    json.dumps(p, allow_nan=False)  # plain JSON data
    if p["git"] is not None:  # a checkout (this repository); an installed copy has none
        assert re.fullmatch(r"[0-9a-f]{40}", p["git"]["commit"])
        assert isinstance(p["git"]["dirty"], bool)


def test_git_state_says_whether_the_tree_had_uncommitted_changes(tmp_path):
    assert git_state(str(tmp_path)) is None  # no checkout
    repo = tmp_path / "repo"
    (repo / "d2_focalstar").mkdir(parents=True)
    init = repo / "d2_focalstar" / "__init__.py"
    init.write_text('__version__ = "0"\n')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + args, check=True, capture_output=True)
    head = subprocess.run(
        git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert git_state(str(repo / "d2_focalstar")) == {"commit": head, "dirty": False}
    init.write_text('__version__ = "1"\n')
    assert git_state(str(repo / "d2_focalstar")) == {"commit": head, "dirty": True}


def test_readers_take_records_with_and_without_provenance(tmp_path):
    record = {
        "loss_type": "FLSTAR",
        "params": {"gamma": 0.25},
        "alpha": 0.25,
        "results": {"bbox": {"AP": 12.5}},
    }
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, rec in ((old, dict(record)), (new, add_provenance(dict(record)))):
        folder.mkdir()
        (folder / RESULTS_FILE).write_text(json.dumps(rec))
    assert "provenance" not in load_run(str(old))
    loaded = load_run(str(new))
    assert loaded["schema_version"] == SCHEMA_VERSION
    assert loaded["provenance"]["d2_focalstar"] == d2_focalstar.__version__
