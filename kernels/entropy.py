"""Per-token entropy and target log-prob straight from hidden states, without materialising logits.

Shapes: ``hidden`` h (N, D), ``weight`` W (V, D) (the LM head), optional ``bias`` b (V,),
``targets`` t (N,) int64. With z = (h·Wᵀ + b) / T (T the temperature)::

    lse_n = log Σ_v exp z_nv,   H_n = lse_n − Σ_v p_nv z_nv,   logprob_n = z_{n,t_n} − lse_n

(p = softmax z; logprob 0 where t_n = ``ignore_index``). The Triton forward runs one program
per (block of rows, vocabulary split) over that split's vocabulary tiles: each tile's logits come
from an in-register matmul and fold into an online logsumexp — running max m, s = Σ e^{z−m} and
a = Σ e^{z−m}(z−m), rescaled when m grows — so H = log s − a/s without the cancellation of
lse − Σpz; the few splits' (m, s, a, z_t) are then merged the same way. Logits are never written;
extra memory O(N · splits).

Backward, for upstream gradients ḡ_H (entropy bonus) and ḡ_L (log-prob)::

    ∂z_nv = ḡ_L,n (1[v = t_n] − p_nv) − ḡ_H,n p_nv (log p_nv + H_n),   ∂(h·Wᵀ + b) = ∂z / T
    ∂h = ∂logits · W,   ∂W = ∂logitsᵀ · h,   ∂b = Σ_n ∂logits

recomputed in row chunks (one chunk of ∂logits at a time, bounded memory): on the Triton path one
kernel recomputes each logits tile in fp32 and writes ∂logits directly; the two GEMMs that follow
are torch's.

References: :func:`linear_entropy_logprob_chunked` (the torch path: the same chunked algorithm)
and :func:`linear_entropy_logprob_naive` (explicit logits, ``saetune.rl.entropy.token_entropy``,
``log_softmax`` and autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from saetune.errors import SaetuneError

from .dispatch import empty, interpreting, next_pow2, use_triton

CHUNK_ELEMENTS = 1 << 25  # logits per backward (and torch-forward) chunk: 128 MB in fp32

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without triton
    triton = None

if triton is not None:
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
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dm = ds < D
            h = tl.load(h_ptr + rows[:, None] * s_h0 + ds[None, :] * s_h1, mask=rm[:, None] & dm[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * s_w0 + ds[None, :] * s_w1, mask=cm[:, None] & dm[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
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


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise SaetuneError(f"hidden must be [N, D] and weight [V, D] with the same D; got hidden "
                           f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise SaetuneError(f"targets must be an integer tensor [N] = [{hidden.shape[0]}], got {targets.dtype} "
                           f"{tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise SaetuneError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SaetuneError(f"temperature must be a positive finite number, got {temperature!r}")


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = (h @ weight.t()).float()  # (rows, V)
    return out + bias.float() if bias is not None else out


def _forward_torch(hidden, weight, bias, targets, inv_temp, ignore_index):
    N = hidden.shape[0]
    ent = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lp, lse = torch.empty_like(ent), torch.empty_like(ent)
    for s in range(0, N, _chunk_rows(weight.shape[0])):
        z = _logits(hidden[s:s + _chunk_rows(weight.shape[0])], weight, bias) * inv_temp  # (rows, V)
        l = torch.logsumexp(z, dim=-1)
        logp = z - l[:, None]
        p = logp.exp()
        ent[s:s + z.shape[0]] = -torch.where(p > 0, p * logp, torch.zeros((), device=z.device)).sum(-1)
        t = targets[s:s + z.shape[0]]
        ok = t != ignore_index
        got = logp.gather(1, torch.where(ok, t, 0).long()[:, None]).squeeze(1)
        lp[s:s + z.shape[0]] = torch.where(ok, got, torch.zeros((), device=z.device))
        lse[s:s + z.shape[0]] = l
    return ent, lp, lse


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


def _forward_triton(hidden, weight, bias, targets, inv_temp, ignore_index):
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


def _dlogits_torch(z_raw, lse, ent, g_ent, g_lp, t, inv_temp, ignore_index):
    logp = z_raw * inv_temp - lse[:, None]
    p = logp.exp()
    d = -g_ent[:, None] * torch.where(p > 0, p * (logp + ent[:, None]), torch.zeros((), device=p.device))
    gl = torch.where(t != ignore_index, g_lp, torch.zeros((), device=p.device))
    d -= gl[:, None] * p
    ok = t != ignore_index
    d[ok.nonzero().squeeze(1), t[ok].long()] += gl[ok]
    return d * inv_temp


class _LinearEntropyLogprob(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, triton_path):
        inv_temp = 1.0 / temperature
        fwd = _forward_triton if triton_path else _forward_torch
        ent, lp, lse = fwd(hidden, weight, bias, targets, inv_temp, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, ent, lse)
        ctx.inv_temp, ctx.ignore_index, ctx.triton_path = inv_temp, ignore_index, triton_path
        return ent, lp

    @staticmethod
    def backward(ctx, g_ent, g_lp):
        hidden, weight, bias, targets, ent, lse = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        g_ent = torch.zeros_like(ent) if g_ent is None else g_ent.float()
        g_lp = torch.zeros_like(ent) if g_lp is None else g_lp.float()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        dW = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # fp32 sum
        db = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
        step = _chunk_rows(V)
        for s in range(0, N, step):
            e = min(N, s + step)
            h = hidden[s:e]
            if ctx.triton_path:  # logits recomputed tile by tile in fp32, ∂logits written directly
                z = empty((e - s, V), torch.float32, hidden.device)
                bn, bv, bd = 32, 64, max(16, min(64, next_pow2(hidden.shape[1])))
                _dz_kernel[(triton.cdiv(e - s, bn), triton.cdiv(V, bv))](
                    h, h.stride(0), h.stride(1), weight, weight.stride(0), weight.stride(1),
                    bias if bias is not None else weight, targets[s:e].contiguous(), lse[s:], ent[s:],
                    g_ent[s:], g_ent.stride(0), g_lp[s:], g_lp.stride(0), z, e - s, V, hidden.shape[1],
                    ctx.inv_temp, ctx.ignore_index, HAS_BIAS=bias is not None, IEEE=_ieee_dot(hidden, weight),
                    BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
            else:
                z = _logits(h, weight, bias)  # (rows, V) fp32
                z = _dlogits_torch(z, lse[s:e], ent[s:e], g_ent[s:e], g_lp[s:e], targets[s:e], ctx.inv_temp,
                                   ctx.ignore_index)
            if need_h:
                dh[s:e] = (z.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                dW.add_((z.t().to(h.dtype) @ h).float())
            if need_b:
                db += z.sum(0)
        return (dh, dW.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
                None, None, None, None)


def linear_entropy_logprob(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                           temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """(entropy, logprob), both float32 [N], of softmax((hidden·weightᵀ + bias) / temperature) — see the
    module docstring. Differentiable in hidden, weight and bias (both outputs). Triton on CUDA, the
    chunked torch algorithm elsewhere (``SAETUNE_KERNELS`` overrides)."""
    _check(hidden, weight, targets, bias, temperature)
    tensors = [hidden, weight] + ([bias] if bias is not None else [])
    return _LinearEntropyLogprob.apply(hidden, weight, bias, targets, float(temperature), int(ignore_index),
                                       use_triton(*tensors))


def linear_entropy_logprob_chunked(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                                   temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """The torch path of :func:`linear_entropy_logprob` (row chunks of explicit logits, bounded memory)."""
    _check(hidden, weight, targets, bias, temperature)
    return _LinearEntropyLogprob.apply(hidden, weight, bias, targets, float(temperature), int(ignore_index), False)


def linear_entropy_logprob_naive(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                                 temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Reference on explicit logits: ``token_entropy`` and ``log_softmax``, plain autograd (N × V memory)."""
    from saetune.rl.entropy import token_entropy
    _check(hidden, weight, targets, bias, temperature)
    logits = F.linear(hidden, weight, bias).float()  # (N, V)
    ent = token_entropy(logits, temperature)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    ok = targets != ignore_index
    lp = logp.gather(1, torch.where(ok, targets, 0).long()[:, None]).squeeze(1)
    return ent, torch.where(ok, lp, torch.zeros((), device=lp.device))
