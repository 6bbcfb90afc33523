"""The loss functions against an independent float64 reference of the formulas as written."""

import math

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss as fvcore_focal_loss

from d2_focalstar.modeling.losses import (
    LOSS_TYPES,
    sigmoid_ce_loss,
    sigmoid_classification_loss,
    sigmoid_flstar_loss,
    sigmoid_focal_loss,
)


def classification_loss(
    x, t, loss_type, alpha, gamma=None, max_factor=None, reduction="none", eps=None
):
    """sigmoid_classification_loss with those of gamma, max_factor and eps that the type takes."""
    takes = {p.name for p in LOSS_TYPES[loss_type].params}
    given = {
        k: v
        for k, v in (("gamma", gamma), ("max_factor", max_factor), ("eps", eps))
        if k in takes and v is not None
    }
    return sigmoid_classification_loss(x, t, loss_type, alpha, reduction, **given)


def reference(x, t, loss_type, alpha, gamma, max_factor=0.0, eps=1.0):
    """The formulas as their papers write them, literally, in float64 (p, p_t, a_t, pow, log)."""
    x, t = x.double(), t.double()
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(x)
    if loss_type == "FLSTAR":
        factor = ((1 - p_t) / p_t) ** gamma
        if max_factor:
            factor = factor.clamp(max=max_factor)
    elif loss_type == "FL":
        factor = (1 - p_t) ** gamma
    else:
        factor = torch.ones_like(x)
    if loss_type == "POLY1_FL":  # Leng et al.: the alpha-balanced FL plus an unweighted eps term
        return -a_t * (1 - p_t) ** gamma * torch.log(p_t) + eps * (1 - p_t) ** (gamma + 1)
    return -a_t * factor * torch.log(p_t)


def grid(n=4001, lo=-12.0, hi=12.0):
    x = torch.linspace(lo, hi, n)
    x = torch.cat([x, x])
    t = torch.cat([torch.ones(n), torch.zeros(n)])
    return x, t


# The seed's Fig. 4 settings (alpha = 1 there) and the study's alpha = 0.25, plus no weighting.
SETTINGS = (
    [("CE", a, 0.0) for a in (1.0, 0.25, -1)]
    + [("FL", a, 2.0) for a in (1.0, 0.25, -1)]
    + [("FLSTAR", a, g) for a in (1.0, 0.25, -1) for g in (0.125, 0.25, 0.5, 1.0)]
    + [("POLY1_FL", a, g) for a in (1.0, 0.25, -1) for g in (2.0, 1.0)]
)


@pytest.mark.parametrize("loss_type,alpha,gamma", SETTINGS)
def test_values_match_float64_reference(loss_type, alpha, gamma):
    x, t = grid()
    ours = classification_loss(x, t, loss_type, alpha, gamma, max_factor=0)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(
        ours.double(), reference(x, t, loss_type, alpha, gamma), rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize("loss_type,alpha,gamma", SETTINGS)
def test_gradients_match_float64_reference(loss_type, alpha, gamma):
    x, t = grid(lo=-10, hi=10)
    x_ours = x.clone().requires_grad_()
    classification_loss(x_ours, t, loss_type, alpha, gamma, max_factor=0).sum().backward()
    x_ref = x.double().requires_grad_()
    reference(x_ref, t, loss_type, alpha, gamma).sum().backward()
    torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "loss_type,gamma", [("FLSTAR", 0.25), ("FL", 2.0), ("CE", 0.0), ("POLY1_FL", 2.0)]
)
def test_gradcheck_float64(loss_type, gamma):
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    t = (torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.7).double()
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: classification_loss(v, t, loss_type, 0.25, gamma, reduction="sum"), (x,)
    )


@pytest.mark.parametrize("gamma", [0.125, 0.25, 0.5, 2.0])
def test_flstar_factor_is_one_at_pt_half(gamma):
    x = torch.zeros(2)
    t = torch.tensor([1.0, 0.0])
    flstar = sigmoid_flstar_loss(x, t, alpha=0.25, gamma=gamma)
    # at p_t = 0.5 FL* is the alpha-balanced CE: a_t * log 2
    torch.testing.assert_close(flstar, torch.tensor([0.25, 0.75]) * math.log(2))
    torch.testing.assert_close(flstar, sigmoid_ce_loss(x, t, alpha=0.25))


def test_flstar_upweights_hard_and_downweights_easy_examples():
    x = torch.tensor([-3.0, 3.0])  # positive targets: p_t = sigmoid(x), hard then easy
    t = torch.ones(2)
    ratio = sigmoid_flstar_loss(x, t, gamma=0.5) / sigmoid_ce_loss(x, t)
    assert ratio[0] > 1 and ratio[1] < 1
    torch.testing.assert_close(ratio, torch.exp(-0.5 * x))


@pytest.mark.parametrize("loss_type", ["FL", "FLSTAR"])
def test_gamma_zero_is_alpha_balanced_ce(loss_type):
    # against the literal formula -a_t log(p_t) in float64, and near 0 the factor tends to 1
    x, t = grid()
    ce = reference(x, t, "CE", 0.25, 0.0)
    torch.testing.assert_close(
        classification_loss(x, t, loss_type, 0.25, 0.0).double(), ce, rtol=1e-5, atol=1e-8
    )
    torch.testing.assert_close(
        classification_loss(x, t, loss_type, 0.25, 1e-6).double(), ce, rtol=2e-5, atol=1e-8
    )


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 2.0), (0.5, 1.0)])
def test_focal_loss_equals_fvcore(alpha, gamma):
    x = torch.randn(64, 80, generator=torch.Generator().manual_seed(0)) * 5
    t = (torch.rand(64, 80, generator=torch.Generator().manual_seed(1)) > 0.95).float()
    for reduction in ("none", "sum", "mean"):
        torch.testing.assert_close(
            sigmoid_focal_loss(x, t, alpha, gamma, reduction),
            fvcore_focal_loss(x, t, alpha, gamma, reduction),
            rtol=1e-5,
            atol=1e-6,
        )


def test_max_factor_caps_factor_and_turns_gradient_into_scaled_ce():
    cap, gamma, alpha = 100.0, 0.5, 0.25
    x = torch.linspace(-60, -20, 41, dtype=torch.float64, requires_grad=True)  # hard positives
    t = torch.ones_like(x)
    loss = sigmoid_flstar_loss(x, t, alpha=alpha, gamma=gamma, max_factor=cap)
    loss.sum().backward()
    # past x_t = -ln(cap)/gamma (= -9.2), loss = cap * CE and gradient = -a_t * cap * sigmoid(-x_t)
    torch.testing.assert_close(loss, cap * sigmoid_ce_loss(x.detach(), t, alpha=alpha))
    torch.testing.assert_close(x.grad, -alpha * cap * torch.sigmoid(-x.detach()))
    # below the threshold the cap does not act
    y = torch.tensor([-9.0, 0.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(
        sigmoid_flstar_loss(y, torch.ones(3), gamma=gamma, max_factor=cap),
        reference(y, torch.ones(3), "FLSTAR", 0.25, gamma),
    )


@pytest.mark.parametrize("gamma", [0.125, 0.25, 0.5, 1.0, 2.0, 4.0])
def test_capped_gradient_is_bounded_as_documented(gamma):
    cap, alpha = 100.0, 0.25
    x = torch.linspace(-100, 100, 200001, dtype=torch.float64, requires_grad=True)
    t = torch.ones_like(x)
    sigmoid_flstar_loss(x, t, alpha=alpha, gamma=gamma, max_factor=cap).sum().backward()
    bound = alpha * cap * (1 + math.log(cap) + gamma * math.log(2))
    assert x.grad.abs().max() <= bound
    assert x.grad.abs().max() > 0.75 * bound  # the bound is close, not vacuous


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXTREME_SETTINGS = [("FLSTAR", g) for g in (0.125, 0.25, 0.5, 1.0)] + [
    ("FL", 2.0),
    ("CE", 0.0),
    ("POLY1_FL", 2.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,gamma", EXTREME_SETTINGS)
def test_extreme_logits_give_finite_loss_and_gradient(dtype, loss_type, gamma):
    x = torch.linspace(-100, 100, 2001).to(dtype)
    x = torch.cat([x, x]).requires_grad_()
    t = torch.cat([torch.ones(2001), torch.zeros(2001)]).to(dtype)
    loss = classification_loss(x, t, loss_type, 0.25, gamma, reduction="none")
    assert loss.dtype == torch.float32  # accumulated in fp32 whatever the logits
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all()
    # the hardest positive (x = -100) and negative (x = 100) have the largest loss of their
    # kind, and it is not saturated: nothing was clamped to a constant
    positives, negatives = loss[:2001], loss[2001:]
    assert positives[0] == positives.max() > positives[100]
    assert negatives[-1] == negatives.max() > negatives[-101]
    # and the values there are the formula's: -log p_t = 100 (to 4e-44) times a_t and the factor,
    # for FL* min(exp(100 g), 100) (the default cap), for FL (1 - p_t)^g = 1
    # (Poly-1 adds eps (1 - p_t)^(g+1) = 1 there)
    factor = min(math.exp(100 * gamma), 100.0) if loss_type == "FLSTAR" else 1.0
    poly = 1.0 if loss_type == "POLY1_FL" else 0.0
    for value, grad, a_t in ((positives[0], x.grad[0], 0.25), (negatives[-1], x.grad[-1], 0.75)):
        assert value.item() == pytest.approx(a_t * factor * 100.0 + poly, rel=1e-6)
        # past the cap (or for CE) the gradient is a_t * factor * sigmoid(-x_t) ~ a_t * factor
        if loss_type in ("FLSTAR", "CE"):
            assert abs(grad.float().item()) == pytest.approx(a_t * factor, rel=1e-2)
    # half-precision logits give what the fp32 function gives on the same (rounded) values
    ref = classification_loss(x.detach().float(), t.float(), loss_type, 0.25, gamma)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=0)


def test_without_cap_fp16_gradient_overflows_which_is_why_the_cap_is_default():
    # README: uncapped, g = 0.5, a = 0.25, the fp16 gradient overflows from x_t ~ -21 on
    x = torch.tensor([-20.0, -21.0, -100.0], dtype=torch.float16, requires_grad=True)
    sigmoid_flstar_loss(
        x, torch.ones(3, dtype=torch.float16), gamma=0.5, max_factor=0
    ).sum().backward()
    assert torch.isfinite(x.grad[0]) and torch.isinf(x.grad[1:]).all()
    x.grad = None
    sigmoid_flstar_loss(x, torch.ones(3, dtype=torch.float16), gamma=0.5).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_empty_input():
    x = torch.zeros(0, 80, requires_grad=True)
    loss = sigmoid_flstar_loss(x, torch.zeros(0, 80), reduction="sum")
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, 80)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(loss_type="FLSTARR"), "loss_type='FLSTARR'"),
        (dict(gamma=-0.5), "gamma=-0.5"),
        (dict(gamma=float("nan")), "gamma=nan"),
        (dict(alpha=1.5), "alpha=1.5"),
        (dict(max_factor=0.5), "max_factor=0.5"),
        (dict(loss_type="POLY1_FL", eps=-2.0), "eps=-2.0 must be a finite number >= -1"),
        (dict(loss_type="CE", gamma=2.0), "CE takes no parameter but alpha; not gamma"),
        (dict(reduction="avg"), "reduction='avg'"),
    ],
)
def test_bad_arguments_are_named(kwargs, needle):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        sigmoid_classification_loss(x, torch.zeros(2, 3), **kwargs)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        sigmoid_flstar_loss(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 1.0), (0.5, 0.5)])
def test_appendix_flstar_equals_fvcore_sigmoid_focal_loss_star(alpha, gamma):
    from fvcore.nn import sigmoid_focal_loss_star

    x = torch.randn(64, 80, generator=torch.Generator().manual_seed(2)) * 5
    t = (torch.rand(64, 80, generator=torch.Generator().manual_seed(3)) > 0.95).float()
    for reduction in ("none", "sum"):
        ours = classification_loss(x, t, "FLSTAR_APPENDIX", alpha, gamma, reduction=reduction)
        torch.testing.assert_close(
            ours, sigmoid_focal_loss_star(x, t, alpha, gamma, reduction), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_appendix_flstar_extreme_logits_finite(dtype):
    x = torch.linspace(-100, 100, 2001).to(dtype).requires_grad_()
    loss = classification_loss(x, torch.ones(2001, dtype=dtype), "FLSTAR_APPENDIX", 0.25, 2.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


def test_appendix_flstar_rejects_gamma_zero():
    with pytest.raises(ValueError, match="FLSTAR_APPENDIX: gamma=0.0 must be a finite number > 0"):
        classification_loss(torch.zeros(2), torch.zeros(2), "FLSTAR_APPENDIX", 0.25, 0.0)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_term_weighted_zero_stays_zero_without_cap(alpha):
    """Uncapped FL*, g = 0.5: exp(0.5 * 200) overflows fp32. A term alpha weights 0 (the
    negatives for alpha = 1, the positives for alpha = 0) is 0 with a 0 gradient, not 0 * inf."""
    x = torch.tensor([200.0, -200.0, 200.0, -200.0, 1.0, 1.0], requires_grad=True)
    t = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    loss = sigmoid_flstar_loss(x, t, alpha=alpha, gamma=0.5, max_factor=0)
    loss.sum().backward()
    zero = t == 1 if alpha == 0 else t == 0
    assert (loss[zero] == 0).all() and (x.grad[zero] == 0).all()
    kept = ~zero & (x.abs() == 1)  # an ordinary term keeps its value
    torch.testing.assert_close(
        loss[kept].double(), reference(x[kept].detach(), t[kept], "FLSTAR", alpha, 0.5)
    )


def test_gamma_must_be_finite():
    with pytest.raises(ValueError, match="gamma=inf must be a finite number >= 0"):
        sigmoid_flstar_loss(torch.zeros(1), torch.ones(1), gamma=math.inf)


def test_docs_key_table_is_the_loss_tables():
    """docs/CONFIG.md holds the key table as the loss table prints it: a type or parameter added
    to the table shows up there, and nothing is described that the table does not have."""
    import os

    from d2_focalstar.modeling.losses import config_table

    with open(
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "CONFIG.md"
        )
    ) as f:
        doc = f.read()
    block = doc.split("<!-- loss table: python tools/loss_table.py -->\n")[1].split(
        "<!-- end of loss table -->"
    )[0]
    assert block == config_table()


@pytest.mark.parametrize("eps", [-1.0, 0.0, 1.0, 3.0])
def test_poly1_is_focal_loss_plus_an_unweighted_eps_term(eps):
    """Poly-1 FL (Leng et al. 2022): eps = 0 is FL exactly; the eps term is eps (1 - p_t)^(g+1),
    not weighted by a_t (the same for positives and negatives), as in the paper's code."""
    from d2_focalstar.modeling.losses import sigmoid_poly1_focal_loss

    x, t = grid()
    poly = sigmoid_poly1_focal_loss(x, t, alpha=0.25, gamma=2.0, eps=eps)
    fl = sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0)
    p_t = torch.where(t > 0, torch.sigmoid(x.double()), torch.sigmoid(-x.double()))
    torch.testing.assert_close(
        poly.double() - fl.double(), eps * (1 - p_t) ** 3, rtol=1e-5, atol=1e-6
    )
    if eps == 0:
        assert torch.equal(poly, fl)
    # eps >= -1 keeps the loss non-negative only with a_t = 1 (the paper's bound is for CE)
    unweighted = sigmoid_poly1_focal_loss(x, t, alpha=-1, gamma=2.0, eps=eps)
    assert (unweighted >= -1e-6).all()
