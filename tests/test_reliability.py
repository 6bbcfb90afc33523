"""Faults provoked for real: bad command lines and configs, untrusted checkpoints, divergence,
SIGKILL during training and during a checkpoint write, and a failing rank in a 2-process run."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import helpers
from d2_focalstar.run.checkpoint import CheckpointReadError, SafeCheckpointer, UnsafeCheckpointError
from helpers import FAST, QUICKSTART, REPO, run, run_here


def assert_one_line_error(proc, *needles):
    helpers.assert_one_line_error(proc, "train_net.py", *needles)


# ---- bad command lines and configs ------------------------------------------------------------


def test_help_describes_this_project():
    proc = run_here("train_net.py", "--help", check=True)
    assert "RetinaNetFLStar" in proc.stdout and "configs/quickstart_flstar.yaml" in proc.stdout
    assert "LazyConfig" not in proc.stdout  # detectron2's generic text: not accepted here


def test_missing_config_file_argument():
    assert_one_line_error(run_here("train_net.py"), "--config-file is required")


def test_config_file_that_does_not_exist():
    assert_one_line_error(
        run_here("train_net.py", "--config-file", "configs/nope.yaml"),
        "configs/nope.yaml: no such file",
    )


def test_typo_in_opts_key_is_named_with_a_suggestion():
    proc = run_here("train_net.py", *QUICKSTART, "MODEL.FOCALSTAR.GAMA", "0.5")
    assert_one_line_error(
        proc, "unknown config key 'MODEL.FOCALSTAR.GAMA'", "MODEL.FOCALSTAR.GAMMA"
    )


def test_typo_in_config_file_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{REPO}/configs/quickstart_flstar.yaml"\nSOLVER:\n  BASE_LRR: 0.1\n')
    assert_one_line_error(
        run_here("train_net.py", "--config-file", str(bad)),
        str(bad),
        "SOLVER.BASE_LRR",
        "SOLVER.BASE_LR",
    )


@pytest.mark.parametrize(
    "kind,content,needle",
    [
        ("binary", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a YAML config (not UTF-8 text)"),
        ("broken", b"MODEL:\n  WEIGHTS: [\n", "not valid YAML at line 3, column 1"),
        ("empty", b"", "empty; a config sets keys or a _BASE_"),
        ("list", b"- MODEL\n- SOLVER\n", "a YAML list, where a mapping of config keys"),
        ("loop", b'_BASE_: "other.yaml"\n', "its _BASE_ chain loops"),
        (
            "type",
            b"SOLVER:\n  BASE_LR: fast\n",
            "SOLVER.BASE_LR has type str, where a float is expected",
        ),
    ],
)
def test_config_file_that_is_no_config_is_one_line_naming_it(tmp_path, kind, content, needle):
    bad = tmp_path / f"{kind}.yaml"
    bad.write_bytes(content)
    # the loop: bad -> other -> bad
    (tmp_path / "other.yaml").write_text(f'_BASE_: "{kind}.yaml"\n')
    if kind in ("binary", "loop"):  # as a command: one line, not ~3,000 of RecursionError
        assert_one_line_error(run_here("train_net.py", "--config-file", str(bad)), str(bad), needle)
    else:  # what train_net.py's one line is made of, without a process per case
        from d2_focalstar.config import ConfigError
        from d2_focalstar.run.cli import load_config

        with pytest.raises(ConfigError, match=re.escape(f"{bad}: {needle}")):
            load_config(str(bad))


@pytest.mark.parametrize(
    "opts,needle",
    [
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER=0: allowed a whole number >= 1"),
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH=0: allowed a whole number >= 1"),
        (
            ["MODEL.RETINANET.NUM_CLASSES", "0"],
            "MODEL.RETINANET.NUM_CLASSES=0: allowed a whole number >= 1",
        ),
    ],
)
def test_detectron2_keys_out_of_range_are_one_line(opts, needle, monkeypatch):
    if opts[0] == "SOLVER.MAX_ITER":  # as a command
        assert_one_line_error(run_here("train_net.py", *QUICKSTART, *FAST, *opts), needle)
    else:  # the same check, without a process each
        from d2_focalstar.config import ConfigError
        from d2_focalstar.run.cli import load_config

        monkeypatch.chdir(REPO)
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(QUICKSTART[1], [*FAST, "SOLVER.MAX_ITER", "1", *opts])


def test_the_class_count_checked_is_the_detectors_own(monkeypatch):
    from d2_focalstar.config import ConfigError
    from d2_focalstar.run.cli import load_config

    monkeypatch.chdir(REPO)
    fcos = "configs/quickstart_fcos_flstar.yaml"
    load_config(fcos, ["MODEL.RETINANET.NUM_CLASSES", "0"])  # not FCOS's: unused
    with pytest.raises(ConfigError, match="MODEL.FCOS.NUM_CLASSES=0: allowed a whole number >= 1"):
        load_config(fcos, ["MODEL.FCOS.NUM_CLASSES", "0"])
    with pytest.raises(
        ConfigError, match="SOLVER.IMS_PER_BATCH=3: allowed a multiple of the 2 processes"
    ):
        load_config(fcos, ["SOLVER.IMS_PER_BATCH", "3"], num_gpus=2)
    # the batch is split over every machine's processes: 2 per machine x 2 machines do not divide 6
    load_config(fcos, ["SOLVER.IMS_PER_BATCH", "6"], num_gpus=2)
    with pytest.raises(
        ConfigError,
        match=r"IMS_PER_BATCH=6: allowed a multiple of the 4 processes \(2 per machine x 2",
    ):
        load_config(fcos, ["SOLVER.IMS_PER_BATCH", "6"], num_gpus=2, num_machines=2)


def test_output_dir_that_cannot_hold_the_run_is_one_line_before_anything_starts(
    tmp_path, monkeypatch
):
    from d2_focalstar.config import ConfigError
    from d2_focalstar.run.cli import check_output_dir
    from test_model import quickstart_cfg

    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    proc = run_here("train_net.py", *QUICKSTART, "OUTPUT_DIR", str(a_file))
    assert_one_line_error(proc, f"OUTPUT_DIR='{a_file}' is a file, not a folder")
    with pytest.raises(ConfigError, match=f"{a_file} is a file, not a folder"):
        check_output_dir(quickstart_cfg("OUTPUT_DIR", str(a_file / "run" / "out")))
    if os.path.isdir("/sys"):  # a folder nobody may create files in, root included
        with pytest.raises(ConfigError, match="OUTPUT_DIR='/sys/d2fs_out': cannot write into /sys"):
            check_output_dir(quickstart_cfg("OUTPUT_DIR", "/sys/d2fs_out"))
    check_output_dir(quickstart_cfg("OUTPUT_DIR", str(tmp_path / "new" / "run")))
    assert os.listdir(tmp_path) == ["notes.txt"]  # checked without creating anything


def test_bad_loss_setting_names_key_value_and_allowed():
    proc = run_here("train_net.py", *QUICKSTART, "MODEL.FOCALSTAR.LOSS_TYPE", "FOCAL")
    assert_one_line_error(proc, "MODEL.FOCALSTAR.LOSS_TYPE='FOCAL'", "allowed FLSTAR, FL, CE")


def test_whole_number_for_a_float_key_means_that_float(monkeypatch):
    # yacs alone refuses "MODEL.FOCALSTAR.MAX_FACTOR 10" (int for a float key)
    from d2_focalstar.config import ConfigError
    from d2_focalstar.run.cli import load_config

    monkeypatch.chdir(REPO)
    cfg = load_config(
        QUICKSTART[1],
        ["MODEL.FOCALSTAR.MAX_FACTOR", "10", "SOLVER.BASE_LR", "1", "SOLVER.MAX_ITER", "7"],
    )
    assert cfg.MODEL.FOCALSTAR.MAX_FACTOR == 10.0 and isinstance(
        cfg.MODEL.FOCALSTAR.MAX_FACTOR, float
    )
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert cfg.SOLVER.MAX_ITER == 7 and isinstance(cfg.SOLVER.MAX_ITER, int)
    # a fraction for an int key stays an error
    with pytest.raises(ConfigError, match="command line"):
        load_config(QUICKSTART[1], ["SOLVER.MAX_ITER", "10.5"])


def test_eval_only_without_weights():
    assert_one_line_error(
        run_here("train_net.py", *QUICKSTART, "--eval-only"), "--eval-only needs weights"
    )


def test_weights_path_that_does_not_exist():
    assert_one_line_error(
        run_here("train_net.py", *QUICKSTART, "--eval-only", "MODEL.WEIGHTS", "nope/model.pth"),
        "MODEL.WEIGHTS='nope/model.pth': no such file",
    )


def test_resume_with_a_last_checkpoint_that_is_gone_names_it_and_what_is_there(tmp_path):
    # before any process starts, not an assertion from fvcore once they run
    (tmp_path / "model_0000004.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    proc = run_here("train_net.py", *QUICKSTART, "--resume", "OUTPUT_DIR", str(tmp_path))
    assert_one_line_error(
        proc, f"names {tmp_path / 'model_0000009.pth'}, which does not exist", "model_0000004.pth"
    )


def _backbone_only_checkpoint(path):
    from detectron2.modeling import build_model

    from test_model import quickstart_cfg

    state = build_model(quickstart_cfg()).state_dict()
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.")}}, path)


def test_eval_only_refuses_weights_without_the_detectors_heads(tmp_path):
    """The 1x configs' MODEL.WEIGHTS is an ImageNet backbone: evaluating it (MODEL.WEIGHTS
    forgotten, or --resume with a mistyped OUTPUT_DIR) would write a meaningless AP as if it
    were a finished run. The demo refuses it too."""
    weights = tmp_path / "backbone.pth"
    _backbone_only_checkpoint(weights)
    for processes in ("1", "2"):  # checked before any process starts: one line, nothing written
        proc = run_here(
            "train_net.py",
            *QUICKSTART,
            "--eval-only",
            "--num-gpus",
            processes,
            "MODEL.WEIGHTS",
            str(weights),
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        )
        assert_one_line_error(
            proc, f"{weights} is not a trained detector for this config", "head.cls_subnet.0.weight"
        )
        assert not (tmp_path / "out").exists()
    photos = tmp_path / "photos"
    photos.mkdir()
    import cv2

    cv2.imwrite(str(photos / "a.png"), np.full((64, 64, 3), 128, np.uint8))
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        str(photos),
        "--output",
        str(tmp_path / "demo"),
        "MODEL.WEIGHTS",
        str(weights),
    )
    helpers.assert_one_line_error(proc, "demo.py", f"{weights} is not a trained detector")


def test_eval_only_refuses_weights_that_are_not_finite_and_says_which_weights_resume_uses(tmp_path):
    from detectron2.modeling import build_model

    from test_model import quickstart_cfg

    model = build_model(quickstart_cfg())
    with torch.no_grad():
        model.head.cls_score.bias.fill_(float("nan"))
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": model.state_dict(), "iteration": 9}, out / "model_0000009.pth")
    (out / "last_checkpoint").write_text("model_0000009.pth")
    other = tmp_path / "other.pth"
    torch.save({"model": model.state_dict()}, other)
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        "--eval-only",
        "MODEL.WEIGHTS",
        str(other),
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
    )
    assert_one_line_error(proc, f"{other} holds weights that are not finite", "head.cls_score.bias")
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        "--eval-only",
        "--resume",
        "MODEL.WEIGHTS",
        str(other),
        "OUTPUT_DIR",
        str(out),
    )
    assert (
        f"--eval-only --resume evaluates {out / 'model_0000009.pth'}, the last checkpoint of "
        f"{out}, not MODEL.WEIGHTS {other}"
    ) in proc.output
    assert_one_line_error(proc, f"{out / 'model_0000009.pth'} holds weights that are not finite")
    assert not (out / "eval_model_0000009").exists()


def test_more_processes_than_gpus_is_refused_before_launch(monkeypatch):
    # detectron2's launch would assert in every process
    from d2_focalstar.config import ConfigError
    from d2_focalstar.run.cli import load_config

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config(QUICKSTART[1], ["MODEL.DEVICE", "cuda"], num_gpus=2).MODEL.DEVICE == "cuda"
    with pytest.raises(ConfigError, match="--num-gpus 4: this machine has 2 GPU"):
        load_config(QUICKSTART[1], ["MODEL.DEVICE", "cuda"], num_gpus=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the branch without CUDA (the other: below)")
def test_num_gpus_beyond_the_cpu_cores_or_below_one_is_refused_before_launch(monkeypatch):
    """Without CUDA each --num-gpus is a CPU process holding a model and a data loader: 99 of
    them took a machine down. (One above the cores here: should the check ever go, the test
    starts a few processes, not 99.)"""
    from d2_focalstar.config import ConfigError
    from d2_focalstar.run.cli import load_config

    cores = len(os.sched_getaffinity(0))
    proc = run_here(
        "train_net.py", *QUICKSTART, "--num-gpus", str(cores + 1), *FAST, "SOLVER.MAX_ITER", "1"
    )
    assert_one_line_error(
        proc, f"--num-gpus {cores + 1}: without CUDA each is a CPU process", f"allowed 1 to {cores}"
    )
    monkeypatch.chdir(REPO)
    for bad in (0, -1):  # detectron2's launch would run 0 processes as 1
        with pytest.raises(ConfigError, match=f"--num-gpus {bad}: .* allowed 1 to {cores}"):
            load_config(QUICKSTART[1], num_gpus=bad)


def test_num_gpus_with_cuda_reported_present_is_bounded_by_the_gpus_not_the_cores(monkeypatch):
    from d2_focalstar.config import ConfigError
    from d2_focalstar.run.cli import load_config

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one core: not the bound here
    # detectron2's launch requires the GPUs whatever MODEL.DEVICE says
    for device in ("cuda", "cpu"):
        assert (
            load_config(QUICKSTART[1], ["MODEL.DEVICE", device], num_gpus=4).MODEL.DEVICE == device
        )
        for bad in (5, 0):
            with pytest.raises(
                ConfigError, match=f"--num-gpus {bad}: this machine has 4 GPU.*allowed 1 to 4"
            ):
                load_config(QUICKSTART[1], ["MODEL.DEVICE", device], num_gpus=bad)


def _process_table():
    """{pid: (parent pid, start time, state)} of every process, from /proc."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        table[int(pid)] = (int(fields[1]), fields[19], fields[0])
    return table


def _descendants(pid, table):
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, (ppid, _, _) in table.items() if ppid == parent]
        found.update((p, table[p][1]) for p in children)
        todo += children
    return found


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux"
)
def test_no_process_outlives_a_killed_launcher(tmp_path):
    """The launcher of a 2-process CPU run is SIGKILLed (the OOM killer's way) while its
    processes are still starting: none of them may live on, orphaned, to rendezvous and train."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "train_net.py",
            *QUICKSTART,
            "--num-gpus",
            "2",
            *FAST,
            "SOLVER.MAX_ITER",
            "100000",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        cwd=REPO,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),  # CPU processes
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen = set()
    try:
        end = time.time() + 120
        while len([p for p, _ in seen if b"--multiprocessing-fork" in _cmdline(p)]) < 2:
            assert proc.poll() is None and time.time() < end, "the 2 processes did not start"
            seen |= _descendants(proc.pid, _process_table())
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    end = time.time() + 90
    while True:
        table = _process_table()
        alive = [
            p for p, start in seen if p in table and table[p][1] == start and table[p][2] != "Z"
        ]
        if not alive or time.time() > end:
            break
        time.sleep(0.5)
    for pid in alive:  # leave no orphan behind on the machine, pass or fail
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"{len(alive)} process(es) outlived the launcher"


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_seed_minus_one_is_drawn_once_for_all_processes_and_recorded(monkeypatch):
    """The launcher draws the seed into the one config that every process receives (and that
    config.yaml and results.json record); several machines keep detectron2's per-process draw."""
    from d2_focalstar.run.cli import draw_seed, load_config

    monkeypatch.chdir(REPO)
    cfg = load_config(QUICKSTART[1], ["SEED", "-1"])
    draw_seed(cfg)
    assert cfg.SEED >= 0
    cfg = load_config(QUICKSTART[1], ["SEED", "7"])
    draw_seed(cfg)
    assert cfg.SEED == 7
    cfg = load_config(QUICKSTART[1], ["SEED", "-1"])
    draw_seed(cfg, num_machines=2)
    assert cfg.SEED == -1


def test_the_config_is_built_once_and_every_process_runs_that_one(tmp_path, monkeypatch):
    """train_net.py loads and checks the config once, in the launching process; main() in each
    process gets that config (pickled to spawned ones), never loads it again, and the warnings of
    the check are logged once."""
    import train_net
    from d2_focalstar.run import cli

    monkeypatch.chdir(REPO)
    calls, seen = [], []
    real_load = cli.load_config
    monkeypatch.setattr(cli, "load_config", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    monkeypatch.setattr(train_net, "main", lambda cfg, args: seen.append(cfg))
    args = train_net.argument_parser().parse_args(
        [
            *QUICKSTART,
            *FAST,
            "SEED",
            "-1",
            "MODEL.FOCALSTAR.APPENDIX_GAMMA",
            "3.0",
            "OUTPUT_DIR",
            str(tmp_path),
        ]
    )
    warned = []
    monkeypatch.setattr(cli.logger, "warning", lambda message, *a, **k: warned.append(message))
    train_net.command(args)
    assert len(calls) == 1 and len(seen) == 1
    assert seen[0].SEED >= 0 and seen[0].is_frozen()
    assert (
        sum("APPENDIX_GAMMA=3.0 is set but LOSS_TYPE FLSTAR does not use it" in w for w in warned)
        == 1
    )


def test_unregistered_dataset_name():
    assert_one_line_error(
        run_here("train_net.py", *QUICKSTART, "DATASETS.TRAIN", "('shapes_trian',)"),
        "DATASETS.TRAIN",
        "'shapes_trian' is not registered",
    )


# ---- untrusted checkpoint files ---------------------------------------------------------------


class _Evil:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemCall:
    """Unpickling this runs a shell command (os.system), which torch reports as a global of a
    blocked module, not as an unsupported one."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path):
    marker = str(tmp_path / "pwned")
    pth, pkl = tmp_path / "evil.pth", tmp_path / "evil.pkl"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _SystemCall(marker)}, pth)
    with open(pkl, "wb") as f:
        pickle.dump(
            {"model": {"w": np.zeros(1)}, "__author__": "x", "extra": _Evil(marker)}, f, protocol=2
        )
    return marker, pth, pkl


def test_crafted_checkpoint_does_not_run_code_when_loaded(tmp_path):
    marker, pth, pkl = _evil_files(tmp_path)
    model = torch.nn.Linear(1, 1)
    for path in (pth, pkl):
        with pytest.raises(
            UnsafeCheckpointError, match=f"Refusing to load {path}.*Nothing in it was run"
        ):
            SafeCheckpointer(model).load(str(path))
    assert not os.path.exists(marker)


def test_files_that_are_not_checkpoints_are_told_apart_from_unsafe_ones(tmp_path):
    """Text, an image, an empty file, a cut checkpoint: 'cannot be read as a checkpoint', not
    'refusing to load' (and never torch's advice to turn weights_only off)."""
    model = torch.nn.Linear(1, 1)
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    files = {
        "notes.pth": b"hello world\n",
        "photo.pth": b"\xff\xd8\xff\xe0" + bytes(100),
        "empty.pth": b"",
        "cut.pth": good.read_bytes()[:1000],
        "notes.pkl": b"hello\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(
            CheckpointReadError, match=f"{tmp_path / name} cannot be read as a checkpoint"
        ):
            SafeCheckpointer(model).load(str(tmp_path / name))
    marker, pth, _ = _evil_files(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="Unsupported global") as e:
        SafeCheckpointer(model).load(str(pth))
    assert "weights_only" not in str(e.value)
    SafeCheckpointer(model).load(str(good))  # and a real one still loads


def test_crafted_checkpoint_through_train_net_gives_clear_error(tmp_path):
    marker, pth, pkl = _evil_files(tmp_path)
    for path in (pth, pkl):
        proc = run_here(
            "train_net.py",
            *QUICKSTART,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(path),
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        )
        assert_one_line_error(proc, f"Refusing to load {path}")
    # --resume reads whatever last_checkpoint names, with or without an extension
    out = tmp_path / "resume"
    out.mkdir()
    (out / "model_0000009").write_bytes(pth.read_bytes())
    (out / "last_checkpoint").write_text("model_0000009")
    proc = run_here("train_net.py", *QUICKSTART, "--resume", *FAST, "OUTPUT_DIR", str(out))
    assert_one_line_error(
        proc, f"Refusing to load {out / 'model_0000009'}", "Nothing in it was run"
    )
    assert not os.path.exists(marker)
    notes = tmp_path / "log.txt"
    notes.write_text("not weights\n")
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        "--eval-only",
        "MODEL.WEIGHTS",
        str(notes),
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    )
    assert_one_line_error(proc, f"{notes} cannot be read as a checkpoint")
    # several processes: the launching process reads the file first, so still one line
    for path, message in (
        (pkl, f"Refusing to load {pkl}"),
        (pth, f"Refusing to load {pth}"),
        (notes, f"{notes} cannot be read"),
    ):
        proc = run_here(
            "train_net.py",
            *QUICKSTART,
            "--num-gpus",
            "2",
            *FAST,
            "MODEL.WEIGHTS",
            str(path),
            "OUTPUT_DIR",
            str(tmp_path / "two"),
        )
        assert_one_line_error(proc, message)
    assert not os.path.exists(marker)


def test_a_pickle_that_calls_os_system_is_refused_whatever_the_file_is_called(tmp_path):
    """torch names a global of a blocked module (os, subprocess, ...) in a message of its own:
    it is a file that tries to run code, not a damaged one."""
    marker = tmp_path / "pwned"
    for name in ("evil.pth", "evil.pt", "evil"):
        torch.save({"model": {"w": torch.zeros(1)}, "x": _SystemCall(marker)}, tmp_path / name)
        with pytest.raises(
            UnsafeCheckpointError,
            match=rf"Refusing to load {tmp_path / name}: .*"
            r"posix.system.*Nothing in it was run",
        ):
            SafeCheckpointer(torch.nn.Linear(1, 1)).load(str(tmp_path / name))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_model_zoo_pkl_written_by_this_numpy_loads_with_every_pickle_protocol(tmp_path, protocol):
    """numpy 2 pickles arrays through numpy._core.numeric._frombuffer (protocol 5) and empty
    ones through bytes() (protocols 0-2): harmless, and needed to rebuild the arrays."""
    arrays = {
        "weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bias": np.ones(2, np.float32),
        "empty": np.zeros(0, np.uint8),
        "fortran": np.asfortranarray(np.ones((2, 3))),
        "half": np.ones(2, np.float16),
        "flags": np.array([True, False]),
    }
    extra = {"scalar": np.float64(2.5), "big_endian": np.arange(3, dtype=">f4")}  # not weights
    path = tmp_path / "zoo.pkl"
    data = pickle.dumps(
        {"model": arrays, "__author__": "zoo", "matching_heuristics": True, "extra": extra},
        protocol=protocol,
    )
    path.write_bytes(data)
    loaded = SafeCheckpointer(torch.nn.Module())._load_file(str(path))
    expected = pickle.loads(data, encoding="latin1")  # what a plain unpickler makes of it
    for part, written in (("model", arrays), ("extra", extra)):
        for name, array in written.items():
            np.testing.assert_array_equal(loaded[part][name], array)
            assert loaded[part][name].dtype == expected[part][name].dtype, name
    model = torch.nn.Linear(3, 2)
    SafeCheckpointer(model).load(str(path))
    torch.testing.assert_close(model.weight.detach(), torch.from_numpy(arrays["weight"]))


def test_model_zoo_style_pkl_of_numpy_arrays_still_loads(tmp_path):
    model = torch.nn.Linear(3, 2)
    blobs = {
        "weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bias": np.ones(2, np.float32),
        "bias_momentum": np.zeros(2, np.float32),
    }
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    SafeCheckpointer(model).load(str(tmp_path / "zoo.pkl"))
    torch.testing.assert_close(model.weight.detach(), torch.from_numpy(blobs["weight"]))


def test_checkpoints_of_a_training_run_load_with_weights_only(tmp_path):
    run_here(
        "train_net.py",
        *QUICKSTART,
        *FAST,
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "OUTPUT_DIR",
        str(tmp_path),
        check=True,
    )
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert state["iteration"] == 2 and "optimizer" in state["trainer"]["_trainer"]


# ---- divergence -------------------------------------------------------------------------------


def test_divergence_stops_with_explanation_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    proc = run(
        "train_net.py",
        *QUICKSTART,
        *FAST,
        "SOLVER.BASE_LR",
        "50.0",
        "SOLVER.WARMUP_ITERS",
        "0",
        "SOLVER.CLIP_GRADIENTS.ENABLED",
        "False",
        "SOLVER.CHECKPOINT_PERIOD",
        "1",
        "SOLVER.MAX_ITER",
        "50",
        "OUTPUT_DIR",
        str(tmp_path),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.output, proc.output[-3000:]  # the message alone, no tracebacks
    msg = proc.stderr[proc.stderr.index("train_net.py: error: ") :]
    assert "Training diverged at iteration" in msg and "loss_cls" in msg and "loss_box_reg" in msg
    for setting in (
        "MODEL.FOCALSTAR.GAMMA=0.25",
        "MODEL.FOCALSTAR.MAX_FACTOR=100.0",
        "SOLVER.BASE_LR=50.0",
        "SOLVER.CLIP_GRADIENTS.ENABLED=False",
    ):
        assert setting in msg
    last = (tmp_path / "last_checkpoint").read_text().strip()
    assert f"Last good checkpoint: {tmp_path / last}" in msg
    state = torch.load(tmp_path / last, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model_final.pth").exists()
    assert "lower MODEL.FOCALSTAR.MAX_FACTOR" in msg and "enable gradient clipping" in msg
    # the divergence is the run's result: recorded, not retried by a sweep, counted by table1.py
    from d2_focalstar.run.results import RunDiverged, load_run, run_state

    assert run_state(str(tmp_path)) == "diverged"
    iteration = int(re.search(r"Training diverged at iteration (\d+)", msg).group(1))
    with pytest.raises(RunDiverged, match=f"diverged at iteration {iteration} \\(Loss became"):
        load_run(str(tmp_path))
    # a try again in its folder that stops before its end (here: a crash) leaves no record of a
    # divergence that no longer describes the folder (else sweeps would skip it for good)
    from detectron2.engine import DefaultTrainer

    def crash(self):
        raise RuntimeError("stopped by the test")

    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="stopped by the test"):
        m.setattr(DefaultTrainer, "train", crash)
        run_here("train_net.py", *QUICKSTART, "--resume", *FAST, "OUTPUT_DIR", str(tmp_path))
    assert run_state(str(tmp_path)) == "interrupted"
    # tried again in its folder at a sane rate: the old record no longer holds
    proc = run_here(
        "train_net.py", *QUICKSTART, *FAST, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path)
    )
    assert proc.returncode == 0, proc.output[-3000:]
    assert run_state(str(tmp_path)) == "done"
    assert load_run(str(tmp_path))["iteration"] == 2


@pytest.mark.parametrize(
    "loss_type,named,not_named",
    [
        ("FL", "MODEL.RETINANET.FOCAL_LOSS_GAMMA=2.0", "MAX_FACTOR"),
        ("FLSTAR_APPENDIX", "MODEL.FOCALSTAR.APPENDIX_GAMMA=2.0", "FOCAL_LOSS_GAMMA"),
        ("CE", "LOSS_TYPE=CE", "GAMMA"),
    ],
)
def test_divergence_message_names_the_settings_of_its_loss_type(loss_type, named, not_named):
    from d2_focalstar.run.training import divergence_message
    from test_model import quickstart_cfg

    cfg = quickstart_cfg(
        "MODEL.FOCALSTAR.LOSS_TYPE", loss_type, "SOLVER.CLIP_GRADIENTS.ENABLED", "True"
    )
    msg = divergence_message(cfg, 7, FloatingPointError("Loss became infinite or NaN"), None)
    assert named in msg and not_named not in msg
    assert "lower SOLVER.CLIP_GRADIENTS.CLIP_VALUE" in msg and "enable gradient clipping" not in msg


def test_atomic_write_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """The data reaches the disk before the rename, and the rename with the folder's entry."""
    import stat

    from d2_focalstar.fileio import atomic_write

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "results.json"
    target.write_text("old")
    atomic_write(str(target), lambda f: f.write(b"new"))
    assert target.read_text() == "new" and synced == ["file", "folder"]
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left


def test_write_json_writes_strict_json_with_null_for_missing_values(tmp_path):
    """COCO's APl on a dataset without large objects is NaN: results.json says null, which a
    strict reader (jq, JavaScript) accepts; finite values are kept exactly."""
    import numpy as np

    from d2_focalstar.fileio import write_json

    def no_constants(name):
        raise ValueError(f"not strict JSON: {name}")

    record = {
        "bbox": {"AP": 37.25, "APl": float("nan"), "APs": np.float64("nan")},
        "safety": [float("inf"), -float("inf"), 1e-300],
        "iteration": None,
        "name": "x",
    }
    path = tmp_path / "results.json"
    write_json(str(path), record)
    read = json.loads(path.read_text(), parse_constant=no_constants)
    assert read == {
        "bbox": {"AP": 37.25, "APl": None, "APs": None},
        "safety": [None, None, 1e-300],
        "iteration": None,
        "name": "x",
    }


# ---- interruption -----------------------------------------------------------------------------

MAX_ITER = 16
INTERRUPTIBLE = [*FAST, "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "4"]


def _wait_for(predicate, proc, timeout=300):
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "training ended before the kill"
        assert time.time() < end, "timed out waiting"
        time.sleep(0.05)


def _assert_checkpoints_complete(folder):
    for name in os.listdir(folder):
        if name.endswith(".pth"):  # every visible checkpoint is whole
            torch.load(folder / name, weights_only=True)
    last = (folder / "last_checkpoint").read_text().strip()
    assert torch.load(folder / last, weights_only=True)["iteration"] >= 3


def _resume_and_finish(folder):
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        "--resume",
        *INTERRUPTIBLE,
        "OUTPUT_DIR",
        str(folder),
        check=True,
    )
    assert "Loading checkpoint from" in proc.output or "Loading from" in proc.output
    assert torch.load(folder / "model_final.pth", weights_only=True)["iteration"] == MAX_ITER - 1
    with open(folder / "metrics.json") as f:
        iters = [json.loads(line)["iteration"] for line in f if "total_loss" in line]
    assert iters[-1] == MAX_ITER - 1


def test_sigkill_during_training_then_resume(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "train_net.py", *QUICKSTART, *INTERRUPTIBLE, "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: (tmp_path / "last_checkpoint").exists(), proc)
        time.sleep(0.7)  # somewhere in the following iterations
        assert proc.poll() is None, "training ended before the kill: nothing was tested"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model_final.pth").exists()  # it was cut off, not finished
    _assert_checkpoints_complete(tmp_path)
    _resume_and_finish(tmp_path)


def test_ctrl_c_is_one_line_that_says_how_to_go_on(tmp_path):
    out = tmp_path / "out"
    with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "train_net.py",
                *QUICKSTART,
                *FAST,
                "SOLVER.MAX_ITER",
                "100000",
                "SOLVER.CHECKPOINT_PERIOD",
                "1",
                "OUTPUT_DIR",
                str(out),
            ],
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
            text=True,
            # started as a background job of a script is (SIGINT ignored): Ctrl-C still counts
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            _wait_for(lambda: (out / "last_checkpoint").exists(), proc)
        finally:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            try:
                proc.wait(timeout=60)
            finally:  # one that goes on writes a checkpoint per iteration until the disk is full
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    proc.stderr = (tmp_path / "stderr").read_text()
    proc.output = (tmp_path / "stdout").read_text() + proc.stderr
    assert proc.returncode == 130
    assert_one_line_error(
        proc, "interrupted (Ctrl-C); the last checkpoint is", str(out), "continue with --resume"
    )


def test_sigkill_during_the_first_last_checkpoint_write_then_resume(tmp_path):
    """The first checkpoint is whole, the last_checkpoint naming it is not written yet: --resume
    continues from that checkpoint (not from iteration 0), and the hidden partial file goes."""
    marker = tmp_path / "tagging"
    env = dict(os.environ, SLOW_SAVE_MARKER=str(marker), SLOW_SAVE_WHICH="last_checkpoint")
    opts = [*FAST, "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "tests/slow_checkpoint_train_net.py",
            *QUICKSTART,
            *opts,
            "SOLVER.MAX_ITER",
            "100000",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(marker.exists, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = os.listdir(tmp_path)
    assert "model_0000000.pth" in names and "last_checkpoint" not in names
    assert [n for n in names if n.startswith(".last_checkpoint.") and n.endswith(".tmp")]
    resumed = run_here(
        "train_net.py", *QUICKSTART, "--resume", *opts, "SOLVER.MAX_ITER", "2", check=True
    )
    assert "Starting training from iteration 1" in resumed.output  # not from 0
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path):
    marker = tmp_path / "saving"
    env = dict(os.environ, SLOW_SAVE_MARKER=str(marker))
    proc = subprocess.Popen(
        [
            sys.executable,
            "tests/slow_checkpoint_train_net.py",
            *QUICKSTART,
            *INTERRUPTIBLE,
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(marker.exists, proc)  # half of the second checkpoint is on disk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    assert not (tmp_path / "model_0000007.pth").exists()
    partial = [
        n
        for n in os.listdir(tmp_path)
        if n.startswith(".model_0000007.pth.") and n.endswith(".tmp")
    ]
    assert len(partial) == 1  # half of it, hidden
    _assert_checkpoints_complete(tmp_path)
    _resume_and_finish(tmp_path)
    assert not (tmp_path / partial[0]).exists()  # removed when the run started again


# ---- failing workers --------------------------------------------------------------------------


def test_one_failing_rank_ends_the_whole_job(tmp_path):
    start = time.time()
    proc = run(
        "tests/failing_rank_train_net.py",
        *QUICKSTART,
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        *FAST,
        "SOLVER.MAX_ITER",
        "50",
        "OUTPUT_DIR",
        str(tmp_path),
        timeout=300,
    )
    assert proc.returncode != 0
    assert "injected fault on rank 1 at iteration 3" in proc.output
    assert time.time() - start < 240


def test_ctrl_c_reaches_a_command_that_started_with_sigint_ignored(capsys):
    """In this process: a command started as a background job of a script inherits SIGINT
    ignored; inside command_errors Ctrl-C (and a local SLURM job's stop signal) is still the
    one line and status 130, and the inherited disposition is back afterwards."""
    from d2_focalstar.run.errors import command_errors

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as e:
            with command_errors("job.py"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the KeyboardInterrupt ends this at once
        assert e.value.code == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip() == "job.py: error: interrupted"
