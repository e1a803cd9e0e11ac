"""The SAE ops' plain-torch references: the torch path of every op of ``dispatch`` but the entropy.

Each public op of ``saetune.kernels`` has two implementations with one signature, named after it:
``<op>_torch`` here and ``<op>_triton`` in a ``triton_*`` module; ``dispatch.<op>`` picks one::

    topk_autoencode   topk_autoencode_torch (TopKAutoencode)   triton_sparse.topk_autoencode_triton
    topk_encode       topk_encode_torch     (TopKEncode)       triton_sparse.topk_encode_triton
    sparse_decode     sparse_decode_torch   (SparseDecode)     triton_sparse.sparse_decode_triton
    topk_select       topk_select_torch                        triton_topk.topk_select_triton
    batch_topk        batch_topk_torch                         triton_topk.batch_topk_triton
    sae_update        sae_update_torch                         triton_optim.sae_update_triton

(and ``linear_entropy_logprob``: ``entropy.linear_entropy_logprob_torch``,
``triton_entropy.linear_entropy_logprob_triton``.)

This module never imports triton (nor ``dispatch``): it runs wherever torch does.

Shapes: B tokens, d = d_in, n = d_sae, k active latents per token.

Encoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")::

    pre  = x_in · W_enc + b_enc                 (B, n)      x_in = x − b_dec
    (v, i) = TopK_k(pre),  v ← ReLU(v)          (B, k), (B, k)

Only k of n pre-activations per token reach the loss, so the backward needs only them::

    ∂x_in[b]      = Σ_j g[b,j] · W_enc[:, i[b,j]]          (a gather of k columns)
    ∂W_enc[:, c]  = Σ_{(b,j): i[b,j]=c} g[b,j] · x_in[b]    (sparse Gᵀ · x_in)
    ∂b_enc[c]     = Σ_{(b,j): i[b,j]=c} g[b,j]

with g zeroed where ReLU clipped. The dense (B, n) gradient and its two GEMMs never exist.
The same pass can also select the AuxK latents (top ``k_aux`` pre-activations among dead
latents), whose gradient flows into the encoder through the same sparse rule.

Decoder as a gather::

    x̂[b] = Σ_j v[b,j] · W_dec[i[b,j]] (+ b_dec outside)
    ∂v[b,j] = ⟨g_out[b], W_dec[i[b,j]]⟩,   ∂W_dec[c] = Σ_{(b,j): i[b,j]=c} v[b,j] · g_out[b]
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


def _csr(values: Tensor, idx: Tensor, n: int) -> Tensor:
    """(B, n) CSR matrix with ``values[b, j]`` at column ``idx[b, j]`` (duplicates add)."""
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device, dtype=torch.int64)
    return torch.sparse_csr_tensor(crow, idx.reshape(-1).to(torch.int64), values.reshape(-1), size=(B, n))


def _csr_t(values: Tensor, idx: Tensor, n: int) -> Tensor:
    """Sᵀ as an (n, B) CSR matrix, built latent-major by one stable sort of the indices."""
    B, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    return torch.sparse_csr_tensor(crow, order // k, values.reshape(-1)[order], size=(n, B))


def _row_chunk(per_row: int, budget: int = 1 << 26) -> int:
    """Rows per chunk so that a (rows, per_row) temporary stays under ``budget`` elements."""
    return max(1, budget // max(per_row, 1))


def sparse_t_matmul(values: Tensor, idx: Tensor, n: int, dense: Tensor) -> Tensor:
    """Sᵀ · dense for the sparse (B, n) matrix S given by (values, idx): the (n, D) latent-major sum."""
    if dense.device.type == "cpu":
        return torch.sparse.mm(_csr_t(values.to(dense.dtype), idx, n), dense)
    B, k = idx.shape
    out = torch.zeros(n, dense.shape[1], device=dense.device, dtype=dense.dtype)
    step = _row_chunk(k * dense.shape[1])
    for s in range(0, B, step):
        rows = dense[s:s + step].repeat_interleave(k, dim=0) * values[s:s + step].reshape(-1, 1).to(dense.dtype)
        out.index_add_(0, idx[s:s + step].reshape(-1), rows)
    return out


def rows_dot(rows_of: Tensor, idx: Tensor, g: Tensor) -> Tensor:
    """out[b, j] = ⟨g[b], rows_of[idx[b, j]]⟩ → (B, k).

    On the CPU a sampled dense-dense product (SDDMM: g · rows_ofᵀ evaluated only at the (b, idx[b, j])
    positions) — 30× faster than gathering the (B, k, D) rows; elsewhere gathered in bounded chunks.
    """
    B, k = idx.shape
    if g.device.type == "cpu" and g.dtype == rows_of.dtype:
        mask = _csr(torch.zeros(B * k, dtype=g.dtype, device=g.device), idx, rows_of.shape[0])
        return torch.sparse.sampled_addmm(mask, g, rows_of.t(), beta=0.0).values().view(B, k)
    step = _row_chunk(k * rows_of.shape[1])
    outs = [torch.bmm(rows_of[idx[s:s + step]].to(g.dtype), g[s:s + step].unsqueeze(-1)).squeeze(-1)
            for s in range(0, B, step)]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def gather_rows_dot(rows_of: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
    """out[b] = Σ_j weights[b, j] · rows_of[idx[b, j]] → (B, D)."""
    return F.embedding_bag(idx, rows_of, per_sample_weights=weights.to(rows_of.dtype), mode="sum")


class TopKEncode(torch.autograd.Function):
    """(x_in, W_enc, b_enc) → (v, i, v_aux, i_aux) with the sparse backward described above."""

    @staticmethod
    def forward(ctx, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, aux_mask: Tensor | None, k_aux: int):
        pre = torch.addmm(b_enc.to(x_in.dtype), x_in, W_enc.to(x_in.dtype))  # (B, n)
        v, i = pre.topk(k, dim=-1, sorted=False)
        v = v.relu()
        if aux_mask is not None and k_aux > 0:
            pre.masked_fill_(~aux_mask, float("-inf"))
            va, ia = pre.topk(k_aux, dim=-1, sorted=False)
            va = torch.where(torch.isfinite(va), va.relu(), torch.zeros_like(va))
        else:
            va = v.new_zeros(v.shape[0], 0)
            ia = i.new_zeros(i.shape[0], 0)
        del pre
        ctx.save_for_backward(x_in, W_enc, i, v, ia, va)
        ctx.mark_non_differentiable(i, ia)
        ctx.n = W_enc.shape[1]
        return v, i, va, ia

    @staticmethod
    def backward(ctx, g_v: Tensor, g_i, g_va: Tensor, g_ia):
        x_in, W_enc, i, v, ia, va = ctx.saved_tensors
        n = ctx.n
        g = (g_v if g_v is not None else torch.zeros_like(v)) * (v > 0)
        if ia.shape[1] > 0 and g_va is not None:
            g = torch.cat([g, g_va * (va > 0)], dim=1)
            i = torch.cat([i, ia], dim=1)
        g = g.contiguous()
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = gather_rows_dot(W_enc.t().contiguous(), i, g).to(x_in.dtype)  # (B, d)
        if ctx.needs_input_grad[1]:
            dW = sparse_t_matmul(g.float(), i, n, x_in.float()).t().to(W_enc.dtype)  # (d, n)
        if ctx.needs_input_grad[2]:
            db = torch.zeros(n, device=g.device, dtype=torch.float32).index_add_(0, i.reshape(-1), g.reshape(-1).float())
        return dx, dW, db, None, None, None


class SparseDecode(torch.autograd.Function):
    """(v, i, W_dec) → Σ_j v[b,j] W_dec[i[b,j]], backward from the k active rows only."""

    @staticmethod
    def forward(ctx, v: Tensor, i: Tensor, W_dec: Tensor):
        ctx.save_for_backward(v, i, W_dec)
        return gather_rows_dot(W_dec, i, v)

    @staticmethod
    def backward(ctx, g_out: Tensor):
        v, i, W_dec = ctx.saved_tensors
        g_out = g_out.contiguous()  # a stride-0 gradient (from loss.sum()) must become real memory
        dv = dW = None
        if ctx.needs_input_grad[0]:
            dv = rows_dot(W_dec, i, g_out).to(v.dtype)
        if ctx.needs_input_grad[2]:
            dW = sparse_t_matmul(v.float(), i, W_dec.shape[0], g_out.float()).to(W_dec.dtype)
        return dv, None, dW


class TopKAutoencode(torch.autograd.Function):
    """The whole TopK SAE, (x, W_enc, b_enc, W_dec, b_dec) → (x̂, v, i), in one autograd node.

    Same maths as :class:`TopKEncode` followed by :class:`SparseDecode`, but the backward builds
    the latent-major order of ``i`` once and uses it for both weight gradients::

        ∂v = SDDMM(g_x̂, W_dec)[i] (+ upstream ∂v),  g = ∂v · 1[v > 0]
        ∂W_dec = S_vᵀ · g_x̂,   ∂W_enc = (S_gᵀ · x_in)ᵀ,   ∂b_enc = Σ g per latent
        ∂x_in = Σ_j g[b,j] W_enc[:, i[b,j]],   ∂x = ∂x_in,   ∂b_dec = Σ_b g_x̂ − Σ_b ∂x_in
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int):
        x_in = x - b_dec
        pre = torch.addmm(b_enc.to(x_in.dtype), x_in, W_enc.to(x_in.dtype))  # (B, n)
        v, i = pre.topk(k, dim=-1, sorted=False)
        del pre
        v = v.relu()
        x_hat = gather_rows_dot(W_dec, i, v) + b_dec
        ctx.save_for_backward(x_in, W_enc, W_dec, i, v)
        ctx.mark_non_differentiable(i)
        return x_hat, v, i

    @staticmethod
    def backward(ctx, g_out: Tensor, g_v: Tensor, g_i):
        x_in, W_enc, W_dec, i, v = ctx.saved_tensors
        n, (B, k) = W_enc.shape[1], i.shape
        g_out = (g_out if g_out is not None else torch.zeros_like(x_in)).contiguous()  # stride-0 safe
        dv = rows_dot(W_dec, i, g_out.to(W_dec.dtype)).to(v.dtype)
        if g_v is not None:
            dv = dv + g_v
        g = (dv * (v > 0)).contiguous()
        if x_in.device.type == "cpu":
            flat = i.reshape(-1)
            order = torch.argsort(flat, stable=True)
            crow = torch.zeros(n + 1, dtype=torch.int64)
            crow[1:] = torch.bincount(flat, minlength=n).cumsum(0)
            cols = order // k

            def st_mm(values: Tensor, dense: Tensor) -> Tensor:
                st = torch.sparse_csr_tensor(crow, cols, values.reshape(-1)[order].to(dense.dtype), size=(n, B))
                return torch.sparse.mm(st, dense)
        else:
            def st_mm(values: Tensor, dense: Tensor) -> Tensor:
                return sparse_t_matmul(values.to(dense.dtype), i, n, dense)
        dW_dec = st_mm(v.float(), g_out.float()).to(W_dec.dtype)
        dW_enc = st_mm(g.float(), x_in.float()).t().to(W_enc.dtype)
        db_enc = torch.zeros(n, device=g.device, dtype=torch.float32).index_add_(0, i.reshape(-1), g.reshape(-1).float())
        dx_in = gather_rows_dot(W_enc.t().contiguous(), i, g).to(x_in.dtype)
        db_dec = g_out.sum(0).to(x_in.dtype) - dx_in.sum(0)
        return dx_in, dW_enc, db_enc.to(W_enc.dtype), dW_dec, db_dec, None


# ---- the torch path of each op (dispatch calls these; same signatures as the *_triton ones) -----

def topk_autoencode_torch(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """x̂, v, i of a TopK SAE in one autograd node (see :class:`TopKAutoencode`)."""
    return TopKAutoencode.apply(x, W_enc, b_enc, W_dec, b_dec, k)


def topk_encode_torch(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, aux_mask: Tensor | None = None,
                      k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k encoder with sparse backward; optionally the AuxK selection among ``aux_mask`` latents."""
    if aux_mask is not None:
        k_aux = min(k_aux, int(aux_mask.sum()))
    return TopKEncode.apply(x_in, W_enc, b_enc, k, aux_mask, k_aux)


def sparse_decode_torch(v: Tensor, i: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j v[b,j] · W_dec[i[b,j]] → (B, d), without b_dec."""
    return SparseDecode.apply(v, i, W_dec)


def topk_select_torch(pre: Tensor, k: int, aux_mask: Tensor | None = None, k_aux: int = 0
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(v, i, v_aux, i_aux) as ``triton_topk.topk_select_triton``, with ``torch.topk`` (ties in any
    order; rows unsorted). ``pre`` (B, n); v, i (B, k); v_aux, i_aux (B, min(k_aux, n)), 0 where
    fewer latents are dead."""
    v, i = pre.topk(k, dim=-1, sorted=False)
    v = v.relu()
    if aux_mask is not None and k_aux > 0:
        masked = pre.masked_fill(~aux_mask, float("-inf"))
        va, ia = masked.topk(min(k_aux, pre.shape[1]), dim=-1, sorted=False)
        va = torch.where(torch.isfinite(va), va.relu(), torch.zeros_like(va))
    else:
        va, ia = v.new_zeros(v.shape[0], 0), i.new_zeros(i.shape[0], 0)
    return v, i, va, ia


def batch_topk_torch(pre: Tensor, k: int) -> Tensor:
    """BatchTopK (Bussmann et al. 2024): keep the k·B largest ReLU(pre) of the whole batch ``pre``
    [..., n] (B = its tokens, k·B capped at ``pre.numel()``), zero elsewhere; differentiable in ``pre``.

    Exactly k·B survive (a flat ``torch.topk``; which of equal values at the cut, torch decides),
    where ``triton_topk.batch_topk_triton`` keeps every value ≥ the threshold θ, ties included.
    ``SAE.batch_topk`` calls this."""
    flat = pre.relu().reshape(-1)
    n_tok = pre.numel() // pre.shape[-1]
    keep = min(k * n_tok, flat.numel())
    v, i = flat.topk(keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, i, v).reshape(pre.shape)


def batch_topk_threshold_torch(pre: Tensor, keep: int) -> Tensor:
    """θ = the ``keep``-th largest ReLU(pre) over the whole tensor: the reference of
    ``triton_topk.batch_topk_threshold_triton`` and its test oracle."""
    return pre.detach().float().relu().reshape(-1).topk(keep, sorted=False).values.min()


def sae_update_torch(opt, sae, renorm: bool) -> None:
    """Parallel-gradient removal, ``opt.step()``, unit-norm decoder rows: three sweeps over W_dec
    (the reference of ``triton_optim.sae_update_triton``)."""
    if renorm:
        sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    if renorm:
        sae.set_decoder_norm_to_unit_norm()


# ---- dense references (the definition the sparse ops must equal) ----------------------------

def topk_encode_dense(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> Tensor:
    """Dense reference: ReLU(TopK(x_in · W_enc + b_enc)) scattered into (B, n)."""
    pre = x_in @ W_enc + b_enc
    v, i = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())


def decode_dense(acts: Tensor, W_dec: Tensor) -> Tensor:
    return acts @ W_dec
