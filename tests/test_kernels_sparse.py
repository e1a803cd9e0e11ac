"""Triton TopK SAE (gather decoder, latent-major sparse backward) vs the dense definition and the torch
ops: outputs and every gradient, `.sum()` (stride-0) and random upstream gradients, in the interpreter."""

from kernel_env import DEV, FAST, NO_SHRINK, needs_triton  # noqa: I001  (first: switches the interpreter on)

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

pytestmark = needs_triton
NAMES = ["x", "W_enc", "b_enc", "W_dec", "b_dec"]


@pytest.fixture(autouse=True)
def _triton_poisoned(monkeypatch):
    monkeypatch.setenv("SAETUNE_KERNELS", "triton")
    monkeypatch.setenv("SAETUNE_POISON", "1")  # outputs start as NaN / -7: an unwritten element fails


def _params(B, d, n, seed, ties):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(B, d, generator=g), torch.randn(d, n, generator=g), torch.randn(n, generator=g),
          torch.randn(n, d, generator=g), torch.randn(d, generator=g)]
    if ties and n > 2:  # duplicate encoder columns: exactly equal pre-activations in every row
        ps[1][:, 1] = ps[1][:, 0]
        ps[2][1] = ps[2][0]
        ps[1][:, n - 1] = ps[1][:, 0]
        ps[2][n - 1] = ps[2][0]
    return [p.to(DEV) for p in ps]


def _dense_reference(r, i):
    """x̂ = (mask ⊙ ReLU(pre)) · W_dec + b_dec at the given selection i; acts for the v-gradient."""
    pre = (r[0] - r[4]) @ r[1] + r[2]
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, i, True)
    acts = torch.where(mask, pre.relu(), torch.zeros_like(pre))
    return acts @ r[3] + r[4], acts


@FAST
@given(B=st.integers(1, 5), d=st.integers(1, 13), n=st.integers(2, 29), seed=st.integers(0, 2**31),
       upstream=st.sampled_from(["sum", "random"]), use_v=st.booleans(), ties=st.booleans(), data=st.data())
def test_topk_autoencode_matches_dense_reference(B, d, n, seed, upstream, use_v, ties, data):
    from saetune.kernels import topk_autoencode
    k = data.draw(st.integers(1, n - 1))
    ps = _params(B, d, n, seed, ties)
    a = [p.clone().requires_grad_() for p in ps]
    r = [p.clone().requires_grad_() for p in ps]
    x_hat, v, i = topk_autoencode(*a, k)
    ref, acts = _dense_reference(r, i)
    assert torch.allclose(x_hat, ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(v, acts.gather(1, i), atol=1e-5, rtol=1e-5)
    ref_vals = ((r[0] - r[4]) @ r[1] + r[2]).detach().topk(k, dim=-1).values  # a true top-k (ties: any order)
    assert torch.allclose(((a[0] - a[4]) @ a[1] + a[2]).detach().gather(1, i).sort(-1).values,
                          ref_vals.sort(-1).values, atol=1e-6)
    g = torch.randn(B, d, generator=torch.Generator().manual_seed(seed + 1)).to(DEV)
    loss = x_hat.sum() if upstream == "sum" else (x_hat * g).sum()
    loss_ref = ref.sum() if upstream == "sum" else (ref * g).sum()
    if use_v:  # an upstream gradient on the values too (stride 0 from .sum())
        loss = loss + 0.5 * v.sum()
        loss_ref = loss_ref + 0.5 * acts.sum()
    loss.backward()
    loss_ref.backward()
    for name, p, q in zip(NAMES, a, r):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name


@settings(max_examples=4, deadline=None, database=None, phases=NO_SHRINK)
@given(B=st.integers(1, 4), d=st.integers(1, 9), n=st.integers(3, 23), seed=st.integers(0, 2**31),
       upstream=st.sampled_from(["sum", "random"]), data=st.data())
def test_encode_decode_with_auxk_matches_torch_ops(B, d, n, seed, upstream, data):
    """Two-node path (AuxK): Triton encode + decode vs the torch ops, given the same selection."""
    from saetune.kernels import sparse_decode, topk_encode
    from saetune.kernels.topk_sae import SparseDecode, TopKEncode
    k = data.draw(st.integers(1, n - 1))
    dead = torch.rand(n, generator=torch.Generator().manual_seed(seed)).lt(0.5).to(DEV)
    k_aux = data.draw(st.integers(1, max(1, int(dead.sum()))))
    ps = _params(B, d, n, seed, ties=False)[:4]
    a = [p.clone().requires_grad_() for p in ps]
    r = [p.clone().requires_grad_() for p in ps]
    v, i, va, ia = topk_encode(a[0], a[1], a[2], k, dead, k_aux)
    out = sparse_decode(v, i, a[3]) + 0.5 * sparse_decode(va, ia, a[3])
    rv, ri, rva, ria = TopKEncode.apply(r[0], r[1], r[2], k, dead, k_aux)
    assert torch.equal(ri.sort(-1).values, i) and torch.equal(rva.sort(-1).values, va.sort(-1).values)
    # the reference at the Triton selection: gather values in the Triton order
    pre = r[0] @ r[1] + r[2]
    rv2 = pre.gather(1, i).relu()
    rva2 = torch.where(dead[ia], pre.gather(1, ia).relu(), torch.zeros_like(va))
    ref = SparseDecode.apply(rv2, i, r[3]) + 0.5 * SparseDecode.apply(rva2, ia, r[3])
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn(B, d, generator=torch.Generator().manual_seed(seed + 2)).to(DEV)
    (out.sum() if upstream == "sum" else (out * g).sum()).backward()
    (ref.sum() if upstream == "sum" else (ref * g).sum()).backward()
    for name, p, q in zip(NAMES[:4], a, r):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name


def test_bf16_autocast_step_matches_dense_reference():
    from saetune.kernels import topk_autoencode
    ps = _params(4, 10, 27, 3, ties=False)
    a = [p.clone().requires_grad_() for p in ps]
    r = [p.clone().requires_grad_() for p in ps]
    with torch.autocast(DEV, dtype=torch.bfloat16):
        x_hat, v, i = topk_autoencode(*a, 5)
    assert v.dtype == torch.bfloat16
    ref, _ = _dense_reference(r, i)
    assert torch.allclose(x_hat, ref, atol=5e-2, rtol=2e-2)
    x_hat.float().pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for name, p, q in zip(NAMES, a, r):  # bf16 pre-activations: relative to the gradient's scale
        assert (p.grad - q.grad).abs().max() <= 2e-2 * q.grad.abs().max(), name


def test_ops_have_the_torch_signatures():
    """gather_rows_dot, rows_dot and sparse_t_matmul equal their torch twins on the same arguments."""
    from saetune.kernels import topk_sae as ref
    from saetune.kernels import triton_sparse as tri
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(19, 7, generator=g).to(DEV)
    idx = torch.randint(0, 19, (5, 3), generator=g).to(DEV)
    w = torch.randn(5, 3, generator=g).to(DEV)
    dense = torch.randn(5, 7, generator=g).to(DEV)
    assert torch.allclose(tri.gather_rows_dot(rows, idx, w), ref.gather_rows_dot(rows, idx, w), atol=1e-5)
    assert torch.allclose(tri.rows_dot(rows, idx, dense), ref.rows_dot(rows, idx, dense), atol=1e-5)
    assert torch.allclose(tri.sparse_t_matmul(w, idx, 19, dense), ref.sparse_t_matmul(w, idx, 19, dense), atol=1e-5)
    # a broadcast (stride-0) dense operand is read as such
    ones = torch.ones((), device=DEV).expand(5, 7)
    assert torch.allclose(tri.sparse_t_matmul(w, idx, 19, ones), ref.sparse_t_matmul(w, idx, 19, ones.contiguous()),
                          atol=1e-5)
