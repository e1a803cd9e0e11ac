"""The Triton path of ``linear_entropy_logprob`` (maths and shapes in ``entropy``'s docstring): the
forward over vocabulary splits with an online logsumexp, the backward's ∂logits tiles, and
:func:`linear_entropy_logprob_triton` (:class:`LinearEntropyLogprobTriton`) around them, whose
backward is ``entropy.chunked_backward`` with the Triton ∂logits. Imported only on the Triton path
(``kernels.dispatch``); the torch path lives in ``entropy`` and never imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .entropy import check_inputs, entropy_function
from .launch import empty, interpreting, next_pow2


@triton.jit
def _logits_tile(h_ptr, s_h0, s_h1, w_ptr, s_w0, s_w1, b_ptr, rows, cols, rm, cm, D,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits h·Wᵀ (+ b) of one (rows, cols) tile [BLOCK_N, BLOCK_V], accumulated over D in BLOCK_D steps."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < D
        h = tl.load(h_ptr + rows[:, None] * s_h0 + ds[None, :] * s_h1, mask=rm[:, None] & dm[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * s_w0 + ds[None, :] * s_w1, mask=cm[:, None] & dm[None, :], other=0.0)
        if IEEE:  # fp32 inputs: full fp32 products, as torch's matmul (no tf32)
            acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(h_ptr, s_h0, s_h1, w_ptr, s_w0, s_w1, b_ptr, t_ptr, m_ptr, s_ptr, a_ptr, zt_ptr,
                N, V, D, tiles_per_split, inv_temp,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial sums of one block of rows over one vocabulary split: m, s, a, z_target → [split, row]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rm = rows < N
    tgt = tl.load(t_ptr + rows, mask=rm, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cm = cols < v_hi
        acc = _logits_tile(h_ptr, s_h0, s_h1, w_ptr, s_w0, s_w1, b_ptr, rows, cols, rm, cm, D,
                           HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
        z = tl.where(cm[None, :], acc * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        zc = z - m_safe[:, None]
        e = tl.exp(zc)
        ez = e * tl.where(e > 0, zc, 0.0)  # 0·(−inf) would be nan
        shift = tl.where(s > 0, m - m_safe, 0.0)  # rebase the old sums on the new max
        scale = tl.exp(shift)
        a = scale * (a + s * shift) + tl.sum(ez, axis=1)
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=rm)
    tl.store(s_ptr + out, s, mask=rm)
    tl.store(a_ptr + out, a, mask=rm)
    tl.store(zt_ptr + out, zt, mask=rm)

@triton.jit
def _dz_kernel(h_ptr, s_h0, s_h1, w_ptr, s_w0, s_w1, b_ptr, t_ptr, lse_ptr, ent_ptr, gh_ptr, s_gh, gl_ptr, s_gl,
               out_ptr, N, V, D, inv_temp, ignore_index,
               HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (rows, vocab) tile of ∂(h·Wᵀ + b) (module docstring), logits recomputed in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    rm = rows < N
    cm = cols < V
    acc = _logits_tile(h_ptr, s_h0, s_h1, w_ptr, s_w0, s_w1, b_ptr, rows, cols, rm, cm, D,
                       HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
    logp = acc * inv_temp - tl.load(lse_ptr + rows, mask=rm, other=0.0)[:, None]
    p = tl.exp(logp)
    ent = tl.load(ent_ptr + rows, mask=rm, other=0.0)
    gh = tl.load(gh_ptr + rows * s_gh, mask=rm, other=0.0)
    gl = tl.load(gl_ptr + rows * s_gl, mask=rm, other=0.0)
    t = tl.load(t_ptr + rows, mask=rm, other=-1)
    gl = tl.where(t == ignore_index, 0.0, gl)
    onehot = tl.where(cols[None, :] == t[:, None], 1.0, 0.0)
    d = gl[:, None] * (onehot - p) - gh[:, None] * (p * tl.where(p > 0, logp + ent[:, None], 0.0))
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], d * inv_temp, mask=rm[:, None] & cm[None, :])


def _ieee_dot(hidden: Tensor, weight: Tensor) -> bool:
    """fp32 tiles and an fp32 dot: for fp32 inputs, and under the interpreter for every dtype (its bf16
    ``tl.dot`` returns garbage in triton 3.9; bf16 products are exact in fp32, so the maths is the same)."""
    return torch.float32 in (hidden.dtype, weight.dtype) or interpreting()


def _splits(n_row_blocks: int, n_tiles: int, device) -> int:
    """Vocabulary splits so that the grid has a few programs per SM (2 under the interpreter, so the
    combine is tested)."""
    if device.type != "cuda":
        return min(2, n_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, -(-4 * sms // n_row_blocks)))


def forward_triton(hidden, weight, bias, targets, inv_temp, ignore_index):
    """(entropy, logprob, lse), each float32 [N]: the kernel's per-split partial sums, merged."""
    N, D = hidden.shape
    V = weight.shape[0]
    bn, bv = 64, 128
    bd = max(16, min(64, next_pow2(D)))
    n_tiles = triton.cdiv(V, bv)
    splits = _splits(triton.cdiv(N, bn), n_tiles, hidden.device)
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)  # every split holds at least one tile
    m, s, a, zt = (empty((splits, N), torch.float32, hidden.device) for _ in range(4))
    if N:
        _fwd_kernel[(triton.cdiv(N, bn), splits)](hidden, hidden.stride(0), hidden.stride(1), weight,
                                                  weight.stride(0), weight.stride(1),
                                                  bias if bias is not None else weight, targets.contiguous(),
                                                  m, s, a, zt, N, V, D, per, inv_temp,
                                                  HAS_BIAS=bias is not None, IEEE=_ieee_dot(hidden, weight),
                                                  BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
    # combine the splits: rebase each on the global max M (a split whose logits are all −inf has s = 0)
    M = m.max(0).values  # (N,)
    M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    live = s > 0
    shift = torch.where(live, m - M_safe, torch.zeros_like(m))
    w = torch.where(live, shift.exp(), torch.zeros_like(m))
    s_tot = (w * s).sum(0)
    a_tot = (w * (a + s * shift)).sum(0)
    lse = M_safe + s_tot.log()
    ent = s_tot.log() - a_tot / s_tot
    lp = torch.where(targets == ignore_index, torch.zeros_like(lse), zt.sum(0) - lse)
    return ent, lp, lse


def dlogits_triton(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, ent: Tensor,
                   g_ent: Tensor, g_lp: Tensor, inv_temp: float, ignore_index: int) -> Tensor:
    """∂(h·Wᵀ + b) (rows, V) fp32 of one row chunk ``h`` (rows, D), logits recomputed tile by tile in fp32;
    ``targets``, ``lse``, ``ent``, ``g_ent``, ``g_lp`` are the chunk's (rows,) slices."""
    rows, V = h.shape[0], weight.shape[0]
    z = empty((rows, V), torch.float32, h.device)
    bn, bv, bd = 32, 64, max(16, min(64, next_pow2(h.shape[1])))
    _dz_kernel[(triton.cdiv(rows, bn), triton.cdiv(V, bv))](
        h, h.stride(0), h.stride(1), weight, weight.stride(0), weight.stride(1),
        bias if bias is not None else weight, targets.contiguous(), lse, ent,
        g_ent, g_ent.stride(0), g_lp, g_lp.stride(0), z, rows, V, h.shape[1],
        inv_temp, ignore_index, HAS_BIAS=bias is not None, IEEE=_ieee_dot(h, weight),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
    return z


# the Triton path: the kernels above, same contract as ``entropy.LinearEntropyLogprob``
LinearEntropyLogprobTriton = entropy_function(forward_triton, dlogits_triton, "LinearEntropyLogprobTriton")


def linear_entropy_logprob_triton(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                                  temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """The Triton path of ``linear_entropy_logprob``: (entropy, logprob), both float32 [N]; logits never
    written. Same signature and results as ``entropy.linear_entropy_logprob_torch``."""
    check_inputs(hidden, weight, targets, bias, temperature)
    return LinearEntropyLogprobTriton.apply(hidden, weight, bias, targets, float(temperature), int(ignore_index))
