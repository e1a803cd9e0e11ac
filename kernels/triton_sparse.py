"""Sparse TopK-SAE decoder and backward in Triton, and the autograd Functions built on them.

Shapes: B tokens, d = d_in, n = d_sae, k active latents per token; ``i`` (B, k) int64 latent
indices, ``v`` (B, k) their values. Same maths (and same signatures) as the plain-torch ops of
``topk_sae.py``, which are the reference:

    gather_rows_dot(R, i, w)[b]  = Σ_j w[b,j] · R[i[b,j]]                 decoder forward, ∂x_in
    rows_dot(R, i, g)[b, j]      = ⟨g[b], R[i[b,j]]⟩                      ∂v from ∂x̂
    sparse_t_matmul(w, i, n, X)[c] = Σ_{(b,j): i[b,j]=c} w[b,j] · X[b]     ∂W_dec, ∂W_encᵀ

The last one is latent-major: one program per (latent, column tile) walks that latent's entries
in an order made by one stable sort of ``i`` (CSR row pointers by ``searchsorted``, so no host
sync), accumulates in fp32 and writes every output row once — no atomics, no ``index_add_``, no
dense B × n tensor. Every kernel takes its operands' strides, so a stride-0 upstream gradient
(``loss.sum()`` expands a scalar) is read as the broadcast it is, without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import empty, next_pow2
from .triton_topk import topk_select_triton


@triton.jit
def _gather_kernel(rows_ptr, s_r0, s_r1, idx_ptr, w_ptr, s_w0, s_w1, out_ptr, k, D,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, cols] = Σ_j w[b, j] · rows[idx[b, j], cols]."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, k, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        jm = js < k
        idx = tl.load(idx_ptr + b * k + js, mask=jm, other=0)
        w = tl.load(w_ptr + b * s_w0 + js * s_w1, mask=jm, other=0.0).to(tl.float32)
        r = tl.load(rows_ptr + idx[:, None] * s_r0 + cols[None, :] * s_r1, mask=jm[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * r, axis=0)
    tl.store(out_ptr + b * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _rows_dot_kernel(g_ptr, s_g0, s_g1, rows_ptr, s_r0, idx_ptr, add_ptr, s_a0, s_a1, v_ptr, out_ptr, k, D,
                     HAS_ADD: tl.constexpr, RELU_MASK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, j] = (⟨g[b], rows[idx[b, j]]⟩ + add[b, j]) · (1[v[b, j] > 0] if RELU_MASK)."""
    b = tl.program_id(0).to(tl.int64)
    for j0 in range(0, k, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        jm = js < k
        idx = tl.load(idx_ptr + b * k + js, mask=jm, other=0)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            cm = cols < D
            g = tl.load(g_ptr + b * s_g0 + cols * s_g1, mask=cm, other=0.0).to(tl.float32)
            r = tl.load(rows_ptr + idx[:, None] * s_r0 + cols[None, :], mask=jm[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(r * g[None, :], axis=1)
        if HAS_ADD:
            acc += tl.load(add_ptr + b * s_a0 + js * s_a1, mask=jm, other=0.0).to(tl.float32)
        if RELU_MASK:
            v = tl.load(v_ptr + b * k + js, mask=jm, other=0.0)
            acc = tl.where(v > 0, acc, 0.0)
        tl.store(out_ptr + b * k + js, acc.to(out_ptr.dtype.element_ty), mask=jm)


@triton.jit
def _latent_major_kernel(order_ptr, crow_ptr, k, D,
                         wa_ptr, xa_ptr, s_a0, s_a1, outa_ptr,
                         wb_ptr, xb_ptr, s_b0, s_b1, outb_ptr, bias_ptr,
                         HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """For latent c = program 0 and a column tile: outa[c] = Σ wa[e]·xa[row(e)], outb[c] likewise,
    bias[c] = Σ wb[e], over the entries e of latent c (flat positions order[crow[c]:crow[c+1]])."""
    c = tl.program_id(0).to(tl.int64)
    ct = tl.program_id(1)
    cols = ct * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    start = tl.load(crow_ptr + c)
    end = tl.load(crow_ptr + c + 1)
    acc_a = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        em = es < end
        pos = tl.load(order_ptr + es, mask=em, other=0)
        row = pos // k
        m2 = em[:, None] & cm[None, :]
        if HAS_A:
            wa = tl.load(wa_ptr + pos, mask=em, other=0.0).to(tl.float32)
            xa = tl.load(xa_ptr + row[:, None] * s_a0 + cols[None, :] * s_a1, mask=m2, other=0.0).to(tl.float32)
            acc_a += tl.sum(wa[:, None] * xa, axis=0)
        if HAS_B:
            wb = tl.load(wb_ptr + pos, mask=em, other=0.0).to(tl.float32)
            xb = tl.load(xb_ptr + row[:, None] * s_b0 + cols[None, :] * s_b1, mask=m2, other=0.0).to(tl.float32)
            acc_b += tl.sum(wb[:, None] * xb, axis=0)
            if HAS_BIAS:
                acc_bias += wb
    if HAS_A:
        tl.store(outa_ptr + c * D + cols, acc_a.to(outa_ptr.dtype.element_ty), mask=cm)
    if HAS_B:
        tl.store(outb_ptr + c * D + cols, acc_b.to(outb_ptr.dtype.element_ty), mask=cm)
        if HAS_BIAS:
            if ct == 0:
                tl.store(bias_ptr + c, tl.sum(acc_bias, axis=0).to(bias_ptr.dtype.element_ty))


def _check_idx(idx: Tensor) -> None:
    if idx.dtype != torch.int64 or not idx.is_contiguous():
        raise ValueError(f"latent indices must be a contiguous int64 (B, k) tensor, got {idx.dtype} with strides "
                         f"{tuple(idx.stride())}; the usual cause is a transposed or sliced index tensor")


def _blocks(k: int, D: int) -> tuple[int, int]:
    bk = min(64, next_pow2(max(k, 1)))
    bd = min(next_pow2(max(D, 1)), max(16, 4096 // bk))
    return bk, bd


def gather_rows_dot(rows_of: Tensor, idx: Tensor, weights: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """out[b] = Σ_j weights[b, j] · rows_of[idx[b, j]] → (B, D), accumulated in fp32."""
    _check_idx(idx)
    B, k = idx.shape
    D = rows_of.shape[1]
    out = empty((B, D), out_dtype or rows_of.dtype, rows_of.device)
    bk, bd = _blocks(k, D)
    if B and D:
        _gather_kernel[(B, triton.cdiv(D, bd))](rows_of, rows_of.stride(0), rows_of.stride(1), idx, weights,
                                               weights.stride(0), weights.stride(1), out, k, D,
                                               BLOCK_K=bk, BLOCK_D=bd)
    return out


def rows_dot(rows_of: Tensor, idx: Tensor, g: Tensor, add: Tensor | None = None, relu_of: Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> Tensor:
    """out[b, j] = ⟨g[b], rows_of[idx[b, j]]⟩ (+ add[b, j]) (· 1[relu_of[b, j] > 0]) → (B, k)."""
    _check_idx(idx)
    if rows_of.stride(1) != 1:
        raise ValueError("rows_dot needs rows_of with unit column stride; pass rows_of.contiguous()")
    B, k = idx.shape
    D = rows_of.shape[1]
    out = empty((B, k), out_dtype or g.dtype, g.device)
    bk, bd = _blocks(k, D)
    has_add = add is not None
    has_relu = relu_of is not None
    if has_relu and not relu_of.is_contiguous():
        relu_of = relu_of.contiguous()
    if B and k:
        _rows_dot_kernel[(B,)](g, g.stride(0), g.stride(1), rows_of, rows_of.stride(0), idx,
                               add if has_add else out, *(add.stride() if has_add else (0, 0)),
                               relu_of if has_relu else out, out, k, D,
                               HAS_ADD=has_add, RELU_MASK=has_relu, BLOCK_K=bk, BLOCK_D=bd)
    return out


def latent_order(idx: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(order, crow): flat positions of ``idx`` sorted by latent (stable), and CSR row pointers (n + 1)."""
    flat = idx.reshape(-1)
    lat, order = torch.sort(flat, stable=True)
    crow = torch.searchsorted(lat, torch.arange(n + 1, device=idx.device, dtype=lat.dtype))
    return order, crow


def latent_major(order: Tensor, crow: Tensor, k: int, n: int,
                 a: tuple[Tensor, Tensor, torch.dtype] | None = None,
                 b: tuple[Tensor, Tensor, torch.dtype] | None = None,
                 bias_dtype: torch.dtype | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Latent-major sums Σ_{(r,j): idx=c} w[r,j] · X[r] for up to two (w, X, out dtype) pairs sharing one
    order, and Σ w_b per latent when ``bias_dtype`` is given. Weights must be contiguous (B, k)."""
    ref = (a or b)[1]
    D = ref.shape[1]
    outs = [empty((n, D), t[2], ref.device) if t is not None else None for t in (a, b)]
    bias = empty((n,), bias_dtype, ref.device) if bias_dtype is not None else None
    dummy = order
    args = []
    for t, out in zip((a, b), outs):
        if t is None:
            args += [dummy, dummy, 0, 0, dummy]
        else:
            w, x, _ = t
            args += [w.contiguous(), x, x.stride(0), x.stride(1), out]
    be = 32
    bd = min(next_pow2(max(D, 1)), 128)
    if n and D:
        _latent_major_kernel[(n, triton.cdiv(D, bd))](order, crow, k, D, *args, bias if bias is not None else dummy,
                                                      HAS_A=a is not None, HAS_B=b is not None,
                                                      HAS_BIAS=bias is not None, BLOCK_E=be, BLOCK_D=bd)
    return outs[0], outs[1], bias


def sparse_t_matmul(values: Tensor, idx: Tensor, n: int, dense: Tensor) -> Tensor:
    """Sᵀ · dense for the sparse (B, n) matrix S given by (values, idx) → (n, D), dense's dtype."""
    order, crow = latent_order(idx, n)
    out, _, _ = latent_major(order, crow, idx.shape[1], n, a=(values, dense, dense.dtype))
    return out


# ---- autograd Functions: same contract as topk_sae.TopKAutoencode / TopKEncode / SparseDecode ---

class TopKAutoencodeTriton(torch.autograd.Function):
    """(x, W_enc, b_enc, W_dec, b_dec, k) → (x̂, v, i); see ``topk_sae.TopKAutoencode`` for the maths."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int):
        x_in = x - b_dec
        pre = torch.addmm(b_enc.to(x_in.dtype), x_in, W_enc.to(x_in.dtype))  # (B, n), autocast picks the dtype
        v, i, _, _ = topk_select_triton(pre, k)
        del pre
        x_hat = gather_rows_dot(W_dec, i, v, out_dtype=torch.promote_types(W_dec.dtype, b_dec.dtype)) + b_dec
        ctx.save_for_backward(x_in, W_enc, W_dec, i, v)
        ctx.mark_non_differentiable(i)
        return x_hat, v, i

    @staticmethod
    def backward(ctx, g_out: Tensor, g_v: Tensor, g_i):
        x_in, W_enc, W_dec, i, v = ctx.saved_tensors
        n, k = W_enc.shape[1], i.shape[1]
        if g_out is None:
            g_out = torch.zeros_like(x_in)
        g = rows_dot(W_dec, i, g_out, add=g_v, relu_of=v, out_dtype=torch.float32)  # (B, k) = ∂v · 1[v > 0]
        dW_enc = db_enc = dW_dec = None
        need = ctx.needs_input_grad
        if need[1] or need[2] or need[3]:  # a frozen SAE (only ∂x wanted) skips the latent-major pass
            order, crow = latent_order(i, n)
            dW_dec, dW_enc_t, db_enc = latent_major(order, crow, k, n, a=(v, g_out, W_dec.dtype),
                                                    b=(g, x_in, W_enc.dtype), bias_dtype=W_enc.dtype)
            dW_enc = dW_enc_t.t()
        dx_in = gather_rows_dot(W_enc.t().contiguous(), i, g, out_dtype=x_in.dtype)  # (B, d)
        db_dec = g_out.sum(0).to(x_in.dtype) - dx_in.sum(0)
        return dx_in, dW_enc, db_enc, dW_dec, db_dec, None


class TopKEncodeTriton(torch.autograd.Function):
    """(x_in, W_enc, b_enc, k, aux_mask, k_aux) → (v, i, v_aux, i_aux); see ``topk_sae.TopKEncode``."""

    @staticmethod
    def forward(ctx, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, aux_mask: Tensor | None, k_aux: int):
        pre = torch.addmm(b_enc.to(x_in.dtype), x_in, W_enc.to(x_in.dtype))  # (B, n)
        v, i, va, ia = topk_select_triton(pre, k, aux_mask, k_aux)
        del pre
        ctx.save_for_backward(x_in, W_enc, i, v, ia, va)
        ctx.mark_non_differentiable(i, ia)
        return v, i, va, ia

    @staticmethod
    def backward(ctx, g_v: Tensor, g_i, g_va: Tensor, g_ia):
        x_in, W_enc, i, v, ia, va = ctx.saved_tensors
        n = W_enc.shape[1]
        g = (g_v if g_v is not None else torch.zeros_like(v)).float() * (v > 0)
        if ia.shape[1] > 0 and g_va is not None:
            g = torch.cat([g, g_va.float() * (va > 0)], dim=1)
            i = torch.cat([i, ia], dim=1)
        g = g.contiguous()
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = gather_rows_dot(W_enc.t().contiguous(), i, g, out_dtype=x_in.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            order, crow = latent_order(i, n)
            _, dW_t, db = latent_major(order, crow, i.shape[1], n, b=(g, x_in, W_enc.dtype), bias_dtype=W_enc.dtype)
            dW = dW_t.t()
        return dx, dW, db, None, None, None


class SparseDecodeTriton(torch.autograd.Function):
    """(v, i, W_dec) → Σ_j v[b,j] W_dec[i[b,j]]; see ``topk_sae.SparseDecode``."""

    @staticmethod
    def forward(ctx, v: Tensor, i: Tensor, W_dec: Tensor):
        ctx.save_for_backward(v, i, W_dec)
        return gather_rows_dot(W_dec, i, v)

    @staticmethod
    def backward(ctx, g_out: Tensor):
        v, i, W_dec = ctx.saved_tensors
        dv = dW = None
        if ctx.needs_input_grad[0]:
            dv = rows_dot(W_dec, i, g_out, out_dtype=v.dtype)
        if ctx.needs_input_grad[2]:
            order, crow = latent_order(i, W_dec.shape[0])
            dW, _, _ = latent_major(order, crow, i.shape[1], W_dec.shape[0], a=(v, g_out, W_dec.dtype))
        return dv, None, dW


# ---- the Triton path of each op (dispatch calls these; same signatures as topk_sae's *_torch) ----

def topk_autoencode_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """x̂, v, i of a TopK SAE in one autograd node (see :class:`TopKAutoencodeTriton`)."""
    return TopKAutoencodeTriton.apply(x, W_enc, b_enc, W_dec, b_dec, k)


def topk_encode_triton(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, aux_mask: Tensor | None = None,
                       k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k encoder with sparse backward; optionally the AuxK selection among ``aux_mask`` latents."""
    return TopKEncodeTriton.apply(x_in, W_enc, b_enc, k, aux_mask, k_aux)


def sparse_decode_triton(v: Tensor, i: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j v[b,j] · W_dec[i[b,j]] → (B, d), without b_dec."""
    return SparseDecodeTriton.apply(v, i, W_dec)
