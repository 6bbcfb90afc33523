"""RetinaNetFLStar: registration, config keys, and its losses against stock RetinaNet's."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2_focalstar import LOSS_TYPES, RetinaNetFLStar, add_focalstar_config, check_focalstar_config
from d2_focalstar.config import ConfigError
from test_losses import reference

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def quickstart_cfg(*opts):
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "quickstart_flstar.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def synthetic_batch(num_classes=4):
    g = torch.Generator().manual_seed(0)
    batch = []
    for n_obj, (h, w) in zip([5, 0, 2], [(128, 160), (128, 160), (96, 128)]):  # one empty image
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        xy = torch.rand(n_obj, 2, generator=g) * torch.tensor([w - 40, h - 40])
        wh = 8 + torch.rand(n_obj, 2, generator=g) * 30
        inst = Instances(
            (h, w),
            gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
            gt_classes=torch.randint(0, num_classes, (n_obj,), generator=g),
        )
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def test_meta_arch_is_registered_and_built_from_config():
    assert META_ARCH_REGISTRY.get("RetinaNetFLStar") is RetinaNetFLStar
    model = build_model(
        quickstart_cfg("MODEL.FOCALSTAR.GAMMA", "0.125", "MODEL.FOCALSTAR.MAX_FACTOR", "50.0")
    )
    assert type(model) is RetinaNetFLStar and isinstance(model, RetinaNet)
    assert model.cls_loss.entry.name == "FLSTAR"
    assert model.cls_loss.params == {"gamma": 0.125, "max_factor": 50.0}
    assert model.cls_loss.alpha == 0.25 and model.num_classes == 4


def test_config_defaults():
    cfg = get_cfg()
    add_focalstar_config(cfg)
    assert cfg.MODEL.FOCALSTAR.LOSS_TYPE == "FLSTAR"
    assert cfg.MODEL.FOCALSTAR.GAMMA == 0.25
    assert cfg.MODEL.FOCALSTAR.MAX_FACTOR == 100.0
    assert cfg.DATASETS.COCO_JSON == []
    check_focalstar_config(cfg)  # defaults are valid


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("MODEL.FOCALSTAR.LOSS_TYPE", "FOCAL", "FLSTAR, FL, CE, FLSTAR_APPENDIX"),
        ("MODEL.FOCALSTAR.GAMMA", -0.25, ">= 0"),
        ("MODEL.RETINANET.FOCAL_LOSS_GAMMA", -2.0, ">= 0"),
        ("MODEL.RETINANET.FOCAL_LOSS_ALPHA", 1.5, "[0, 1]"),
        ("MODEL.RETINANET.FOCAL_LOSS_ALPHA", -0.5, "-1 for no weighting"),
        ("MODEL.FOCALSTAR.MAX_FACTOR", 0.5, ">= 1"),
        ("MODEL.FOCALSTAR.APPENDIX_GAMMA", 0.0, "> 0"),
        ("TEST.SAFETY.FP_PER_IMAGE", 0.0, "> 0"),
        ("TEST.SAFETY.IOU_THRESHOLD", 1.5, "(0, 1]"),
    ],
)
def test_bad_config_value_names_key_value_and_allowed(key, value, allowed):
    """The start-up check names every bad key; a model built from a bad loss setting (its own
    keys, not the whole config) names it too."""
    cfg = quickstart_cfg(key, str(value) if not isinstance(value, str) else value)
    with pytest.raises(ConfigError) as e:
        check_focalstar_config(cfg)
    assert f"{key}={value!r}" in str(e.value) and allowed in str(e.value)
    if key.startswith("TEST."):
        build_model(cfg)  # not a key of the model's
        return
    with pytest.raises(ValueError) as e:
        build_model(cfg)  # the model checks the loss keys it reads when built
    msg = str(e.value)
    assert f"{key}={value!r}" in msg and allowed in msg


def test_infinite_gamma_is_refused():
    # YAML can write .inf (the command line cannot: yacs reads "inf" as a string)
    cfg = quickstart_cfg()
    cfg.MODEL.FOCALSTAR.GAMMA = float("inf")
    with pytest.raises(ValueError, match="MODEL.FOCALSTAR.GAMMA=inf: allowed a finite number >= 0"):
        check_focalstar_config(cfg)


def test_no_weighting_alpha_is_accepted():
    check_focalstar_config(quickstart_cfg("MODEL.RETINANET.FOCAL_LOSS_ALPHA", "-1.0"))


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_every_config_loads_and_names_known_datasets(name):
    from detectron2.data import DatasetCatalog

    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, name))
    check_focalstar_config(cfg)
    for dataset in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        assert dataset in DatasetCatalog.list(), (name, dataset)


def test_coco_1x_configs_match_detectron2_model_zoo():
    from detectron2 import model_zoo

    zoo = get_cfg()
    zoo.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    for name, loss_type in [
        ("retinanet_R50_flstar_1x.yaml", "FLSTAR"),
        ("retinanet_R50_fl_1x.yaml", "FL"),
    ]:
        cfg = get_cfg()
        add_focalstar_config(cfg)
        cfg.merge_from_file(os.path.join(CONFIGS, name))
        assert cfg.MODEL.META_ARCHITECTURE == "RetinaNetFLStar"
        assert cfg.MODEL.FOCALSTAR.LOSS_TYPE == loss_type
        # everything detectron2 defines is as in its zoo config, but the meta-arch and output dir
        for key in (
            "MODEL.RESNETS",
            "MODEL.FPN",
            "MODEL.RETINANET",
            "MODEL.BACKBONE",
            "MODEL.WEIGHTS",
            "MODEL.PIXEL_MEAN",
            "DATASETS",
            "SOLVER",
            "INPUT",
            "TEST",
        ):
            ours, theirs = cfg, zoo
            for part in key.split("."):
                ours, theirs = ours[part], theirs[part]
            if isinstance(ours, dict):  # drop the keys only we add
                ours = {
                    k: v
                    for k, v in ours.items()
                    if k not in ("COCO_JSON", "YOLO", "VOC_STYLE", "SAFETY")
                }
            assert ours == theirs, key
        for ours, theirs in zip(cfg.MODEL.ANCHOR_GENERATOR.SIZES, zoo.MODEL.ANCHOR_GENERATOR.SIZES):
            assert ours == pytest.approx(theirs, rel=1e-12)
    assert cfg.SOLVER.MAX_ITER == 90000 and cfg.SOLVER.IMS_PER_BATCH == 16


def _pair(*opts):
    """RetinaNetFLStar and stock RetinaNet with the same weights."""
    torch.manual_seed(0)
    ours = build_model(quickstart_cfg(*opts))
    stock_cfg = quickstart_cfg(*opts)
    stock_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    stock = build_model(stock_cfg)
    assert type(stock) is RetinaNet
    stock.load_state_dict(ours.state_dict())
    return ours, stock


@pytest.mark.parametrize("fused", [False, True])  # the reference functions, the Triton kernel
@pytest.mark.parametrize("gamma", [2.0, 1.0])
def test_fl_mode_equals_stock_retinanet_losses(gamma, fused):
    ours, stock = _pair(
        "MODEL.FOCALSTAR.LOSS_TYPE",
        "FL",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA",
        str(gamma),
        "MODEL.FOCALSTAR.FUSED_KERNEL",
        str(fused),
    )
    batch = synthetic_batch()
    with EventStorage():
        got = ours(batch)
        want = stock(batch)
    assert set(got) == set(want) == {"loss_cls", "loss_box_reg"}
    for k in want:
        assert want[k] > 0
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_loss_types_give_different_cls_loss_and_same_box_loss():
    batch = synthetic_batch()
    out = {}
    for loss_type in LOSS_TYPES:  # every type of the table
        torch.manual_seed(0)
        model = build_model(quickstart_cfg("MODEL.FOCALSTAR.LOSS_TYPE", loss_type))
        with EventStorage():
            out[loss_type] = model(batch)
    assert len({round(v["loss_cls"].item(), 6) for v in out.values()}) == len(LOSS_TYPES)
    for v in out.values():
        torch.testing.assert_close(v["loss_box_reg"], out["FL"]["loss_box_reg"])


def _tiny_losses_inputs(gt, num_classes=3):
    g = torch.Generator().manual_seed(0)
    n, r = gt.shape
    anchors = [Boxes(torch.tensor([[0.0, 0, 10, 10]]).repeat(r, 1) + torch.arange(r)[:, None])]
    logits = [(torch.randn(n, r, num_classes, generator=g) * 6).requires_grad_()]
    deltas = [torch.randn(n, r, 4, generator=g).requires_grad_()]
    gt_boxes = [anchors[0].tensor + 1.0 for _ in range(n)]
    return anchors, logits, list(gt), deltas, gt_boxes


@pytest.mark.parametrize(
    "loss_type,gamma", [("FLSTAR", 0.25), ("FLSTAR", 0.5), ("FL", 2.0), ("CE", 0.0)]
)
def test_losses_value_skips_ignored_anchors_and_normalises_by_ema_of_positives(loss_type, gamma):
    model = build_model(
        quickstart_cfg(
            "MODEL.FOCALSTAR.LOSS_TYPE",
            loss_type,
            "MODEL.FOCALSTAR.GAMMA",
            str(gamma),
            "MODEL.RETINANET.NUM_CLASSES",
            "3",
            "MODEL.RETINANET.FOCAL_LOSS_GAMMA",
            str(gamma),
        )
    )
    gt = torch.tensor([[0, 3, -1, 3, 2, -1, 3, 1], [3, 3, 3, -1, 3, 3, 3, 3]])  # 3 = background
    anchors, logits, labels, deltas, gt_boxes = _tiny_losses_inputs(gt)
    with EventStorage():
        loss = model.losses(anchors, logits, labels, deltas, gt_boxes)["loss_cls"]
    valid = gt >= 0
    targets = torch.nn.functional.one_hot(gt[valid], 4)[:, :3].float()
    expected = reference(
        logits[0].detach()[valid],
        targets,
        loss_type,
        0.25,
        gamma,
        100.0 if loss_type == "FLSTAR" else 0.0,
    ).sum()
    normalizer = 0.9 * 100 + 0.1 * 3  # the EMA of 3 positive anchors, started at 100
    torch.testing.assert_close(loss.double(), expected / normalizer, rtol=1e-5, atol=1e-8)
    loss.backward()
    assert (logits[0].grad[~valid] == 0).all() and (logits[0].grad[valid] != 0).all()


def test_all_background_batch_has_finite_cls_loss_and_zero_box_loss():
    model = build_model(quickstart_cfg("MODEL.RETINANET.NUM_CLASSES", "3"))
    gt = torch.full((2, 8), 3)
    gt[1, :2] = -1
    with EventStorage():
        out = model.losses(*_tiny_losses_inputs(gt))
    assert torch.isfinite(out["loss_cls"]) and out["loss_cls"] > 0
    assert out["loss_box_reg"] == 0


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_channels_last_layout_gives_the_same_losses(device):
    """MODEL.FOCALSTAR.CHANNELS_LAST puts the convolution weights in NHWC on a CUDA MODEL.DEVICE
    only; in that layout (forced here on the CPU too) the model computes the same losses."""
    from detectron2.layers import Conv2d  # noqa: F401 (detectron2's convs are nn.Conv2d)

    torch.manual_seed(0)
    nchw = build_model(
        quickstart_cfg("MODEL.FOCALSTAR.CHANNELS_LAST", "False", "MODEL.DEVICE", device)
    )
    default = build_model(quickstart_cfg("MODEL.DEVICE", device))
    args = RetinaNetFLStar.from_config(quickstart_cfg("MODEL.DEVICE", device))
    args["channels_last"] = True
    nhwc = RetinaNetFLStar(**args).to(device)
    nhwc.load_state_dict(nchw.state_dict())  # copies into the params: their layout stays

    def layouts(model):
        return {
            p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in model.parameters()
            if p.dim() == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1)
        }

    assert layouts(nhwc) == {True} and layouts(nchw) == {False}
    # the key's default: on, CUDA only
    assert layouts(default) == ({True} if device == "cuda" else {False})
    batch = synthetic_batch()
    for d in batch:
        d["image"], d["instances"] = d["image"].to(device), d["instances"].to(device)
    with EventStorage():
        got, want = nhwc(batch), nchw(batch)
    for k in want:  # other convolution kernels: rounding may differ, nothing more
        torch.testing.assert_close(got[k], want[k], rtol=2e-4, atol=1e-6)
