"""Triton top-k selection (radix select, AuxK, BatchTopK threshold) vs torch, in the Triton interpreter."""

from kernel_env import DEV, FAST, NO_SHRINK, needs_triton  # noqa: I001  (first: switches the interpreter on)

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

pytestmark = needs_triton


@pytest.fixture(autouse=True)
def _triton_poisoned(monkeypatch):
    monkeypatch.setenv("SAETUNE_KERNELS", "triton")
    monkeypatch.setenv("SAETUNE_POISON", "1")  # outputs start as NaN / -7: an unwritten element fails


def _pre(B, n, seed, ties, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, n, generator=g)
    if ties:  # a coarse grid: many equal values, also at the k-th place
        pre = (pre * 2).round() / 2
    return pre.to(dtype).to(DEV)


def _check_valid_topk(pre, v, i, k):
    """i: k distinct latents per row, ascending, whose values are a top-k multiset; v = ReLU(pre[i])."""
    assert i.shape == (pre.shape[0], k) and (i >= 0).all() and (i < pre.shape[1]).all()
    assert (i[:, 1:] > i[:, :-1]).all(), "indices ascending (hence distinct) within a row"
    got = pre.gather(1, i)
    ref = pre.float().topk(k, dim=-1).values
    assert torch.equal(got.float().sort(-1, descending=True).values, ref)
    assert torch.equal(v, got.relu())


@FAST
@given(B=st.integers(1, 5), n=st.integers(2, 70), seed=st.integers(0, 2**31), ties=st.booleans(), data=st.data())
def test_row_topk_matches_torch(B, n, seed, ties, data):
    from saetune.kernels import topk_select
    k = data.draw(st.integers(1, n))
    pre = _pre(B, n, seed, ties)
    v, i, va, ia = topk_select(pre, k)
    _check_valid_topk(pre, v, i, k)
    assert va.shape == (B, 0) and ia.shape == (B, 0)


def test_ties_pick_lowest_indices():
    from saetune.kernels import topk_select
    pre = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0, -1.0]], device=DEV)
    v, i, _, _ = topk_select(pre, 3)
    assert i.tolist() == [[1, 2, 3]] and v.tolist() == [[2.0, 2.0, 2.0]]
    v, i, _, _ = topk_select(-torch.ones(1, 5, device=DEV), 2)  # all negative: ReLU'd values are 0
    assert i.tolist() == [[0, 1]] and v.tolist() == [[0.0, 0.0]]


@FAST
@given(B=st.integers(1, 4), n=st.integers(3, 50), seed=st.integers(0, 2**31), ties=st.booleans(), data=st.data())
def test_auxk_selection_among_dead_latents(B, n, seed, ties, data):
    from saetune.kernels import topk_select
    from saetune.kernels.topk_sae import topk_select_torch
    k = data.draw(st.integers(1, n - 1))
    k_aux = data.draw(st.integers(1, n))
    dead = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)).lt(0.5).to(DEV)
    pre = _pre(B, n, seed, ties)
    v, i, va, ia = topk_select(pre, k, dead, k_aux)
    _check_valid_topk(pre, v, i, k)
    _, _, rva, _ = topk_select_torch(pre, k, dead, k_aux)
    assert torch.equal(va.sort(-1).values, rva.sort(-1).values)
    real = va != 0
    assert dead[ia[real]].all(), "every non-zero AuxK value comes from a dead latent"
    n_dead = int(dead.sum())
    if n_dead >= k_aux:
        assert dead[ia].all()


def test_bf16_pre_activations():
    from saetune.kernels import topk_select
    pre = _pre(3, 37, 5, ties=True, dtype=torch.bfloat16)
    v, i, _, _ = topk_select(pre, 6)
    assert v.dtype == torch.bfloat16
    _check_valid_topk(pre, v, i, 6)


@FAST
@given(B=st.integers(1, 6), n=st.integers(2, 40), seed=st.integers(0, 2**31), ties=st.booleans(), data=st.data())
def test_batch_topk_threshold(B, n, seed, ties, data):
    from saetune.kernels import batch_topk
    from saetune.kernels.topk_sae import batch_topk_threshold_torch
    from saetune.kernels.triton_topk import batch_topk_threshold_triton
    k = data.draw(st.integers(1, n - 1))
    pre = _pre(B, n, seed, ties)
    keep = k * B
    assert batch_topk_threshold_triton(pre, keep).item() == batch_topk_threshold_torch(pre, keep).item()
    p = pre.clone().requires_grad_()
    acts = batch_topk(p, k)
    theta = batch_topk_threshold_torch(pre, keep)
    assert torch.equal(acts.detach(), torch.where(pre.relu() >= theta, pre.relu(), 0.0))
    if not ties:  # without ties the global threshold keeps exactly what a flat top-k keeps
        from saetune.sae import SAE, SAEConfig
        ref = SAE(SAEConfig(1, n, k=k, architecture="batchtopk")).batch_topk(pre)
        assert torch.equal(acts.detach(), ref)
    g = torch.randn(B, n, generator=torch.Generator().manual_seed(seed)).to(DEV)
    (acts * g).sum().backward()
    assert torch.equal(p.grad, torch.where((pre.relu() >= theta) & (pre > 0), g, 0.0))
