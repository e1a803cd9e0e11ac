"""saetune.rl.entropy: token entropy, entropy stats, the 80/20 mask, Clip-Cov and KL-Cov."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.rl.entropy import (
    clip_cov_mask,
    entropy_stats,
    high_entropy_mask,
    kl_cov_loss,
    kl_cov_selection,
    token_covariance,
    token_entropy,
)


# --------------------------------------------------------------------------- token_entropy
def _ref_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def test_entropy_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 37, generator=g) * 4
    h = token_entropy(x)
    assert h.shape == (3, 5) and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), _ref_entropy(x), atol=1e-5, rtol=1e-5)


def test_entropy_dtypes():
    x = torch.randn(4, 11)
    assert token_entropy(x.bfloat16()).dtype == torch.float32
    assert token_entropy(x.half()).dtype == torch.float32
    h64 = token_entropy(x.double())
    assert h64.dtype == torch.float64
    torch.testing.assert_close(h64, _ref_entropy(x), atol=1e-12, rtol=1e-12)
    # bf16 input is upcast before the math: matches the reference of the rounded logits.
    xb = x.bfloat16()
    torch.testing.assert_close(token_entropy(xb).double(), _ref_entropy(xb.float()), atol=1e-5, rtol=1e-5)


def test_entropy_uniform_onehot_and_masked_vocab():
    V = 50
    torch.testing.assert_close(token_entropy(torch.zeros(2, V)), torch.full((2,), math.log(V)))
    one_hot = torch.full((V,), -1e4)
    one_hot[3] = 0.0
    assert token_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    # -inf logits (masked vocabulary) count as probability 0: entropy of the rest, no nan.
    z = torch.tensor([0.0, 0.0, -math.inf, -math.inf], requires_grad=True)
    h = token_entropy(z)
    assert h.item() == pytest.approx(math.log(2))
    h.backward()
    assert torch.isfinite(z.grad).all()


def test_entropy_temperature_hand_value():
    # p ∝ [1, 3] at T=1; at T=2, z = [0, ln3/2] so p ∝ [1, √3].
    z = torch.tensor([0.0, math.log(3.0)])
    assert token_entropy(z).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)
    p = torch.tensor([1.0, math.sqrt(3.0)]).double()
    p = p / p.sum()
    assert token_entropy(z, temperature=2.0).item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    x = torch.randn(6, 9)
    torch.testing.assert_close(token_entropy(x, temperature=0.7), token_entropy(x / 0.7))
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(SaetuneError, match="temperature"):
            token_entropy(x, temperature=bad)


def test_entropy_gradient_matches_autograd_reference():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(token_entropy, (x,))


# --------------------------------------------------------------------------- entropy_stats
def _crafted_1_to_10():
    ent = torch.full((2, 6), 999.0)
    mask = torch.zeros(2, 6)
    ent[0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ent[1, :6] = torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    mask[0, :4] = 1
    mask[1, :6] = 1
    return ent, mask


def test_entropy_stats_crafted():
    ent, mask = _crafted_1_to_10()
    s = entropy_stats(ent, mask)
    assert s["n_tokens"] == 10
    assert s["mean"] == pytest.approx(5.5)
    assert s["p50"] == pytest.approx(5.5)
    assert s["p80"] == pytest.approx(8.2)  # position 0.8·9 = 7.2 → 8 + 0.2
    assert s["p95"] == pytest.approx(9.55)
    assert s["frac_above_p80"] == pytest.approx(0.2)  # 9 and 10
    empty = entropy_stats(ent, torch.zeros_like(mask))
    assert empty["n_tokens"] == 0 and math.isnan(empty["mean"])


# --------------------------------------------------------------------------- 80/20 mask
def test_high_entropy_mask_crafted():
    ent, mask = _crafted_1_to_10()
    keep = high_entropy_mask(ent, mask, rho=0.2)
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[1, 4:] = True  # 9 and 10 ≥ τ = 8.2; padding (999) never kept nor counted
    assert torch.equal(keep, expected)
    assert torch.equal(high_entropy_mask(ent, mask.bool(), rho=1.0), mask.bool())


def test_high_entropy_mask_keeps_ties_at_quantile():
    ent = torch.tensor([[1.0, 2.0, 3.0], [3.0, 3.0, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # valid [1,2,3,3,3]: τ = quantile 0.8 = 3 → the three tied 3s are kept (3/5 > ρ).
    keep = high_entropy_mask(ent, mask, rho=0.2)
    assert torch.equal(keep, torch.tensor([[False, False, True], [True, True, False]]))


def test_high_entropy_mask_errors():
    ent, mask = _crafted_1_to_10()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(SaetuneError, match="rho"):
            high_entropy_mask(ent, mask, rho=bad)
    with pytest.raises(SaetuneError, match=r"\(2, 5\)"):
        high_entropy_mask(ent, mask[:, :5])
    with pytest.raises(SaetuneError, match="not initialised"):
        high_entropy_mask(ent, mask, group=object())


_DIST_WORKER = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from saetune.rl.entropy import high_entropy_mask
    rank = int(sys.argv[1])
    store = dist.TCPStore("127.0.0.1", int(sys.argv[2]), is_master=False)  # the test's store, already listening
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    if rank == 0:   # 4 valid tokens: 1..4
        ent = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0, 50.0]]); mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    else:           # 6 valid tokens: 5..10
        ent = torch.tensor([[5.0, 6.0, 7.0, 8.0, 9.0, 10.0]]); mask = torch.ones(1, 6)
    keep = high_entropy_mask(ent, mask, rho=0.2)
    print(json.dumps(keep.int().tolist()))
    dist.destroy_process_group()
    """
)


def test_high_entropy_mask_quantile_across_processes():
    # the rendezvous store binds port 0 here and stays up: no port picked, released, and raced for
    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    port = str(store.port)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _DIST_WORKER, str(r), port], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for r in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    # Global τ over 1..10 is 8.2: rank 0 (all ≤ 4) keeps nothing although its local top-20% is 4.
    assert outs[0] == [[0, 0, 0, 0, 0, 0]]
    assert outs[1] == [[0, 0, 0, 0, 1, 1]]


# --------------------------------------------------------------------------- Clip-Cov / KL-Cov
def _cov_batch(shift=-3.0):
    """Token advantages A and log-probs with hand-known C = [[4, 2, pad], [-1, 1, pad]]."""
    adv = torch.tensor([[4.0, -2.0, 100.0], [-1.0, -1.0, 100.0]])  # valid mean 0
    x = torch.tensor([[1.0, -1.0, 7.0], [1.0, -1.0, 7.0]])  # valid mean 0
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return adv, x + shift, mask


def test_token_covariance_hand_values():
    adv, lp, mask = _cov_batch()
    cov = token_covariance(adv, lp, mask)
    torch.testing.assert_close(cov[mask.bool()], torch.tensor([4.0, 2.0, -1.0, 1.0], dtype=torch.float64))
    assert torch.isinf(cov[~mask.bool()]).all()


def test_kl_cov_selection_top_tokens():
    adv, lp, mask = _cov_batch()
    sel = kl_cov_selection(adv, lp, mask, ratio=0.25)  # ⌊0.25·4⌋ = 1 → C=4
    assert torch.equal(sel, torch.tensor([[True, False, False], [False, False, False]]))
    sel = kl_cov_selection(adv, lp, mask, ratio=0.5)  # top 2 → C=4, C=2
    assert torch.equal(sel, torch.tensor([[True, True, False], [False, False, False]]))
    assert not kl_cov_selection(adv, lp, mask, ratio=0.2).any()  # ⌊0.8⌋ = 0
    assert kl_cov_selection(adv, lp, mask, ratio=0.2, at_least_one=True).sum() == 1
    with pytest.raises(SaetuneError, match="percent"):
        kl_cov_selection(adv, lp, mask, ratio=2.0)


def test_kl_cov_loss_on_selection():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])
    sel = torch.tensor([[True, True], [False, True]])
    term = kl_cov_loss(lp, old, sel, beta=1.0)
    torch.testing.assert_close(term, torch.tensor([[0.5, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(kl_cov_loss(lp, old, sel, beta=0.1), 0.1 * term)
    term.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[1.0, -1.0], [0.0, -1.0]]))


def _clip_cov_batch():
    # centred A = [2.4, -3.6, 0.4, -1.6, 2.4], centred x = [0.6, -1.4, -0.3, -0.5, 1.6]
    # → C = [1.44, 5.04, -0.12, 0.8, 3.84]: candidates in (1, 5) are tokens 0 and 4.
    adv = torch.tensor([[3.0, -3.0, 1.0, -1.0, 3.0, 0.0]])
    x = torch.tensor([[1.0, -1.0, 0.1, -0.1, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return adv, x - 2.0, mask


def test_clip_cov_picks_random_candidates():
    adv, lp, mask = _clip_cov_batch()
    cov = token_covariance(adv, lp, mask)[0, :5]
    torch.testing.assert_close(cov, torch.tensor([1.44, 5.04, -0.12, 0.8, 3.84], dtype=torch.float64))
    cand = {0, 4}
    picks = set()
    for seed in range(30):
        keep = clip_cov_mask(adv, lp, None, mask, generator=torch.Generator().manual_seed(seed))
        dropped = (~keep[0, :5]).nonzero().flatten().tolist()
        assert len(dropped) == 1  # max(1, ⌊2e-4·5⌋) = 1
        assert dropped[0] in cand
        assert not keep[0, 5]  # padding is never kept
        picks.add(dropped[0])
    assert picks == cand  # random over all candidates
    keep = clip_cov_mask(adv, lp, None, mask, ratio=1.0)
    assert {i for i in range(5) if not keep[0, i]} == cand  # ratio·N ≥ candidates → all of them


def test_clip_cov_skips_already_clipped_and_out_of_band():
    # C = A·x with centred A = [3,-3,1,-1] and x = [1,-1,0.1,-0.1] → [3, 3, 0.1, 0.1].
    adv = torch.tensor([[3.0, -3.0, 1.0, -1.0]])
    x = torch.tensor([[1.0, -1.0, 0.1, -0.1]]) - 2.0
    mask = torch.ones(1, 4)
    old = x.clone()
    old[0, 0] = x[0, 0] - 0.5  # token 0: Â>0 and r = e^0.5 > 1.28 → already clipped by PPO
    for seed in range(10):
        keep = clip_cov_mask(adv, x, old, mask, generator=torch.Generator().manual_seed(seed))
        assert keep.tolist() == [[True, False, True, True]]
    # scale x so C = [6, 6, .2, .2]: nobody in (1, 5) → nothing dropped
    keep = clip_cov_mask(adv, (x + 2.0) * 2 - 2.0, None, mask)
    assert keep.all()
    with pytest.raises(SaetuneError, match="percent"):
        clip_cov_mask(adv, x, None, mask, ratio=5.0)
