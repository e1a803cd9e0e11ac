"""kernels/topk_sae.py: the sparse TopK encoder / decoder ops against dense references.

Liger-style (STYLE.md): outputs and EVERY gradient (x_in, W_enc, b_enc, W_dec, values) are
compared with a dense autograd reference on odd shapes (batch 1, non-power-of-two widths, k not
dividing d_sae), for a `.sum()` upstream gradient (stride 0) and a random one, fp32 ≈ 1e-4.

torch.topk may order and break ties as it likes, so selections are compared as sets, and with
ties in the pre-activations the op's selection is first checked to be *a* valid top-k; the
gradients are then compared with the dense maths evaluated at that selection (which is the
dense reference itself wherever the selection is unambiguous).
"""

from __future__ import annotations

import os

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saetune.kernels.topk_sae import decode_dense, sparse_decode_torch, topk_encode_dense, topk_encode_torch

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-4


# ---- problem generation -------------------------------------------------------------------------

@st.composite
def shapes(draw, max_b: int = 13, max_d: int = 37, max_n: int = 97):
    B = draw(st.one_of(st.just(1), st.integers(1, max_b)))
    d = draw(st.integers(1, max_d))
    n = draw(st.integers(2, max_n))
    k = draw(st.integers(1, n - 1))
    return B, d, n, k


def make_problem(B: int, d: int, n: int, seed: int, quantised: bool):
    """fp32 (x_in, W_enc, b_enc, W_dec). Quantised values make many exact ties in the pre-activations."""
    g = torch.Generator().manual_seed(seed)
    if quantised:
        x = torch.randint(-2, 3, (B, d), generator=g) * 0.5
        W = torch.randint(-2, 3, (d, n), generator=g) * 0.25
        b = torch.randint(-2, 3, (n,), generator=g) * 0.25
    else:
        x = torch.randn(B, d, generator=g)
        W = torch.randn(d, n, generator=g) / d ** 0.5
        b = 0.3 * torch.randn(n, generator=g)
    W_dec = torch.randn(n, d, generator=g)
    return x.float(), W.float(), b.float(), W_dec.float()


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32 vs float64 reference, ≈1e-4 relative to the tensor's scale."""
    expected = expected.to(actual.dtype)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


def pre64(x, W, b):
    return x.detach().double() @ W.detach().double() + b.detach().double()


def check_valid_topk(pre: torch.Tensor, i: torch.Tensor, k: int, eps: float = 1e-5) -> None:
    """``i`` [B, k] holds k distinct latents per row whose pre-activations are a top-k of ``pre``."""
    B, n = pre.shape
    assert i.shape == (B, k) and i.dtype == torch.int64
    assert int(i.min()) >= 0 and int(i.max()) < n
    assert (i.sort(-1).values.diff(dim=-1) > 0).all(), "a latent is selected twice in one row"
    chosen = torch.zeros(B, n, dtype=torch.bool).scatter(1, i, True)
    sel_min = pre.masked_fill(~chosen, float("inf")).min(-1).values
    rest_max = pre.masked_fill(chosen, float("-inf")).max(-1).values
    assert (sel_min >= rest_max - eps).all(), "selection is not a top-k of the pre-activations"


def unambiguous_rows(pre: torch.Tensor, k: int, eps: float = 1e-5) -> torch.Tensor:
    """Rows whose top-k set (of positive values) does not depend on tie-breaking."""
    top = pre.topk(k + 1, dim=-1).values
    kth, nxt = top[:, k - 1], top[:, k]
    return ((kth - nxt) > eps) | (kth < -eps)


def dense_acts_at(x, W, b, i):
    """The dense maths at a given selection: ReLU(pre) at i, scattered into (B, n)."""
    pre = x @ W + b
    return torch.zeros_like(pre).scatter(1, i, pre.gather(1, i).relu())


def upstream(kind: str, shape, seed: int) -> torch.Tensor:
    if kind == "sum":
        return None  # loss = out.sum(): autograd passes an expanded (stride-0) gradient
    g = torch.randn(*reversed(shape), generator=torch.Generator().manual_seed(seed + 1))
    return g.t() if len(shape) == 2 else g  # random AND non-contiguous


def backprop(out: torch.Tensor, g: torch.Tensor | None) -> None:
    if g is None:
        out.sum().backward()
    else:
        out.backward(g)


# ---- topk_encode_torch -------------------------------------------------------------------------

@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**31 - 1), quantised=st.booleans(),
       grad=st.sampled_from(["sum", "random"]))
def test_topk_encode_matches_dense(shape, seed, quantised, grad):
    B, d, n, k = shape
    x0, W0, b0, _ = make_problem(B, d, n, seed, quantised)
    x, W, b = leaves(x0, W0, b0)
    v, i, va, ia = topk_encode_torch(x, W, b, k)
    assert v.shape == (B, k) and va.shape[1] == 0 and ia.shape[1] == 0
    pre = pre64(x0, W0, b0)
    check_valid_topk(pre, i, k)
    close(v, pre.gather(1, i).relu(), "values")
    assert (v >= 0).all()

    # forward vs topk_encode_dense where tie-breaking cannot matter
    ok = unambiguous_rows(pre, k)
    dense_ref = topk_encode_dense(x0.double(), W0.double(), b0.double(), k)
    ours = torch.zeros(B, n, dtype=torch.float64).scatter(1, i, v.detach().double())
    close(ours[ok].float(), dense_ref[ok], "dense acts (unambiguous rows)")

    # gradients: upstream on the dense (B, n) picture, so the arbitrary order of v does not matter
    G = upstream(grad, (B, n), seed)
    g_v = None if G is None else G.gather(1, i)
    backprop(v, g_v)

    xr, Wr, br = leaves(x0.double(), W0.double(), b0.double())
    if bool(ok.all()):  # the dense reference itself
        ref = topk_encode_dense(xr, Wr, br, k)
    else:  # the dense maths at the op's (valid) selection
        ref = dense_acts_at(xr, Wr, br, i)
    backprop(ref, None if G is None else G.double())
    close(x.grad, xr.grad, "dL/dx_in")
    close(W.grad, Wr.grad, "dL/dW_enc")
    close(b.grad, br.grad, "dL/db_enc")


def test_topk_encode_ties_whose_choice_does_not_matter():
    """Latents tied at a negative pre-activation fill the top-k: whichever the op picks, ReLU makes them 0."""
    B, d, n, k = 5, 7, 41, 9
    x0, W0, b0, Wd0 = make_problem(B, d, n, 3, quantised=False)
    W0[:, 6:] = 0.0
    b0[6:] = -1.0  # 35 latents tied at exactly −1 for every token
    b0[:6] = 5.0  # only 6 positive latents: 3 of the 9 slots go to tied ones
    for grad in ("sum", "random"):
        x, W, b, Wd = leaves(x0, W0, b0, Wd0)
        v, i, _, _ = topk_encode_torch(x, W, b, k)
        check_valid_topk(pre64(x0, W0, b0), i, k)
        assert ((i >= 6).sum(-1) == 3).all()
        out = sparse_decode_torch(v, i, Wd)
        G = upstream(grad, (B, d), 11)
        backprop(out, G)
        xr, Wr, br, Wdr = leaves(x0.double(), W0.double(), b0.double(), Wd0.double())
        ref = decode_dense(topk_encode_dense(xr, Wr, br, k), Wdr)
        close(out, ref.detach(), "reconstruction")
        backprop(ref, None if G is None else G.double())
        for name, a, r in (("x_in", x, xr), ("W_enc", W, Wr), ("b_enc", b, br), ("W_dec", Wd, Wdr)):
            close(a.grad, r.grad, f"d/d{name} ({grad})")


def test_topk_encode_tie_between_copies_at_the_boundary():
    """Two identical latents tied at ranks k and k+1: either choice gives the same output, and the pair
    together receives the dense reference's gradient."""
    B, d, n = 4, 6, 23
    x0, W0, b0, Wd0 = make_problem(B, d, n, 9, quantised=False)
    x0 = x0[:1].abs() * torch.tensor([[1.0], [0.5], [2.0], [3.0]])  # same ranking in every row
    W0 = W0.abs()  # every pre-activation positive
    b0.zero_()
    W0[:, 9] = W0[:, 8]
    Wd0[9] = Wd0[8]
    pre = pre64(x0, W0, b0)
    rank = int((pre[0] > pre[0, 8]).sum())  # latents strictly above the pair
    k = rank + 1  # the pair occupies ranks k and k+1: exactly one of them is selected
    x, W, b, Wd = leaves(x0, W0, b0, Wd0)
    v, i, _, _ = topk_encode_torch(x, W, b, k)
    check_valid_topk(pre, i, k)
    pair = (i == 8) | (i == 9)
    assert (pair.sum(-1) == 1).all()
    out = sparse_decode_torch(v, i, Wd)
    G = upstream("random", (B, d), 2)
    out.backward(G)
    xr, Wr, br, Wdr = leaves(x0.double(), W0.double(), b0.double(), Wd0.double())
    ref = decode_dense(topk_encode_dense(xr, Wr, br, k), Wdr)
    close(out, ref.detach(), "reconstruction with a copied latent")
    ref.backward(G.double())
    close(x.grad, xr.grad, "dL/dx_in")
    close(W.grad[:, 8] + W.grad[:, 9], Wr.grad[:, 8] + Wr.grad[:, 9], "copied encoder columns")
    close(b.grad[8] + b.grad[9], br.grad[8] + br.grad[9], "copied encoder biases")
    close(Wd.grad[8] + Wd.grad[9], Wdr.grad[8] + Wdr.grad[9], "copied decoder rows")
    other = [c for c in range(n) if c not in (8, 9)]
    close(W.grad[:, other], Wr.grad[:, other], "other encoder columns")
    close(Wd.grad[other], Wdr.grad[other], "other decoder rows")


def test_topk_encode_relu_clipped_get_no_gradient():
    B, d, n, k = 3, 5, 11, 4
    x0, W0, b0, _ = make_problem(B, d, n, 4, quantised=False)
    b0 -= 10.0  # every pre-activation negative: all selected values clip to 0
    x, W, b = leaves(x0, W0, b0)
    v, i, _, _ = topk_encode_torch(x, W, b, k)
    assert (v == 0).all()
    v.sum().backward()
    assert (x.grad == 0).all() and (W.grad == 0).all() and (b.grad == 0).all()


# ---- sparse_decode_torch ----------------------------------------------------------------------

@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**31 - 1), grad=st.sampled_from(["sum", "random"]),
       duplicates=st.booleans())
def test_sparse_decode_matches_dense(shape, seed, grad, duplicates):
    B, d, n, k = shape
    g = torch.Generator().manual_seed(seed)
    if duplicates:  # Σ_j v[b,j] W_dec[i[b,j]]: a repeated index adds (the AuxK backward relies on it)
        i = torch.randint(0, n, (B, k), generator=g)
    else:
        i = torch.rand(B, n, generator=g).argsort(-1)[:, :k]
    v0 = torch.randn(B, k, generator=g).relu()
    Wd0 = torch.randn(n, d, generator=g)
    v, Wd = leaves(v0, Wd0)
    out = sparse_decode_torch(v, i, Wd)
    assert out.shape == (B, d)
    vr, Wdr = leaves(v0.double(), Wd0.double())
    acts = torch.zeros(B, n, dtype=torch.float64).scatter_add(1, i, vr)
    ref = decode_dense(acts, Wdr)
    close(out, ref.detach(), "decode")
    G = upstream(grad, (B, d), seed)
    backprop(out, G)
    backprop(ref, None if G is None else G.double())
    close(v.grad, vr.grad, "dL/dvalues")
    close(Wd.grad, Wdr.grad, "dL/dW_dec")


@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**31 - 1), quantised=st.booleans(),
       grad=st.sampled_from(["sum", "random"]))
def test_encode_decode_chain_matches_dense(shape, seed, quantised, grad):
    """x̂ = sparse_decode_torch(topk_encode_torch(x_in)) vs decode_dense(topk_encode_dense(x_in)), all five grads."""
    B, d, n, k = shape
    x0, W0, b0, Wd0 = make_problem(B, d, n, seed, quantised)
    x, W, b, Wd = leaves(x0, W0, b0, Wd0)
    v, i, _, _ = topk_encode_torch(x, W, b, k)
    v.retain_grad()
    out = sparse_decode_torch(v, i, Wd)
    pre = pre64(x0, W0, b0)
    check_valid_topk(pre, i, k)
    G = upstream(grad, (B, d), seed)
    backprop(out, G)

    xr, Wr, br, Wdr = leaves(x0.double(), W0.double(), b0.double(), Wd0.double())
    ok = unambiguous_rows(pre, k)
    acts = topk_encode_dense(xr, Wr, br, k) if bool(ok.all()) else dense_acts_at(xr, Wr, br, i)
    acts.retain_grad()
    ref = decode_dense(acts, Wdr)
    close(out, ref.detach(), "reconstruction")
    backprop(ref, None if G is None else G.double())
    close(x.grad, xr.grad, "dL/dx_in")
    close(W.grad, Wr.grad, "dL/dW_enc")
    close(b.grad, br.grad, "dL/db_enc")
    close(Wd.grad, Wdr.grad, "dL/dW_dec")
    close(v.grad, acts.grad.gather(1, i), "dL/dvalues")


def test_stride_zero_gradient_explicitly():
    """An expanded ones gradient (what `.sum()` sends) equals a materialised one."""
    B, d, n, k = 7, 9, 31, 5
    x0, W0, b0, Wd0 = make_problem(B, d, n, 5, quantised=False)
    grads = []
    for g_out in (torch.ones(1, 1).expand(B, d), torch.ones(B, d), torch.ones(d, B).t()):
        x, W, b, Wd = leaves(x0, W0, b0, Wd0)
        v, i, _, _ = topk_encode_torch(x, W, b, k)
        sparse_decode_torch(v, i, Wd).backward(g_out)
        grads.append([t.grad.clone() for t in (x, W, b, Wd)])
    assert grads[0][0].abs().sum() > 0
    for other in grads[1:]:
        for a, c in zip(grads[0], other):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


# ---- AuxK --------------------------------------------------------------------------------------

@SETTINGS
@given(shape=shapes(max_n=61), seed=st.integers(0, 2**31 - 1), k_aux=st.integers(1, 40),
       dead_frac=st.floats(0.05, 0.9), grad=st.sampled_from(["sum", "random"]))
def test_auxk_selection_and_gradients(shape, seed, k_aux, dead_frac, grad):
    B, d, n, k = shape
    x0, W0, b0, Wd0 = make_problem(B, d, n, seed, quantised=False)
    gm = torch.Generator().manual_seed(seed + 7)
    dead = torch.rand(n, generator=gm) < dead_frac
    if not dead.any():
        dead[int(torch.randint(0, n, (1,), generator=gm))] = True
    x, W, b, Wd = leaves(x0, W0, b0, Wd0)
    v, i, va, ia = topk_encode_torch(x, W, b, k, aux_mask=dead, k_aux=k_aux)
    n_aux = min(k_aux, int(dead.sum()))
    assert va.shape == ia.shape == (B, n_aux)
    assert dead[ia].all(), "AuxK picked a latent outside the dead set"
    pre = pre64(x0, W0, b0)
    check_valid_topk(pre, i, k)
    # ia is a top-n_aux of the pre-activations restricted to the dead latents
    pre_dead = pre.masked_fill(~dead, float("-inf"))
    check_valid_topk(pre_dead, ia, n_aux)
    close(va, pre.gather(1, ia).relu(), "aux values")

    # main reconstruction + AuxK reconstruction of a target, both through the shared encoder
    x_hat = sparse_decode_torch(v, i, Wd)
    e_hat = sparse_decode_torch(va, ia, Wd)
    G1, G2 = upstream(grad, (B, d), seed), upstream(grad, (B, d), seed + 3)
    if G1 is None:
        (x_hat.sum() + 0.5 * e_hat.sum()).backward()
    else:
        ((x_hat * G1).sum() + 0.5 * (e_hat * G2).sum()).backward()

    xr, Wr, br, Wdr = leaves(x0.double(), W0.double(), b0.double(), Wd0.double())
    main = dense_acts_at(xr, Wr, br, i)
    aux = dense_acts_at(xr, Wr, br, ia)  # overlapping latents (dead but firing now) add up
    ref1, ref2 = decode_dense(main, Wdr), decode_dense(aux, Wdr)
    close(e_hat, ref2.detach(), "aux reconstruction")
    if G1 is None:
        (ref1.sum() + 0.5 * ref2.sum()).backward()
    else:
        ((ref1 * G1.double()).sum() + 0.5 * (ref2 * G2.double()).sum()).backward()
    close(x.grad, xr.grad, "dL/dx_in")
    close(W.grad, Wr.grad, "dL/dW_enc")
    close(b.grad, br.grad, "dL/db_enc")
    close(Wd.grad, Wdr.grad, "dL/dW_dec")


def test_auxk_trains_the_encoder_of_dead_latents():
    """sparsify's fused encoder drops this gradient; ours must not."""
    B, d, n, k = 16, 12, 50, 3
    x0, W0, b0, Wd0 = make_problem(B, d, n, 6, quantised=False)
    b0[:10] = 3.0  # 10 strong live latents take the top-k of every token
    dead = torch.zeros(n, dtype=torch.bool)
    dead[10:] = True
    x, W, b, Wd = leaves(x0, W0, b0, Wd0)
    v, i, va, ia = topk_encode_torch(x, W, b, k, aux_mask=dead, k_aux=6)
    assert (i < 10).all(), "setup: live latents should win the main top-k"
    assert dead[ia].all() and (va > 0).any()
    target = torch.randn(B, d, generator=torch.Generator().manual_seed(0))
    auxk = (sparse_decode_torch(va, ia, Wd) - target).pow(2).sum()
    auxk.backward()
    fired_aux = torch.unique(ia[va > 0])
    col_norm = W.grad.norm(dim=0)
    assert (col_norm[fired_aux] > 0).all(), "AuxK gave no gradient to the encoder columns of dead latents"
    assert (b.grad[fired_aux] != 0).all()
    assert (col_norm[:10] == 0).all()  # the aux loss touches only the aux latents
    assert (Wd.grad[fired_aux].norm(dim=1) > 0).all()
    # and it equals the dense maths at that selection
    xr, Wr, br, Wdr = leaves(x0.double(), W0.double(), b0.double(), Wd0.double())
    (decode_dense(dense_acts_at(xr, Wr, br, ia), Wdr) - target.double()).pow(2).sum().backward()
    close(W.grad, Wr.grad, "dAuxK/dW_enc")
    close(b.grad, br.grad, "dAuxK/db_enc")
    close(x.grad, xr.grad, "dAuxK/dx_in")


def test_auxk_edge_cases():
    B, d, n, k = 4, 6, 20, 3
    x0, W0, b0, _ = make_problem(B, d, n, 7, quantised=False)
    none = torch.zeros(n, dtype=torch.bool)
    v, i, va, ia = topk_encode_torch(x0, W0, b0, k, aux_mask=none, k_aux=5)
    assert va.shape == ia.shape == (B, 0)
    two = none.clone()
    two[[4, 17]] = True
    v, i, va, ia = topk_encode_torch(x0, W0, b0, k, aux_mask=two, k_aux=5)  # k_aux > number dead: clamp
    assert ia.shape == (B, 2)
    assert (ia.sort(-1).values == torch.tensor([4, 17])).all()
    # the main selection is unaffected by the mask
    v2, i2, _, _ = topk_encode_torch(x0, W0, b0, k)
    assert torch.equal(i.sort(-1).values, i2.sort(-1).values)
    torch.testing.assert_close(v.sort(-1).values, v2.sort(-1).values)


@pytest.mark.parametrize("B,d,n,k", [(1, 1, 2, 1), (1, 3, 5, 4), (2, 129, 257, 31)])
def test_extreme_shapes(B, d, n, k):
    x0, W0, b0, Wd0 = make_problem(B, d, n, 8, quantised=False)
    x, W, b, Wd = leaves(x0, W0, b0, Wd0)
    v, i, _, _ = topk_encode_torch(x, W, b, k)
    out = sparse_decode_torch(v, i, Wd)
    out.sum().backward()
    xr, Wr, br, Wdr = leaves(x0.double(), W0.double(), b0.double(), Wd0.double())
    ok = unambiguous_rows(pre64(x0, W0, b0), k)
    assert bool(ok.all())
    ref = decode_dense(topk_encode_dense(xr, Wr, br, k), Wdr)
    ref.sum().backward()
    close(out, ref.detach(), "reconstruction")
    for name, a, r in (("x_in", x, xr), ("W_enc", W, Wr), ("b_enc", b, br), ("W_dec", Wd, Wdr)):
        close(a.grad, r.grad, f"d/d{name}")
