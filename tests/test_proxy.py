"""The COCO-imbalance proxy's pieces: its 80 categories, the class-count check, and the trunk
feature cache (it gives the trunk's own features, is used by training, and is refused in one
line when it belongs to another trunk or other input settings)."""

import hashlib
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from d2_focalstar.config import ConfigError
from d2_focalstar.data import EMBEDDED_DATASETS, check_datasets
from d2_focalstar.modeling.cached_trunk import FeatureCacheError, input_settings, trunk_fingerprint
from d2_focalstar.run.checkpoint import SafeCheckpointer
from d2_focalstar.run.cli import detector_classes, load_config
from helpers import REPO, run_here

PROXY = os.path.join(REPO, "configs", "proxy80_flstar.yaml")
QUICK = os.path.join(REPO, "configs", "quickstart_flstar.yaml")


@pytest.fixture(scope="module")
def tiny_proxy(tmp_path_factory):
    """The proxy's generator at a small size (300 training scenes, 4 test ones), registered as a
    COCO-JSON dataset: the real 16,000 scenes take a minute to make."""
    import dataclasses

    from detectron2.data.datasets import register_coco_instances

    from d2_focalstar.data import generate_shapes_dataset

    root = tmp_path_factory.mktemp("proxy80")
    spec = dataclasses.replace(EMBEDDED_DATASETS["focalstar_proxy80"], num_train=300, num_val=4)
    generate_shapes_dataset(str(root), spec)
    for split in ("train", "val"):
        name = f"tiny_proxy80_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(root / f"{split}.json"), str(root / split))
        DatasetCatalog.get(name)  # sets thing_classes
    return spec


def test_proxy_data_has_80_distinct_categories_drawn_alike(tiny_proxy):
    names = tiny_proxy.class_names()
    assert len(names) == 80 == len(set(names))
    assert MetadataCatalog.get("tiny_proxy80_train").thing_classes == names
    dicts = DatasetCatalog.get("tiny_proxy80_train")
    per_image = [len(d["annotations"]) for d in dicts]
    # 1-2 objects a scene: COCO's imbalance per class
    assert min(per_image) >= 1 and max(per_image) <= 2
    counts = np.bincount([a["category_id"] for d in dicts for a in d["annotations"]], minlength=80)
    # ~450 objects over 80 categories drawn uniformly: nearly all present, none dominating
    assert (counts > 0).sum() >= 74 and counts.max() <= 20


def test_the_proxy_starts_from_the_committed_trunk_its_readme_names():
    """The same pretraining command makes another trunk on another CPU, so the proxy's configs
    start from a committed file: the one weights/README.md names by SHA-256 (not a damaged copy
    or a Git LFS pointer), which sets every weight of the proxy's frozen trunk, finite."""
    configs = [PROXY, os.path.join(REPO, "configs", "proxy80_ablation", "3_neutral_trunk.yaml")]
    cfgs = [load_config(c, ["MODEL.FOCALSTAR.FEATURE_CACHE", ""]) for c in configs]
    assert {c.MODEL.WEIGHTS for c in cfgs} == {"weights/proxy80_trunk.pth"}
    path = os.path.join(REPO, "weights", "proxy80_trunk.pth")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(REPO, "weights", "README.md")) as f:
        assert f"| SHA-256 | `{sha}` |" in f.read()
    model = build_model(cfgs[0])
    SafeCheckpointer(model).load(path)  # the loader training uses
    trunk = {f"backbone.bottom_up.{k}": v for k, v in model.backbone.bottom_up.state_dict().items()}
    stored = torch.load(path, weights_only=True)["model"]
    assert sorted(stored) == sorted(trunk) and len(trunk) == 100
    assert all(torch.equal(trunk[k], stored[k]) and torch.isfinite(stored[k]).all() for k in trunk)
    assert not any(p.requires_grad for p in model.backbone.bottom_up.parameters())


def test_more_classes_than_the_embedded_data_has_is_refused():
    """NUM_CLASSES 80 on the 4-class quickstart data would add 76 never-positive classes: the
    imbalance changes silently. One line naming the key, the dataset and the value to use."""
    cfg = load_config(QUICK, ["MODEL.RETINANET.NUM_CLASSES", "80"])
    with pytest.raises(
        ConfigError,
        match="DATASETS.TRAIN: dataset 'focalstar_shapes_train' has 4 classes, but "
        "MODEL.RETINANET.NUM_CLASSES is 80: the other 76 would have no instance",
    ):
        check_datasets(cfg, num_classes=detector_classes(cfg))


def _subset(name, count):
    small = f"{name}_first{count}"
    if small not in DatasetCatalog.list():
        DatasetCatalog.register(small, lambda: DatasetCatalog.get(name)[:count])
        MetadataCatalog.get(small).set(thing_classes=MetadataCatalog.get(name).thing_classes)
    return small


def _cached_cfg(folder, *opts):
    train = _subset("tiny_proxy80_train", 4)
    return load_config(
        PROXY,
        [
            "MODEL.WEIGHTS",
            "",
            "DATASETS.TRAIN",
            f"('{train}',)",
            "DATASETS.TEST",
            "()",
            "MODEL.FOCALSTAR.FEATURE_CACHE",
            str(folder),
            "SOLVER.IMS_PER_BATCH",
            "4",
            "DATALOADER.NUM_WORKERS",
            "0",
            *opts,
        ],
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_proxy):
    """A cache of 4 proxy images and their flips, made by tools/cache_features.py's writer for a
    trunk initialised from seed 0."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from cache_features import write_cache

    folder = tmp_path_factory.mktemp("cache") / "features"
    cfg = _cached_cfg(folder)
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.FOCALSTAR.FEATURE_CACHE = ""
    torch.manual_seed(0)
    model = build_model(plain).eval()
    write_cache(
        cfg, model, str(folder), trunk_fingerprint(model.backbone.bottom_up), input_settings(cfg), 8
    )
    return folder, model


def test_cache_gives_the_trunks_features_and_training_reads_it(cache):
    from detectron2.data import build_detection_train_loader

    from d2_focalstar.data import CheckedDatasetMapper

    folder, plain = cache
    assert sorted(os.listdir(folder)) == [
        "keys.npy",
        "meta.json",
        "res3.npy",
        "res4.npy",
        "res5.npy",
    ]
    cfg = _cached_cfg(folder)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = next(iter(build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))))
    x = model.preprocess_image(batch).tensor
    got = model.backbone.bottom_up(x)
    with torch.no_grad():
        want = plain.backbone.bottom_up(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-3, atol=2e-3)  # fp16 storage
    forward = model.backbone.bottom_up.forward
    assert forward.hits == len(batch) and forward.misses == 0  # every training view was cached
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())


def test_a_cache_of_another_trunk_is_refused_in_one_line(cache, tmp_path):
    folder, _ = cache
    weights = tmp_path / "other.pth"
    torch.manual_seed(1)
    other = build_model(_cached_cfg(""))
    torch.save({"model": other.state_dict()}, weights)
    out = tmp_path / "run"
    proc = run_here(
        "train_net.py",
        "--config-file",
        PROXY,
        "MODEL.WEIGHTS",
        str(weights),
        "DATASETS.TRAIN",
        f"('{_subset('tiny_proxy80_train', 4)}',)",
        "DATASETS.TEST",
        "()",
        "MODEL.FOCALSTAR.FEATURE_CACHE",
        str(folder),
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.MAX_ITER",
        "1",
        "DATALOADER.NUM_WORKERS",
        "0",
        "OUTPUT_DIR",
        str(out),
    )
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("train_net.py: error: ") and "Traceback" not in proc.stderr
    assert f"{os.path.join(str(folder), 'meta.json')}: made by another trunk" in line
    assert "tools/cache_features.py" in line


def test_a_cache_made_for_other_inputs_is_refused_naming_the_setting(cache):
    folder, plain = cache
    cfg = _cached_cfg(folder, "INPUT.MIN_SIZE_TEST", "160")
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.zeros(1, 3, 160, 160)
    with pytest.raises(
        FeatureCacheError,
        match=r"meta.json: made for other inputs \(min_size_test: cache 192, config 160\)",
    ):
        model.backbone.bottom_up(x)


def test_a_cache_needs_a_frozen_trunk(tmp_path, tiny_proxy):
    with pytest.raises(
        FeatureCacheError,
        match="needs a trunk that training cannot change: MODEL.BACKBONE.FREEZE_AT 5 "
        r"\(is 2\)",
    ):
        build_model(_cached_cfg(tmp_path / "c", "MODEL.BACKBONE.FREEZE_AT", "2"))


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path, tiny_proxy):
    (tmp_path / "c").mkdir()
    torch.manual_seed(0)
    model = build_model(_cached_cfg(tmp_path / "c"))
    with pytest.raises(
        FeatureCacheError, match="not a feature cache .* make it with tools/cache_features.py"
    ):
        model.backbone.bottom_up(torch.zeros(1, 3, 192, 192))


def test_proxy_setup_tables_come_from_the_committed_records(tmp_path):
    """tools/proxy80_tables.py (make results): the imbalance rows from anchor_stats' records,
    each against the COCO-like estimate, and a record from before issue 23 refused naming it."""
    stats = sorted(
        os.path.join(REPO, "docs", "results", "anchor_stats", f)
        for f in os.listdir(os.path.join(REPO, "docs", "results", "anchor_stats"))
    )
    cost = tmp_path / "cost.json"
    cost.write_text(
        '{"meta": {"date": "d", "cpus": 2, "torch": "t", "ims_per_batch": 16, "max_iter": 3000, '
        '"iters": 1, "rounds": 1}, "rows": [{"lever": "x", "threads": 2, "seconds_per_iter": 1.0, '
        '"speedup": 1.0, "throughput_speedup": 1.0, "minutes_per_run": 50.0, '
        '"hours_for_5_seeds": 4.2}]}'
    )
    out = tmp_path / "setup.md"
    run_here(
        "tools/proxy80_tables.py",
        "--anchor-stats",
        *stats,
        "--cost",
        str(cost),
        "--out",
        str(out),
        check=True,
    )
    text = out.read_text()
    assert "| focalstar_proxy80_train (configs/proxy80_flstar.yaml) | 1.49 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| focalstar_proxy80_train"))
    ratio = float(row.split("|")[-2].strip().rstrip("x"))
    assert 0.5 <= ratio <= 2  # the proxy's imbalance within 2x of the COCO-like estimate
    old = tmp_path / "old.txt"
    old.write_text('{"config": "c", "source": "s", "images": 1}\n')
    proc = run_here(
        "tools/proxy80_tables.py",
        "--anchor-stats",
        str(old),
        "--cost",
        str(cost),
        "--out",
        str(out),
    )
    assert (
        proc.returncode != 0
        and f"{old}: a record without binary_negatives_per_positive" in proc.stderr
    )


def test_compiled_cpu_loss_equals_the_reference_on_extreme_logits_and_ignored_anchors():
    """MODEL.FOCALSTAR.COMPILE_LOSS (a CPU speed lever): the compiled loss and its gradient equal
    the uncompiled reference functions, at logits of +-60, with ignored and background anchors."""
    from d2_focalstar.modeling.classification import ClassificationLoss
    from d2_focalstar.modeling.losses import sigmoid_classification_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 5, generator=g) * 8
    logits[:5] = torch.tensor([60.0, -60.0, 30.0, -30.0, 0.0])
    labels = torch.randint(-1, 6, (300,), generator=g)  # -1 ignored, 5 background
    for loss_type, params in (("FLSTAR", {"gamma": 0.25}), ("FL", {"gamma": 2.0})):
        values = []
        for compiled in (False, True):
            x = logits.clone().requires_grad_()
            loss = ClassificationLoss(
                5, loss_type, 0.25, params, fused_kernel=False, compile_on_cpu=compiled
            )
            value = loss(x, labels)
            value.backward()
            values.append((value.detach(), x.grad))
            if compiled:  # compiled indeed, not fallen back to the uncompiled functions
                assert (
                    loss._compiled is not None and loss._compiled is not sigmoid_classification_loss
                )
        torch.testing.assert_close(values[1][0], values[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values[1][1], values[0][1], rtol=1e-5, atol=1e-6)
        assert torch.isfinite(values[1][1]).all()


def test_a_loss_that_cannot_be_compiled_warns_once_and_is_computed_uncompiled(monkeypatch, caplog):
    from d2_focalstar.modeling import classification

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(classification.torch, "compile", lambda fn, **kw: broken)
    loss = classification.ClassificationLoss(
        3, "FLSTAR", 0.25, {"gamma": 0.5}, fused_kernel=False, compile_on_cpu=True
    )
    reference = classification.ClassificationLoss(
        3, "FLSTAR", 0.25, {"gamma": 0.5}, fused_kernel=False
    )
    logits, labels = torch.randn(20, 3), torch.randint(-1, 4, (20,))
    with caplog.at_level("WARNING", logger="d2_focalstar.modeling.classification"):
        first, second = loss(logits, labels), loss(logits, labels)
    assert first == second == reference(logits, labels)
    warnings_ = [r.getMessage() for r in caplog.records if "COMPILE_LOSS" in r.getMessage()]
    assert (
        len(warnings_) == 1
        and "(RuntimeError: InvalidCxxCompiler: No working C++ compiler found); the uncompiled"
        in warnings_[0]
    )
