"""The one-node TopK SAE (``topk_autoencode_torch``) equals encode + decode and the dense definition."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saetune.kernels.topk_sae import decode_dense, sparse_decode_torch, topk_autoencode_torch, topk_encode_torch


def _params(B, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g), torch.randn(d, n, generator=g), torch.randn(n, generator=g),
            torch.randn(n, d, generator=g), torch.randn(d, generator=g)]


@settings(max_examples=25, deadline=None, database=None)
@given(B=st.integers(1, 9), d=st.integers(1, 11), n=st.integers(2, 47), seed=st.integers(0, 10**6),
       upstream=st.sampled_from(["sum", "random"]), use_v=st.booleans(), data=st.data())
def test_fused_equals_dense_reference(B, d, n, seed, upstream, use_v, data):
    k = data.draw(st.integers(1, n - 1))
    ps = _params(B, d, n, seed)
    a = [p.clone().requires_grad_() for p in ps]
    r = [p.clone().requires_grad_() for p in ps]
    x_hat, v, i = topk_autoencode_torch(*a, k)
    # dense reference at the same selection: x̂ = (mask ⊙ ReLU(pre)) W_dec + b_dec
    pre = (r[0] - r[4]) @ r[1] + r[2]
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, i, True)
    acts = torch.where(mask, pre.relu(), torch.zeros_like(pre))
    ref = decode_dense(acts, r[3]) + r[4]
    assert torch.allclose(x_hat, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn(B, d, generator=torch.Generator().manual_seed(seed + 1))
    loss = x_hat.sum() if upstream == "sum" else (x_hat * g).sum()
    loss_ref = ref.sum() if upstream == "sum" else (ref * g).sum()
    if use_v:  # an upstream gradient on the values too
        loss = loss + 0.5 * v.sum()
        loss_ref = loss_ref + 0.5 * acts.sum()
    loss.backward()
    loss_ref.backward()
    for name, p, q in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], a, r):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name


def test_fused_equals_two_node_path():
    ps = _params(64, 16, 200, 0)
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    x_hat, v, i = topk_autoencode_torch(*a, 7)
    v2, i2, _, _ = topk_encode_torch(b[0] - b[4], b[1], b[2], 7)
    x_hat2 = sparse_decode_torch(v2, i2, b[3]) + b[4]
    assert torch.equal(i, i2) and torch.allclose(x_hat, x_hat2)
    (x_hat ** 2).sum().backward()
    (x_hat2 ** 2).sum().backward()
    for p, q in zip(a, b):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-5)


def test_indices_are_not_differentiable():
    x_hat, v, i = topk_autoencode_torch(*[p.requires_grad_() for p in _params(4, 3, 10, 1)], 2)
    assert not i.requires_grad and v.requires_grad and x_hat.requires_grad
    with pytest.raises(RuntimeError):
        i.float().sum().backward()
