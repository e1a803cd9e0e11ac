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

The Triton kernels live in ``triton_entropy``, imported only when the Triton path runs; this module
never imports triton.

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

from .dispatch import use_triton

CHUNK_ELEMENTS = 1 << 25  # logits per backward (and torch-forward) chunk: 128 MB in fp32

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
        if triton_path:
            from .triton_entropy import forward_triton as fwd
        else:
            fwd = _forward_torch
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
                from .triton_entropy import dlogits_triton
                z = dlogits_triton(h, weight, bias, targets[s:e], lse[s:e], ent[s:e], g_ent[s:e], g_lp[s:e],
                                   ctx.inv_temp, ctx.ignore_index)
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
