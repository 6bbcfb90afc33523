"""The fused Triton kernel against the reference loss functions. Without a GPU it runs in
Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1)."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.events import EventStorage

from d2_focalstar.modeling.losses import LOSS_TYPES
from test_losses import classification_loss

# needs triton, which torch's wheel brings
fused = pytest.importorskip("d2_focalstar.modeling.fused")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = [
    ("FLSTAR", 0.125),
    ("FLSTAR", 0.25),
    ("FLSTAR", 0.5),
    ("FL", 2.0),
    ("CE", 0.0),
    ("FLSTAR_APPENDIX", 2.0),
]


def _inputs(R=203, K=80, scale=6.0, seed=0):
    """R not a multiple of the block, K not a power of two; background, ignored and class rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g) * scale
    labels = torch.randint(0, K, (R,), generator=g)
    labels[torch.rand(R, generator=g) < 0.6] = K  # background
    labels[torch.rand(R, generator=g) < 0.1] = -1  # ignored
    return x.to(DEVICE), labels.to(DEVICE)


def _reference(x, labels, loss_type, gamma, max_factor=100.0, alpha=0.25):
    valid = labels >= 0
    targets = F.one_hot(labels[valid], x.shape[1] + 1)[:, :-1]
    return classification_loss(x[valid], targets, loss_type, alpha, gamma, max_factor, "sum")


def _params(loss_type, gamma, max_factor=100.0):
    takes = {p.name for p in LOSS_TYPES[loss_type].params}
    return {k: v for k, v in (("gamma", gamma), ("max_factor", max_factor)) if k in takes}


def _both(x, labels, loss_type, gamma, grad_scale=0.5, alpha=0.25, max_factor=100.0):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = dict(alpha=alpha, max_factor=max_factor)
    a = fused.fused_classification_loss(
        xa, labels, loss_type, alpha, **_params(loss_type, gamma, max_factor)
    )
    (a * grad_scale).backward()
    b = _reference(xb, labels, loss_type, gamma, **kw)
    (b * grad_scale).backward()
    return a, b, xa.grad, xb.grad


@pytest.mark.parametrize("loss_type,gamma", SETTINGS)
@pytest.mark.parametrize("scale", [3.0, 40.0])  # ordinary and extreme logits (|x| up to ~150)
def test_fused_fp32_matches_reference(loss_type, gamma, scale):
    x, labels = _inputs(scale=scale)
    a, b, ga, gb = _both(x, labels, loss_type, gamma)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ga).all()


@pytest.mark.parametrize(
    "R,K,wide",
    [
        (301, 4, False),
        (7, 1, False),
        (57, 6, False),
        (33, 24, False),
        (41, 3, False),
        (203, 80, True),
    ],
)
def test_fused_other_shapes_and_64bit_offsets(R, K, wide, monkeypatch):
    """Class counts that make every label-group size (K=1, 3: 1; 6: 2; 4: 4; 24: 8; 80: 16), and
    the 64-bit offset path (forced: real use needs 2**31 logits)."""
    if wide:
        monkeypatch.setattr(fused, "_INT32_LIMIT", 0)
    x, labels = _inputs(R=R, K=K, scale=6.0)
    loss_type, gamma = "FLSTAR", 0.25
    a, b, ga, gb = _both(x, labels, loss_type, gamma)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ga).all()


@pytest.mark.parametrize(
    "block,iters", [(64, {"forward": 3, "backward": 2}), (256, {"forward": 1, "backward": 4})]
)
def test_fused_programs_over_several_blocks(block, iters, monkeypatch):
    """Each program runs over ITERS blocks one after another (the forward sums them before its one
    reduction): small blocks, so that the 203 x 80 logits take many programs, the last one partly
    past the end."""
    launch = fused.Launch(block, 4, iters["forward"], iters["backward"], None)
    monkeypatch.setattr(fused, "_LAUNCH", {4: launch, 2: launch})
    x, labels = _inputs(scale=6.0)
    a, b, ga, gb = _both(x, labels, "FLSTAR", 0.25)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_factor", [0.0, 10.0])
def test_fused_flstar_cap_matches_reference(max_factor):
    x, labels = _inputs(scale=8.0)
    a, b, ga, gb = _both(x, labels, "FLSTAR", 0.5, max_factor=max_factor)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_type,gamma", [("FLSTAR", 0.25), ("FL", 2.0)])
@pytest.mark.parametrize("scale", [10.0, 40.0])  # ordinary and extreme logits (|x| up to ~150)
def test_fused_half_precision_logits(dtype, loss_type, gamma, scale):
    x, labels = _inputs(scale=scale)
    x = x.to(dtype)
    a, b, ga, gb = _both(x, labels, loss_type, gamma)
    assert a.dtype == torch.float32 and ga.dtype == dtype  # loss accumulated in fp32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # same half inputs, fp32 maths
    # both compute in fp32 and round once: at most one unit in the last place apart
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ga.float(), gb.float(), rtol=eps, atol=torch.finfo(dtype).tiny)
    assert torch.isfinite(ga).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter
@pytest.mark.parametrize("ignored_value", [1e4, float("inf"), float("nan")])
def test_ignored_anchors_get_exactly_zero_gradient_and_no_loss(ignored_value):
    """Whatever an ignored anchor's logits hold, even inf or nan, they reach neither the loss nor
    the gradient (the reference drops those rows before computing anything)."""
    x, labels = _inputs()
    want = fused.fused_classification_loss(x, labels, "FLSTAR", gamma=0.25)
    changed = x.clone()
    changed[labels < 0] = ignored_value
    xa = changed.requires_grad_()
    got = fused.fused_classification_loss(xa, labels, "FLSTAR", gamma=0.25)
    got.backward()
    torch.testing.assert_close(got, want)
    assert (xa.grad[labels < 0] == 0).all() and (xa.grad[labels >= 0] != 0).any()
    assert torch.isfinite(xa.grad).all()


@pytest.mark.parametrize("loss_type,gamma", [("FLSTAR", 0.25), ("CE", 0.0)])
def test_fused_without_alpha_weighting(loss_type, gamma):
    """alpha < 0 turns the alpha-balancing off, as in the reference (and fvcore)."""
    x, labels = _inputs()
    a, b, ga, gb = _both(x, labels, loss_type, gamma, alpha=-1.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@triton.jit
def _log2_1p_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, fused._log2_1p(tl.load(u_ptr + offsets, mask=mask)), mask=mask)


def test_log2_1p_polynomial_against_float64():
    """The kernels' polynomial for log2(1 + u) (it replaces a log) on [0, 1]: relative error below
    3e-7 everywhere, including u near 0, where log2(1 + u) ~ u / ln 2 and a plain log(1 + u) in
    fp32 would lose every digit."""
    u = torch.cat([torch.linspace(0, 1, 100001), torch.logspace(-37, 0, 10001)]).to(DEVICE)
    out = torch.empty_like(u)
    _log2_1p_kernel[(triton.cdiv(u.numel(), 1024),)](u, out, u.numel(), BLOCK=1024)
    truth = torch.log1p(u.double()) / math.log(2)
    rel = ((out.double() - truth).abs() / truth.clamp_min(1e-300)).max().item()
    assert rel < 3e-7, rel
    assert out[u == 0].eq(0).all()


def test_empty_input():
    x = torch.zeros(0, 80, device=DEVICE, requires_grad=True)
    loss = fused.fused_classification_loss(x, torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, 80)


def test_bad_arguments():
    x = torch.zeros(2, 3, device=DEVICE)  # on the test's device: CPU tensors on a GPU fail earlier
    with pytest.raises(ValueError, match="loss_type='FOCAL'"):
        fused.fused_classification_loss(
            x, torch.zeros(2, dtype=torch.int64, device=DEVICE), "FOCAL"
        )
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)"):
        fused.fused_classification_loss(x, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    # the reference's checks, not a kernel that would divide by 0 or weight outside [0, 1]
    labels = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="FLSTAR_APPENDIX: gamma=0.0 must be a finite number > 0"):
        fused.fused_classification_loss(x, labels, "FLSTAR_APPENDIX", gamma=0.0)
    with pytest.raises(ValueError, match="alpha=2"):
        fused.fused_classification_loss(x, labels, alpha=2.0)
    with pytest.raises(ValueError, match="max_factor=0.5"):
        fused.fused_classification_loss(x, labels, max_factor=0.5)


def test_retinanet_with_fused_kernel_in_fl_mode_equals_stock():
    from test_model import _pair, synthetic_batch

    ours, stock = _pair("MODEL.FOCALSTAR.LOSS_TYPE", "FL", "MODEL.FOCALSTAR.FUSED_KERNEL", "True")
    assert ours.cls_loss.fused_kernel
    batch = synthetic_batch()
    with EventStorage():
        got, want = ours(batch), stock(batch)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_terms_weighted_zero_stay_zero_without_cap(alpha):
    """Uncapped FL*, g = 0.5: exp(0.5 * 200) overflows fp32. The terms alpha weights 0 (hard
    negatives for alpha = 1, hard positives for alpha = 0) add 0 to the loss and get a 0
    gradient, as in the reference, not 0 * inf = NaN; the rest is the reference's."""
    x, labels = _inputs(scale=3.0)
    K = x.shape[1]
    rows = (labels >= 0) & (labels < K)
    positive = torch.zeros_like(x, dtype=torch.bool)
    positive[rows.nonzero()[:, 0], labels[rows]] = True
    weighs_zero = (~positive if alpha == 1.0 else positive) & (labels >= 0)[:, None]
    x[weighs_zero] = torch.where(positive[weighs_zero], -200.0, 200.0)  # each as hard as can be
    a, b, ga, gb = _both(x, labels, "FLSTAR", 0.5, alpha=alpha, max_factor=0.0)
    assert torch.isfinite(a) and torch.isfinite(ga).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    assert (ga[weighs_zero] == 0).all()


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(fused, "INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors, not cpu"):
        fused.fused_classification_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_type, gamma", SETTINGS)
def test_self_check_passes_for_the_kernel_as_it_is(monkeypatch, loss_type, gamma, dtype):
    monkeypatch.setattr(fused, "_verdicts", {})
    with torch.no_grad():  # as when losses are computed for a validation loss
        assert fused.agrees_with_reference(
            DEVICE, dtype, 80, loss_type, 0.25, _params(loss_type, gamma)
        ), fused._verdicts


PARAMS = {"gamma": 0.25, "max_factor": 100.0}


def test_self_check_sees_wrong_small_gradients_and_runs_under_inference_mode(monkeypatch):
    """The easy negatives' gradients are small next to the hard examples' but dominate training:
    a kernel that got only those wrong (here: their sign) must not pass."""
    real = fused.fused_classification_loss

    def small_gradients_flipped(x, *args, **kwargs):
        x.register_hook(lambda g: torch.where(g.abs() < 3e-3, -g, g))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fused, "_verdicts", {})
    with torch.inference_mode():
        assert fused.agrees_with_reference(DEVICE, torch.float32, 80, "FLSTAR", 0.25, PARAMS)
    monkeypatch.setattr(fused, "_verdicts", {})
    monkeypatch.setattr(fused, "fused_classification_loss", small_gradients_flipped)
    assert not fused.agrees_with_reference(DEVICE, torch.float32, 80, "FLSTAR", 0.25, PARAMS)
    key = (DEVICE, torch.float32, 80, "FLSTAR", 0.25, tuple(sorted(PARAMS.items())))
    assert fused._verdicts[key].startswith("gradient")


def test_a_kernel_that_disagrees_on_the_device_is_not_used_in_training(monkeypatch, caplog):
    """RetinaNetFLStar checks the kernel against the float64 reference on a small batch, once per
    device, dtype and setting, before it uses it. A kernel this GPU or Triton gets wrong (here:
    1% off) is not used: one warning that says why, and the losses are the reference's."""
    from detectron2.modeling import build_model

    from test_model import quickstart_cfg, synthetic_batch

    monkeypatch.setattr(fused, "_verdicts", {})
    calls, real = [], fused.checked_fused_loss  # under fused_classification_loss too

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def broken(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * 1.01

    torch.manual_seed(0)
    # on DEVICE: a CPU model uses the kernel only under the interpreter, as without a GPU
    model = build_model(
        quickstart_cfg("MODEL.FOCALSTAR.FUSED_KERNEL", "True", "MODEL.DEVICE", DEVICE)
    )
    reference_model = build_model(
        quickstart_cfg("MODEL.FOCALSTAR.FUSED_KERNEL", "False", "MODEL.DEVICE", DEVICE)
    )
    reference_model.load_state_dict(model.state_dict())
    batch = synthetic_batch(num_classes=model.num_classes)

    def loss_cls(m):  # each call moves the normaliser's EMA: start each from its initial value
        m.__dict__.pop("loss_normalizer", None)
        return m(batch)["loss_cls"]

    with EventStorage():
        want = loss_cls(reference_model)
        monkeypatch.setattr(fused, "checked_fused_loss", counted)
        good = loss_cls(model)
        assert len(calls) == 2  # the check, then the loss itself
        torch.testing.assert_close(good, want, rtol=1e-5, atol=0)

        monkeypatch.setattr(fused, "_verdicts", {})
        monkeypatch.setattr(fused, "checked_fused_loss", broken)
        calls.clear()
        with caplog.at_level("WARNING", logger="d2_focalstar.modeling.fused"):
            got = [loss_cls(model) for _ in range(2)]
    assert len(calls) == 1  # the check only
    for loss in got:
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    warnings = [
        r.getMessage() for r in caplog.records if "disagrees with the reference" in r.getMessage()
    ]
    assert len(warnings) == 1 and "FLSTAR" in warnings[0] and "loss" in warnings[0]


def test_a_type_without_a_kernel_branch_uses_the_reference_with_one_info_line(caplog):
    """POLY1_FL has no branch in the kernel: where the kernel would run (here its interpreter),
    the reference functions compute it, said once at INFO, not as a warning; the kernel itself
    refuses it."""
    from d2_focalstar.modeling.classification import ClassificationLoss

    x, labels = _inputs()
    loss = ClassificationLoss(80, "POLY1_FL", 0.25, {"gamma": 2.0, "eps": 1.0}, fused_kernel=True)
    with caplog.at_level("INFO", logger="d2_focalstar.modeling.classification"):
        got = [loss(x, labels) for _ in range(2)]
    valid = labels >= 0
    want = classification_loss(
        x[valid],
        F.one_hot(labels[valid], 81)[:, :-1],
        "POLY1_FL",
        0.25,
        2.0,
        eps=1.0,
        reduction="sum",
    )
    for g in got:
        torch.testing.assert_close(g, want)
    said = [r for r in caplog.records if "no fused-kernel branch" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"
    with pytest.raises(ValueError, match="POLY1_FL has no fused-kernel branch"):
        fused.fused_classification_loss(x, labels, "POLY1_FL")
