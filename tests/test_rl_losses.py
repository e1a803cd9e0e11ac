"""saetune.rl.losses and saetune.rl.advantages: clipping, aggregation, KL, entropy bonus, REDI,
GRPO/Dr.GRPO advantages, dynamic sampling and the overlong penalty."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saetune.errors import SaetuneError
from saetune.rl.advantages import (
    broadcast_to_tokens,
    dynamic_sampling_filter,
    grpo_advantages,
    overlong_penalty,
)
from saetune.rl.entropy import token_entropy
from saetune.rl.losses import aggregate, kl_k3, policy_loss, redi_loss

HYP = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- advantages
def test_grpo_advantages_hand_values_and_ties():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]), group_size=None,
                          group_ids=torch.tensor([0, 0, 0, 1, 1, 1, 1]))
    # group 0: mean 1/3, Bessel std √(1/3) → 2/3/√(1/3) = 1.1547, −0.5774; group 1 (ties): ±0.5/0.57735
    expected = torch.tensor([1.1547005, -0.5773503, -0.5773503, 0.8660254, 0.8660254, -0.8660254, -0.8660254])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    r = torch.tensor([3.0, 1.0, 2.0, 2.0])
    ref = (r - r.mean()) / (r.std() + 1e-6)  # torch.std: Bessel-corrected
    torch.testing.assert_close(grpo_advantages(r, group_size=4), ref)


def test_grpo_all_equal_and_singleton_groups_are_zero():
    adv = grpo_advantages([1.0, 1.0, 1.0, 0.5, 0.0, 1.0], group_ids=[7, 7, 7, 9, 3, 3])
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv[:4], torch.zeros(4))  # constant group, then a group of one
    assert adv[4] < 0 < adv[5]


def test_grpo_group_ids_equal_group_size_and_dr_grpo():
    r = torch.tensor([0.2, 0.9, 0.4, 1.0, 0.0, 0.5])
    by_size = grpo_advantages(r, group_size=3)
    perm = torch.tensor([4, 0, 2, 5, 1, 3])
    by_ids = grpo_advantages(r[perm], group_ids=(torch.arange(6) // 3)[perm])
    torch.testing.assert_close(by_ids, by_size[perm])
    dr = grpo_advantages(r, group_size=3, scale_by_std=False)  # Dr.GRPO: R − mean, no std division
    torch.testing.assert_close(dr, torch.tensor([0.2 - 0.5, 0.9 - 0.5, 0.4 - 0.5, 0.5, -0.5, 0.0]))


def test_grpo_errors():
    with pytest.raises(SaetuneError, match="exactly one"):
        grpo_advantages([1.0, 0.0])
    with pytest.raises(SaetuneError, match="group_size=4"):
        grpo_advantages([1.0, 0.0, 1.0], group_size=4)
    with pytest.raises(SaetuneError, match=r"\(2,\)"):
        grpo_advantages([1.0, 0.0, 1.0], group_ids=[0, 1])


@HYP
@given(st.lists(st.lists(st.floats(-10, 10), min_size=2, max_size=8), min_size=1, max_size=4))
def test_grpo_group_advantages_sum_to_zero(groups):
    rewards = torch.tensor([x for g in groups for x in g], dtype=torch.float64)
    ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    adv = grpo_advantages(rewards, group_ids=ids)
    for i, g in enumerate(groups):
        a = adv[ids == i]
        if max(g) > min(g):  # a non-constant group
            assert abs(float(a.sum())) <= 1e-9 * (1 + float(a.abs().max()))
            assert float(a.abs().max()) > 0
        else:
            assert float(a.abs().max()) == 0


def test_dynamic_sampling_filter():
    keep = dynamic_sampling_filter([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3)
    assert keep.tolist() == [True, True, True, False, False, False, False, False, False]
    keep = dynamic_sampling_filter(torch.tensor([0.0, 1.0, 0.5, 0.5, 1.0]), torch.tensor([2, 1, 5, 5, 2]))
    assert keep.tolist() == [True, False, False, False, True]  # group 1 is a group of one


def test_overlong_penalty_values():
    # DAPO: Lmax 20480, B 4096 → free up to 16384, −1 at 20480
    pen = overlong_penalty(torch.tensor([100, 16384, 16385, 18432, 20480]), 20480, 4096)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0]))
    assert not torch.signbit(pen[:2]).any()  # a clean +0, not −0
    # CURE: B 512
    torch.testing.assert_close(overlong_penalty([3584, 3840, 4096], 4096, 512), torch.tensor([0.0, -0.5, -1.0]))
    with pytest.raises(SaetuneError, match="buffer=0"):
        overlong_penalty([1], 10, 0)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(SaetuneError, match=r"\(3,\)"):
        broadcast_to_tokens(torch.ones(3), mask)


# --------------------------------------------------------------------------- clipping
def _one_token(r: float, a: float, **kw):
    lp = torch.tensor([[math.log(r)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, metrics = policy_loss(lp, old, torch.tensor([a], dtype=torch.float64), torch.ones(1, 1), **kw)
    loss.backward()
    return float(loss.detach()), float(lp.grad), metrics


@pytest.mark.parametrize(
    "r, a, loss, clipped, side",
    [
        (1.27, 1.0, -1.27, False, None),   # Â>0, inside 1+ε_high
        (1.29, 1.0, -1.28, True, "high"),  # Â>0, outside → clipped, no gradient
        (0.79, 1.0, -0.79, False, None),   # Â>0 below 1−ε_low: never clipped (pessimistic min)
        (0.81, -1.0, 0.81, False, None),   # Â<0, inside 1−ε_low
        (0.79, -1.0, 0.80, True, "low"),   # Â<0, outside → clipped
        (1.50, -1.0, 1.50, False, None),   # Â<0 above 1+ε_high: never clipped
    ],
)
def test_clip_boundaries(r, a, loss, clipped, side):
    got, grad, m = _one_token(r, a)
    assert got == pytest.approx(loss, abs=1e-9)
    if clipped:
        assert grad == 0.0
    else:
        assert grad == pytest.approx(-a * r)  # d(−Â·r)/d logπ = −Â·r
    assert m["clipfrac_high"] == (1.0 if side == "high" else 0.0)
    assert m["clipfrac_low"] == (1.0 if side == "low" else 0.0)


def test_dual_clip():
    got, grad, m = _one_token(4.0, -1.0, dual_clip=3.0)
    assert got == pytest.approx(3.0) and grad == 0.0 and m["clipfrac_dual"] == 1.0
    got, grad, m = _one_token(2.9, -1.0, dual_clip=3.0)
    assert got == pytest.approx(2.9) and grad == pytest.approx(2.9) and m["clipfrac_dual"] == 0.0
    assert _one_token(4.0, -1.0)[0] == pytest.approx(4.0)  # off by default
    assert _one_token(12.0, -1.0, dual_clip=10.0)[0] == pytest.approx(10.0)  # CURE's c
    assert _one_token(4.0, 1.0, dual_clip=3.0)[0] == pytest.approx(-1.28)  # Â>0 untouched
    with pytest.raises(SaetuneError, match="dual_clip"):
        _one_token(1.0, 1.0, dual_clip=0.5)


# --------------------------------------------------------------------------- aggregation
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, -7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 10 / 4),
        ("dapo", 10 / 4),
        ("bnpo", 10 / 4),
        ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),
        ("grpo", (6 / 3 + 4 / 1) / 2),
        ("seq-mean-token-sum-norm", (6 / 3 + 4 / 3) / 2),  # default L = T = 3
        ("dr_grpo", (6 / 3 + 4 / 3) / 2),
    ],
)
def test_aggregations_on_ragged_mask(mode, expected):
    assert float(aggregate(LOSS, MASK, mode)) == pytest.approx(expected)
    assert float(aggregate(LOSS, MASK.bool(), mode)) == pytest.approx(expected)


def test_aggregation_norm_length_and_errors():
    assert float(aggregate(LOSS, MASK, "seq-mean-token-sum-norm", norm_length=4)) == pytest.approx((6 / 4 + 4 / 4) / 2)
    with pytest.raises(SaetuneError, match="token-mean.*seq-mean-token-mean.*dr_grpo"):
        aggregate(LOSS, MASK, "sequence-mean")
    with pytest.raises(SaetuneError, match=r"\(2, 2\).*\(2, 3\)"):
        aggregate(LOSS, MASK[:, :2], "token-mean")
    with pytest.raises(SaetuneError, match="0 and 1"):
        aggregate(LOSS, MASK * 2, "token-mean")
    with pytest.raises(SaetuneError, match="norm_length"):
        aggregate(LOSS, MASK, "dr_grpo", norm_length=0)


@HYP
@given(st.floats(-1e3, 1e3), st.integers(1, 5), st.integers(1, 7), st.data())
def test_token_mean_of_constant_is_constant(c, B, T, data):
    bits = data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T).filter(any))
    mask = torch.tensor(bits).reshape(B, T)
    loss = torch.full((B, T), c, dtype=torch.float64)
    loss[~mask] = data.draw(st.floats(-1e6, 1e6))
    assert float(aggregate(loss, mask, "token-mean")) == pytest.approx(c, rel=1e-12, abs=1e-12)


@HYP
@given(st.integers(1, 4), st.integers(1, 6), st.sampled_from(["token-mean", "grpo", "dr_grpo"]), st.data())
def test_loss_invariant_to_padding_values(B, T, mode, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[:, 0] = True
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    kw = dict(agg=mode, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    base, m0 = policy_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, **kw)
    junk = data.draw(st.sampled_from([0.0, -1e4, 1e4, math.nan, math.inf]))
    pad = lambda t: torch.where(mask, t, torch.full_like(t, junk))  # noqa: E731
    other, m1 = policy_loss(pad(lp), pad(old), adv, mask, ref_logprobs=pad(ref), entropy=pad(ent), **kw)
    assert math.isfinite(float(base))
    assert float(other) == float(base)
    assert m0 == m1


# --------------------------------------------------------------------------- KL, entropy, pg_coef
def test_kl_k3_values():
    lp = torch.log(torch.tensor([[0.2, 0.5]]))
    torch.testing.assert_close(kl_k3(lp, lp), torch.zeros(1, 2))
    # Δ = ln 2 → 2 − ln 2 − 1;  Δ = −ln 2 → 1/2 + ln 2 − 1
    ref = lp + torch.tensor([[math.log(2.0), -math.log(2.0)]])
    torch.testing.assert_close(kl_k3(lp, ref), torch.tensor([[1 - math.log(2), math.log(2) - 0.5]]))
    with pytest.raises(SaetuneError, match=r"\(1, 3\)"):
        kl_k3(lp, torch.zeros(1, 3))


def test_policy_loss_adds_kl_term():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = lp + math.log(2.0)
    mask = torch.ones(1, 2)
    base, _ = policy_loss(lp, lp, torch.tensor([1.0]), mask)
    with_kl, m = policy_loss(lp, lp, torch.tensor([1.0]), mask, ref_logprobs=ref, kl_coef=0.1)
    assert m["kl"] == pytest.approx(1 - math.log(2), rel=1e-6)
    assert float(with_kl - base) == pytest.approx(0.1 * (1 - math.log(2)), rel=1e-5)
    with pytest.raises(SaetuneError, match="ref_logprobs"):
        policy_loss(lp, lp, torch.tensor([1.0]), mask, kl_coef=0.1)


def test_entropy_bonus_has_gradient_with_right_sign():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    lp = torch.randn(2, 3)
    ent = token_entropy(logits)
    loss, m = policy_loss(lp, lp, torch.zeros(2), mask, entropy=ent, entropy_coef=0.1, pg_coef=0.0)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert logits.grad[1, 2].abs().sum() == 0  # padding gets no gradient
    with torch.no_grad():  # a gradient step on the loss raises the mean entropy
        before = float((token_entropy(logits) * mask).sum() / mask.sum())
        after = float((token_entropy(logits - 0.5 * logits.grad) * mask).sum() / mask.sum())
    assert after > before
    # dloss/dH_t = −c_H / n_valid on valid tokens (token-mean)
    h = torch.rand(2, 3, requires_grad=True)
    policy_loss(lp, lp, torch.zeros(2), mask, entropy=h, entropy_coef=0.1)[0].backward()
    torch.testing.assert_close(h.grad, -0.1 * mask.float() / 5)


def test_pg_coef_zero_cuts_pg_gradient():
    lp = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.4, -2.0]])
    ent = torch.rand(1, 3, requires_grad=True)
    args = (lp, old, torch.tensor([1.5]), torch.ones(1, 3))
    policy_loss(*args, entropy=ent, entropy_coef=1e-3, pg_coef=1.0)[0].backward()
    assert lp.grad.abs().sum() > 0
    lp.grad = None
    loss, m = policy_loss(*args, entropy=ent, entropy_coef=1e-3, pg_coef=0.0)
    loss.backward()
    # no path from the pg term to logprobs at all (grad stays None), i.e. a zero gradient
    assert lp.grad is None or torch.equal(lp.grad, torch.zeros_like(lp))
    assert ent.grad is not None and ent.grad.abs().sum() > 0
    assert m["pg_loss"] != 0  # still reported


def test_pg_token_mask_keeps_the_normaliser():
    lp = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    adv = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    gate = torch.tensor([[False, False, True, True]])
    loss, _ = policy_loss(lp, lp, adv, mask, pg_token_mask=gate)
    assert float(loss) == pytest.approx(-(3 + 4) / 4)  # divided by the 4 valid tokens, not 2


def test_policy_loss_shape_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(SaetuneError, match=r"old_logprobs.*\(2, 4\)"):
        policy_loss(lp, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(SaetuneError, match=r"advantages.*\(3,\)"):
        policy_loss(lp, lp, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(SaetuneError, match=r"mask.*\(2, 2\)"):
        policy_loss(lp, lp, torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(SaetuneError, match="valid"):
        policy_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), agg="mean")


# --------------------------------------------------------------------------- REDI
def test_redi_loss_crafted_pair():
    pos = torch.tensor([[-1.0, -3.0, 123.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    pos_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    neg = torch.tensor([[-0.5, 77.0], [-2.0, -4.0]], requires_grad=True)
    neg_mask = torch.tensor([[1, 0], [1, 1]])
    loss = redi_loss(pos, pos_mask, neg, neg_mask)  # α = 0.8
    # pair 0: −(−2) + 0.8·(−0.5) = 1.6; pair 1: 0.5 + 0.8·(−3) = −1.9
    assert float(loss.detach()) == pytest.approx((1.6 - 1.9) / 2)
    assert float(redi_loss(pos, pos_mask, neg, neg_mask, alpha=0.0).detach()) == pytest.approx((2.0 + 0.5) / 2)
    loss.backward()
    assert (pos.grad[pos_mask.bool()] < 0).all() and pos.grad[0, 2] == 0  # push positives up
    assert (neg.grad[neg_mask.bool()] > 0).all() and neg.grad[0, 1] == 0  # push negatives down
    with pytest.raises(SaetuneError, match="same number of rows"):
        redi_loss(pos, pos_mask, neg[:1], neg_mask[:1])
