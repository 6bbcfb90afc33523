"""FCOSFLStar: detectron2's FCOS as a yacs meta-architecture with the loss table's losses. Its
1x configs against detectron2's LazyConfig, its FL mode against stock FCOS, and a short CPU
training that learns and that --eval-only reproduces."""

import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.utils.events import EventStorage

from d2_focalstar import FCOSFLStar, add_focalstar_config
from helpers import run_here
from test_model import CONFIGS, synthetic_batch
from test_train import coco_ap, train_net

FCOS_QUICKSTART = ["--config-file", "configs/quickstart_fcos_flstar.yaml"]


def fcos_cfg(name="quickstart_fcos_flstar.yaml", *opts):
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _pair(*opts):
    """FCOSFLStar and stock detectron2 FCOS with the same weights."""
    torch.manual_seed(0)
    ours = build_model(fcos_cfg("quickstart_fcos_flstar.yaml", *opts))
    args = FCOSFLStar.from_config(fcos_cfg("quickstart_fcos_flstar.yaml", *opts))
    del args["cls_loss"], args["channels_last"]
    stock = FCOS(**args)
    assert type(stock) is FCOS
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def test_registered_and_built_from_config():
    assert META_ARCH_REGISTRY.get("FCOSFLStar") is FCOSFLStar
    model = build_model(
        fcos_cfg(
            "quickstart_fcos_flstar.yaml",
            "MODEL.FOCALSTAR.GAMMA",
            "0.5",
            "MODEL.FCOS.FOCAL_LOSS_ALPHA",
            "0.5",
        )
    )
    assert isinstance(model, FCOS) and model.num_classes == 4
    assert model.cls_loss.entry.name == "FLSTAR" and model.cls_loss.params["gamma"] == 0.5
    assert model.cls_loss.alpha == 0.5  # the FCOS node's alpha, not RetinaNet's


@pytest.mark.parametrize("fused", [False, True])  # the reference functions, the Triton kernel
@pytest.mark.parametrize("gamma", [2.0, 1.0])
def test_fl_mode_equals_stock_fcos_losses(gamma, fused):
    if fused:
        pytest.importorskip("d2_focalstar.modeling.fused")
    ours, stock = _pair(
        "MODEL.FOCALSTAR.LOSS_TYPE",
        "FL",
        "MODEL.FCOS.FOCAL_LOSS_GAMMA",
        str(gamma),
        "MODEL.FOCALSTAR.FUSED_KERNEL",
        str(fused),
    )
    assert ours.cls_loss.fused_kernel == fused
    batch = synthetic_batch()
    with EventStorage():
        got, want = ours(batch), stock(batch)
    assert set(got) == set(want) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    for k in want:
        assert want[k] > 0
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_flstar_changes_only_the_classification_loss():
    ours, stock = _pair("MODEL.FOCALSTAR.LOSS_TYPE", "FLSTAR")
    batch = synthetic_batch()
    with EventStorage():
        got, want = ours(batch), stock(batch)
    assert not torch.isclose(got["loss_fcos_cls"], want["loss_fcos_cls"])
    for k in ("loss_fcos_loc", "loss_fcos_ctr"):
        torch.testing.assert_close(got[k], want[k])


def test_1x_configs_build_detectron2s_lazy_fcos_except_the_loss():
    """configs/fcos_R50_*_1x.yaml against detectron2's COCO-Detection/fcos_R_50_FPN_1x.py: the
    same weights (names and shapes), the same FCOS settings, backbone (P6 from P5, frozen stem
    and res2, FrozenBN), the same solver, schedule and data."""
    from detectron2 import model_zoo
    from detectron2.config import LazyConfig, instantiate

    lazy = LazyConfig.load(model_zoo.get_config_file("COCO-Detection/fcos_R_50_FPN_1x.py"))
    torch.manual_seed(0)
    theirs = instantiate(lazy.model)
    for name, loss_type in [("fcos_R50_flstar_1x.yaml", "FLSTAR"), ("fcos_R50_fl_1x.yaml", "FL")]:
        cfg = fcos_cfg(name)
        ours = build_model(cfg)
        assert (
            ours.cls_loss.entry.name == loss_type
            and ours.cls_loss.alpha == lazy.model.focal_loss_alpha
        )
        if loss_type == "FL":
            assert ours.cls_loss.params == {"gamma": lazy.model.focal_loss_gamma}
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape for k in a)
        assert ours.backbone.top_block.in_feature == "p5" == theirs.backbone.top_block.in_feature
        frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
        assert frozen == {n for n, p in theirs.named_parameters() if not p.requires_grad}
        for attr in (
            "head_in_features",
            "center_sampling_radius",
            "test_score_thresh",
            "test_topk_candidates",
            "test_nms_thresh",
            "max_detections_per_image",
            "num_classes",
        ):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        assert ours.pixel_mean.tolist() == theirs.pixel_mean.tolist()
        assert ours.pixel_std.tolist() == theirs.pixel_std.tolist()
        assert type(ours.head.cls_subnet[1]) is type(theirs.head.cls_subnet[1])  # GroupNorm
        assert cfg.MODEL.WEIGHTS == lazy.train.init_checkpoint
        # solver and schedule: lr, momentum, weight decay, 90k steps with decays at 60k and 80k
        assert (
            cfg.SOLVER.BASE_LR == lazy.optimizer.lr
            and cfg.SOLVER.MOMENTUM == lazy.optimizer.momentum
        )
        assert cfg.SOLVER.WEIGHT_DECAY == lazy.optimizer.weight_decay
        assert cfg.SOLVER.WEIGHT_DECAY_NORM == lazy.optimizer.params.weight_decay_norm
        sched = lazy.lr_multiplier
        assert list(cfg.SOLVER.STEPS) + [cfg.SOLVER.MAX_ITER] == sched.scheduler.milestones
        assert cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER == pytest.approx(sched.warmup_length)
        assert cfg.SOLVER.WARMUP_FACTOR == sched.warmup_factor
        assert cfg.SOLVER.IMS_PER_BATCH == lazy.dataloader.train.total_batch_size
        assert cfg.DATASETS.TRAIN == (lazy.dataloader.train.dataset.names,)
        assert cfg.DATASETS.TEST == (lazy.dataloader.test.dataset.names,)
        resize = lazy.dataloader.train.mapper.augmentations[0]
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(resize.short_edge_length)
        assert cfg.INPUT.MAX_SIZE_TRAIN == resize.max_size


@pytest.fixture(scope="module")
def trunk(quickstart_model, tmp_path_factory):
    """The ResNet-18 of the test run's quickstart RetinaNet (conftest.py) as MODEL.WEIGHTS: FCOS
    trains its FPN and head on a trained trunk, as the 1x configs do on ImageNet's."""
    out = tmp_path_factory.mktemp("trunk")
    run_here(
        "tools/pretrain_backbone.py",
        "--from-detector",
        str(quickstart_model[0] / "model_final.pth"),
        "--out",
        str(out),
        check=True,
    )
    return str(out / "backbone.pth")


FCOS_SHORT = [
    "SOLVER.MAX_ITER",
    "100",
    "SOLVER.STEPS",
    "(80, 90)",
    "SOLVER.WARMUP_ITERS",
    "20",
    "SOLVER.CHECKPOINT_PERIOD",
    "1000",
    "TEST.SAFETY.ENABLED",
    "False",
]


@pytest.fixture(scope="module")
def trained(trunk, tmp_path_factory):
    out = tmp_path_factory.mktemp("fcos")
    log = train_net(*FCOS_QUICKSTART, "MODEL.WEIGHTS", trunk, *FCOS_SHORT, "OUTPUT_DIR", str(out))
    return out, log


def test_short_cpu_training_learns(trained, trunk, tmp_path):
    out, log = trained
    untrained = coco_ap(
        train_net(
            *FCOS_QUICKSTART,
            "MODEL.WEIGHTS",
            trunk,
            "SOLVER.MAX_ITER",
            "1",
            "SOLVER.BASE_LR",
            "0.0",
            "TEST.SAFETY.ENABLED",
            "False",
            "OUTPUT_DIR",
            str(tmp_path),
        )
    )
    learned = coco_ap(log)
    assert not untrained["AP"] >= 2.0  # nan when no score passes the test threshold
    # 100 iterations of FPN and head on the trained trunk; FCOS's test threshold of 0.2 is on
    # sqrt(class score x centerness); measured here: 19.8 AP, 37.4 AP50
    assert learned["AP"] > 15.0 and learned["AP50"] > 30.0, learned


def test_eval_only_reproduces_the_trained_ap(trained, tmp_path):
    out, log = trained
    again = coco_ap(
        train_net(
            *FCOS_QUICKSTART,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
            "TEST.SAFETY.ENABLED",
            "False",
            "OUTPUT_DIR",
            str(tmp_path),
        )
    )
    for k, v in coco_ap(log).items():
        if not math.isnan(v):
            assert again[k] == pytest.approx(v, abs=1e-3), k
