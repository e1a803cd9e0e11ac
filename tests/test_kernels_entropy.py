"""Fused linear entropy / log-prob vs explicit logits (token_entropy, log_softmax) and the chunked
torch path: outputs and gradients wrt hidden, weight and bias, in the Triton interpreter."""

import os

import torch

if not torch.cuda.is_available():  # no GPU: the kernels run in Triton's interpreter (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

NO_SHRINK = [Phase.generate]  # a failing example is reported as drawn: shrinking re-runs the slow interpreter

from saetune.errors import SaetuneError
from saetune.kernels.dispatch import interpreting

TRITON_OK = (interpreting() or torch.cuda.is_available())
DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # relative to each tensor's largest entry


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    monkeypatch.setenv("SAETUNE_POISON", "1")  # outputs start as NaN: an unwritten element fails


def _close(a, b, dtype, what):
    a, b = a.float(), b.float()
    scale = b.abs().max().clamp_min(1.0)
    assert (a - b).abs().max() <= TOL[dtype] * scale, what


def _run(fn, h, W, b, t, temperature, upstream, seed):
    ps = [h, W] + ([b] if b is not None else [])
    ps = [p.detach().clone().requires_grad_() for p in ps]
    ent, lp = fn(ps[0], ps[1], t, ps[2] if b is not None else None, temperature)
    assert ent.dtype == torch.float32 and lp.dtype == torch.float32 and ent.shape == lp.shape == t.shape
    if upstream == "sum":  # an entropy bonus and a log-prob loss, both stride-0 upstream gradients
        loss = 0.3 * ent.sum() - lp.sum()
    else:
        g = torch.Generator().manual_seed(seed)
        loss = (ent * torch.randn(ent.shape, generator=g).to(DEV)).sum() + (lp * torch.randn(lp.shape, generator=g).to(DEV)).sum()
    loss.backward()
    return [ent.detach(), lp.detach()] + [p.grad for p in ps]


def _inputs(N, D, V, seed, dtype, ignore):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(DEV, dtype)
    W = (torch.randn(V, D, generator=g) / D ** 0.5 * 3).to(DEV, dtype)
    b = torch.randn(V, generator=g).to(DEV, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(DEV)
    if ignore and N > 1:
        t[::2] = -100
    return h, W, b, t


CASES = dict(N=st.integers(1, 9), D=st.integers(1, 37), V=st.integers(2, 300), seed=st.integers(0, 2**31),
             use_bias=st.booleans(), temperature=st.sampled_from([1.0, 0.6, 1.7]),
             upstream=st.sampled_from(["sum", "random"]), ignore=st.booleans())


@settings(max_examples=8, deadline=None, database=None, phases=NO_SHRINK)
@given(**CASES)
def test_chunked_torch_path_matches_explicit_logits(N, D, V, seed, use_bias, temperature, upstream, ignore):
    from saetune.kernels import entropy as E
    h, W, b, t = _inputs(N, D, V, seed, torch.float32, ignore)
    b = b if use_bias else None
    old = E.CHUNK_ELEMENTS
    E.CHUNK_ELEMENTS = 3 * V  # several chunks, the last one partial
    try:
        got = _run(E.linear_entropy_logprob_torch, h, W, b, t, temperature, upstream, seed)
    finally:
        E.CHUNK_ELEMENTS = old
    ref = _run(E.linear_entropy_logprob_naive, h, W, b, t, temperature, upstream, seed)
    for what, x, y in zip(["entropy", "logprob", "d_hidden", "d_weight", "d_bias"], got, ref):
        _close(x, y, torch.float32, what)
    assert (got[1][t == -100] == 0).all()


@pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
@settings(max_examples=6, deadline=None, database=None, phases=NO_SHRINK)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), **CASES)
def test_triton_path_matches_explicit_logits(dtype, N, D, V, seed, use_bias, temperature, upstream, ignore):
    pytest.importorskip("triton")
    import saetune.kernels as K
    from saetune.kernels.entropy import linear_entropy_logprob_naive
    h, W, b, t = _inputs(N, D, V, seed, dtype, ignore)
    b = b if use_bias else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAETUNE_KERNELS", "triton")
        got = _run(K.linear_entropy_logprob, h, W, b, t, temperature, upstream, seed)
    # the reference in fp32 on the same (bf16-valued) inputs: what the kernel should compute
    ref = _run(linear_entropy_logprob_naive, h.float(), W.float(), b.float() if b is not None else None, t,
               temperature, upstream, seed)
    for what, x, y in zip(["entropy", "logprob", "d_hidden", "d_weight", "d_bias"], got, ref):
        _close(x, y, dtype, what)
    assert (got[1][t == -100] == 0).all()


def test_entropy_equals_token_entropy_and_extremes():
    from saetune.kernels import linear_entropy_logprob
    from saetune.rl.entropy import token_entropy
    h = torch.tensor([[0.0, 0.0], [50.0, 0.0]], device=DEV)  # uniform row; a nearly one-hot row
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], device=DEV)
    ent, lp = linear_entropy_logprob(h, W, torch.tensor([0, 0], device=DEV))
    assert torch.allclose(ent, token_entropy(h @ W.t()), atol=1e-6)
    assert abs(ent[0].item() - torch.log(torch.tensor(3.0)).item()) < 1e-6 and 0 <= ent[1].item() < 1e-6
    assert abs(lp[1].item()) < 1e-6


def test_bad_arguments_name_the_problem():
    from saetune.kernels import linear_entropy_logprob
    h, W = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(SaetuneError, match="temperature"):
        linear_entropy_logprob(h, W, torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(SaetuneError, match="same D"):
        linear_entropy_logprob(h, torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(SaetuneError, match="targets"):
        linear_entropy_logprob(h, W, torch.zeros(4, dtype=torch.long))


@pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_vocab_splits_and_masked_vocabulary(monkeypatch):
    """Several row blocks and vocabulary splits; a split whose logits are all −inf (masked by the bias)."""
    pytest.importorskip("triton")
    import saetune.kernels as K
    from saetune.kernels.entropy import linear_entropy_logprob_naive
    monkeypatch.setenv("SAETUNE_KERNELS", "triton")
    h, W, b, t = _inputs(70, 24, 389, 3, torch.float32, ignore=True)
    got = _run(K.linear_entropy_logprob, h, W, b, t, 0.8, "random", 3)
    ref = _run(linear_entropy_logprob_naive, h, W, b, t, 0.8, "random", 3)
    for what, x, y in zip(["entropy", "logprob", "d_hidden", "d_weight", "d_bias"], got, ref):
        _close(x, y, torch.float32, what)
    b_masked = b.clone()
    b_masked[:260] = float("-inf")  # the first split (tiles of 128) sees only −inf logits
    t_ok = torch.where(t >= 260, t, torch.full_like(t, -100))
    with torch.no_grad():
        ent, lp = K.linear_entropy_logprob(h, W, t_ok, b_masked, 0.8)
        ent_r, lp_r = linear_entropy_logprob_naive(h, W, t_ok, b_masked, 0.8)
    assert torch.isfinite(ent).all() and torch.isfinite(lp).all()
    _close(ent, ent_r, torch.float32, "entropy (masked)")
    _close(lp, lp_r, torch.float32, "logprob (masked)")
