"""Top-k selection over SAE pre-activations by a per-row radix select (no sort, no ``torch.topk``).

Shapes: ``pre`` (B, n) pre-activations, k active latents per row.

Each float is mapped to an unsigned 32-bit key with the same order (sign-magnitude → offset
binary), then the k-th largest key T of a row is found digit by digit, ``RADIX_BITS`` bits a
pass, from the top: with the prefix P of digits known so far and the count of keys above it,
one histogram of the next digit of the keys that share P gives, for every digit d, the count of
keys ≥ P + d·2^s; keep the largest d whose count is still ≥ k. After 32 / RADIX_BITS passes T
is exact, and so is #{key > T}; one more pass writes the keys > T and, in index order, the first
(k − #{key > T}) keys equal to T. So

    i[b] = the k latents of row b with the largest pre (ties: lowest latent index first),
           in ascending latent order;   v[b] = ReLU(pre[b, i[b]])

The row is read from memory (or L2) once a pass and nothing of size B × n is written. The AuxK
selection (top ``k_aux`` pre-activations among the dead latents, Gao et al. 2024) runs in the same
program on the same row, with non-dead latents given the smallest key: where fewer than ``k_aux``
latents are dead, the extra slots get value 0 (so they carry no gradient), like the reference's
``-inf`` fill.

BatchTopK (Bussmann et al. 2024) keeps the k·B largest ReLU(pre) of the whole batch: the same
digit search over the flattened batch gives a global threshold θ, with per-pass counts summed by
atomics across programs and the prefix kept on the device (no host sync); then
``acts = ReLU(pre) · 1[ReLU(pre) ≥ θ]``. Ties at θ are all kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import empty, next_pow2

RADIX_BITS = 8  # digits of 8 bits: 4 passes over the row, a 256-bin histogram each (untuned on a GPU)


# The key computation is written out in each loop rather than called as a @triton.jit helper:
# the interpreter (how CI runs these kernels) pays milliseconds for every nested jit call.
#   key = offset-binary of the float bits (order of the floats, −0 just below +0), int64 in [0, 2³²);
#   −1 past the row end (never counted), 0 where the AuxK mask is off (below every real key).

@triton.jit
def _select_row(row_ptr, mask_ptr, n, k, out_v, out_i, USE_MASK: tl.constexpr, BLOCK: tl.constexpr,
                BITS: tl.constexpr):
    """Writes the k largest of one row (ties → lowest index), ascending index, into out_v/out_i."""
    NDIG: tl.constexpr = 1 << BITS
    bins = tl.arange(0, 2 * NDIG)  # bins ≥ NDIG collect the keys outside the current prefix (ignored)
    prefix = tl.zeros((), dtype=tl.int64)
    n_gt = tl.zeros((), dtype=tl.int32)  # keys known to be above the prefix (in a higher digit)
    for p in tl.static_range(32 // BITS):
        shift = 32 - BITS * (p + 1)
        hist = tl.zeros((2 * NDIG,), dtype=tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n
            bits = tl.load(row_ptr + offs, mask=inb, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
            key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648
            if USE_MASK:
                key = tl.where(tl.load(mask_ptr + offs, mask=inb, other=0) != 0, key, 0)
            key = tl.where(inb, key, -1)
            same_high = (key >> (shift + BITS)) == (prefix >> (shift + BITS))
            digit = tl.where(same_high, (key >> shift) & (NDIG - 1), NDIG).to(tl.int32)
            hist += tl.histogram(digit, 2 * NDIG)
        h = tl.where(bins < NDIG, hist, 0)
        ge = n_gt + tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # #keys ≥ prefix + b·2^shift
        d = tl.max(tl.where((ge >= k) & (bins < NDIG), bins, -1), axis=0)  # ge[0] ≥ k always: d ≥ 0
        n_gt += tl.sum(tl.where(bins > d, h, 0), axis=0)
        prefix = prefix + (d.to(tl.int64) << shift)
    # prefix is now the k-th largest key T, and n_gt = #{key > T}
    need_eq = k - n_gt
    taken = tl.zeros((), dtype=tl.int32)
    ties = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n
        x = tl.load(row_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648
        if USE_MASK:
            key = tl.where(tl.load(mask_ptr + offs, mask=inb, other=0) != 0, key, 0)
        key = tl.where(inb, key, -1)
        eq = (key == prefix).to(tl.int32)
        tie_rank = ties + tl.cumsum(eq, axis=0) - eq
        sel = (key > prefix) | ((eq != 0) & (tie_rank < need_eq))
        sel_i = sel.to(tl.int32)
        pos = taken + tl.cumsum(sel_i, axis=0) - sel_i
        val = tl.where(key == 0, 0.0, tl.maximum(x, 0.0))  # key 0: masked-off latent, contributes 0
        tl.store(out_v + pos, val.to(out_v.dtype.element_ty), mask=sel)
        tl.store(out_i + pos, offs.to(tl.int64), mask=sel)
        taken += tl.sum(sel_i, axis=0)
        ties += tl.sum(eq, axis=0)


@triton.jit
def _topk_kernel(pre_ptr, stride_b, n, k, v_ptr, i_ptr, mask_ptr, k_aux, va_ptr, ia_ptr,
                 HAS_AUX: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = pre_ptr + row * stride_b
    _select_row(row_ptr, mask_ptr, n, k, v_ptr + row * k, i_ptr + row * k, False, BLOCK, BITS)
    if HAS_AUX:  # same row, L2-hot: the dead latents' top k_aux
        _select_row(row_ptr, mask_ptr, n, k_aux, va_ptr + row * k_aux, ia_ptr + row * k_aux, True, BLOCK, BITS)


def topk_select_triton(pre: Tensor, k: int, aux_mask: Tensor | None = None, k_aux: int = 0
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(v, i, v_aux, i_aux): ReLU'd top-k of each row of ``pre`` (B, n) and, with ``aux_mask`` (n,)
    bool, the top ``k_aux`` among the masked latents. Indices int64, ascending within a row."""
    B, n = pre.shape
    if pre.stride(1) != 1:
        raise ValueError(f"topk_select_triton needs rows with unit stride, got strides {pre.stride()}; "
                         "pass pre.contiguous()")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    has_aux = aux_mask is not None and k_aux > 0
    k_aux = min(k_aux, n) if has_aux else 0
    v = empty((B, k), pre.dtype, pre.device)
    i = empty((B, k), torch.int64, pre.device)
    va = empty((B, k_aux), pre.dtype, pre.device)
    ia = empty((B, k_aux), torch.int64, pre.device)
    mask = aux_mask.to(torch.uint8).contiguous() if has_aux else i
    if B > 0:
        block = min(1024, next_pow2(n))
        _topk_kernel[(B,)](pre, pre.stride(0), n, k, v, i, mask, k_aux, va, ia,
                           HAS_AUX=has_aux, BLOCK=block, BITS=RADIX_BITS)
    return v, i, va, ia


# ---- BatchTopK: one global threshold ---------------------------------------------------------

@triton.jit
def _batch_hist_kernel(x_ptr, numel, prefix_ptr, hist_ptr, shift, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """hist[d] += #{ReLU(x) keys sharing the prefix above bit shift + BITS, with next digit d} over one tile."""
    NDIG: tl.constexpr = 1 << BITS
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    x = tl.maximum(tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(inb, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648, -1)
    prefix = tl.load(prefix_ptr)
    same_high = (key >> (shift + BITS)) == (prefix >> (shift + BITS))
    digit = tl.where(same_high, (key >> shift) & (NDIG - 1), NDIG).to(tl.int32)
    hist = tl.histogram(digit, 2 * NDIG)
    tl.atomic_add(hist_ptr + tl.arange(0, 2 * NDIG), hist)


def _key_to_float(key: Tensor) -> Tensor:
    s = key - 2**31  # int64 scalar tensor, in the int32 range
    bits = torch.where(s >= 0, s, s ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32)


def batch_topk_threshold_triton(pre: Tensor, keep: int) -> Tensor:
    """θ = the ``keep``-th largest ReLU(pre) over the whole tensor, as a 0-d float32 device tensor."""
    x = pre.contiguous().view(-1)
    numel = x.numel()
    if not 1 <= keep <= numel:
        raise ValueError(f"keep must be in [1, {numel}], got {keep}")
    prefix = torch.zeros((), dtype=torch.int64, device=x.device)
    n_gt = torch.zeros((), dtype=torch.int64, device=x.device)
    ndig = 1 << RADIX_BITS
    digits = torch.arange(ndig, device=x.device)
    block = 1024
    grid = (triton.cdiv(numel, block),)
    for p in range(32 // RADIX_BITS):  # the same digit search as _select_row, counts summed by atomics
        shift = 32 - RADIX_BITS * (p + 1)
        hist = torch.zeros(2 * ndig, dtype=torch.int32, device=x.device)
        _batch_hist_kernel[grid](x, numel, prefix, hist, shift, BLOCK=block, BITS=RADIX_BITS)
        h = hist[:ndig].long()
        ge = n_gt + h.flip(0).cumsum(0).flip(0)  # keys ≥ prefix + d·2^shift; all on the device, no sync
        d = torch.where(ge >= keep, digits, -1).max()
        n_gt = n_gt + torch.where(digits > d, h, 0).sum()
        prefix = prefix + (d << shift)
    return _key_to_float(prefix)


def batch_topk_triton(pre: Tensor, k: int) -> Tensor:
    """BatchTopK activations through a global threshold: ReLU(pre) where ReLU(pre) ≥ θ, θ the
    (k·tokens)-th largest ReLU(pre) of the batch. Differentiable in ``pre`` (the mask is not).
    Ties at θ are all kept, where the reference ``topk_sae.batch_topk_torch`` keeps exactly k·tokens."""
    n_tok = pre.numel() // pre.shape[-1]
    keep = min(k * n_tok, pre.numel())
    theta = batch_topk_threshold_triton(pre.detach(), keep)
    r = pre.relu()
    return r * (r.detach().float() >= theta).to(r.dtype)
