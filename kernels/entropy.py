"""Token entropy, and per-token entropy and target log-prob straight from hidden states without
materialising logits (plain-torch references; the Triton path is ``triton_entropy``).

:func:`token_entropy` (re-exported as ``saetune.rl.entropy.token_entropy``) is the entropy of
explicit logits. The fused op ``linear_entropy_logprob`` gives the entropy and the target's
log-prob from the hidden states; ``dispatch`` picks its path (and the older import path
``saetune.kernels.entropy.linear_entropy_logprob`` finds it there).

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

recomputed in row chunks (one chunk of ∂logits at a time, bounded memory) by
:func:`chunked_backward`, which both paths share: on the Triton path one kernel recomputes each
logits tile in fp32 and writes ∂logits directly (``triton_entropy.dlogits_triton``), on the torch
path :func:`dlogits_torch` forms the chunk's logits; the two GEMMs that follow are torch's.

The two implementations, one signature: :func:`linear_entropy_logprob_torch`
(:class:`LinearEntropyLogprob`, the same chunked algorithm with explicit logits per chunk) and
``triton_entropy.linear_entropy_logprob_triton``; :func:`linear_entropy_logprob_naive` (explicit
logits, :func:`token_entropy`, ``log_softmax`` and autograd) is the definition both must equal.
This module never imports triton, nor ``dispatch`` when it loads (see ``__getattr__`` at the end).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from saetune.errors import SaetuneError

CHUNK_ELEMENTS = 1 << 25  # logits per backward (and torch-forward) chunk: 128 MB in fp32


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim: ``[..., V] → [...]``.

    ``H = logsumexp(z) − Σ_v softmax(z)_v · z_v`` with ``z = logits / temperature`` — the form
    verl uses (``entropy_from_logits``), evaluated as ``−Σ p·log p`` with ``log p = z − logsumexp(z)``
    (equal, and free of cancellation when H ≈ 0). Computed in float32 for fp16/bf16/fp32 input and in
    float64 for float64 input; differentiable. ``-inf`` logits (masked vocabulary) contribute
    0, not ``nan``.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        what = f"dtype {logits.dtype}, shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise SaetuneError(f"logits must be a floating tensor [..., V], got {what}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SaetuneError(f"temperature must be a positive finite number, got {temperature!r}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype)
    if temperature != 1.0:
        z = z / temperature  # [..., V]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [..., 1]
    logp = z - lse  # [..., V]
    p = torch.exp(logp)
    # Σ_v p_v·z_v − lse = Σ_v p_v·log p_v since Σ p = 1; summing p·log p avoids the cancellation
    # of two large numbers when H is small. Where p = 0 (z = -inf), use 0 in place of log p so
    # 0·(-inf) gives neither nan nor a nan gradient.
    logp_safe = torch.where(p > 0, logp, torch.zeros((), dtype=dtype, device=z.device))
    return -(p * logp_safe).sum(-1)


def check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: float) -> None:
    """Shapes and temperature of a ``linear_entropy_logprob`` call; a ``SaetuneError`` naming the bad one."""
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


def dlogits_torch(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, ent: Tensor,
                  g_ent: Tensor, g_lp: Tensor, inv_temp: float, ignore_index: int) -> Tensor:
    """∂(h·Wᵀ + b) (rows, V) fp32 of one row chunk ``h`` (rows, D) from its explicit fp32 logits
    (``triton_entropy.dlogits_triton``'s signature); the other tensors are the chunk's (rows,) slices."""
    return _dlogits_torch(_logits(h, weight, bias), lse, ent, g_ent, g_lp, targets, inv_temp, ignore_index)


def chunked_backward(ctx, g_ent: Tensor | None, g_lp: Tensor | None, dlogits) -> tuple:
    """The backward both paths share (module docstring): ∂logits a row chunk at a time from
    ``dlogits`` (:func:`dlogits_torch` or ``triton_entropy.dlogits_triton``), then ∂h, ∂W, ∂b by
    GEMMs. ``ctx`` saved (hidden, weight, bias, targets, ent, lse) and ``inv_temp``, ``ignore_index``;
    returns the gradients of (hidden, weight, bias, targets, temperature, ignore_index)."""
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
        z = dlogits(h, weight, bias, targets[s:e], lse[s:e], ent[s:e], g_ent[s:e], g_lp[s:e], ctx.inv_temp,
                    ctx.ignore_index)  # (rows, V) fp32
        if need_h:
            dh[s:e] = (z.to(weight.dtype) @ weight).to(hidden.dtype)
        if need_w:
            dW.add_((z.t().to(h.dtype) @ h).float())
        if need_b:
            db += z.sum(0)
    return (dh, dW.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
            None, None, None)


def entropy_function(forward_fn, dlogits_fn, name: str) -> type[torch.autograd.Function]:
    """The autograd Function of ``linear_entropy_logprob`` on one path's two kernels: ``forward_fn(hidden, weight,
    bias, targets, inv_temp, ignore_index) -> (ent, lp, lse)`` and ``dlogits_fn`` (∂logits of a row chunk, used by
    :func:`chunked_backward`). Arguments (hidden, weight, bias, targets, temperature, ignore_index)."""

    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index):
        inv_temp = 1.0 / temperature
        ent, lp, lse = forward_fn(hidden, weight, bias, targets, inv_temp, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, ent, lse)
        ctx.inv_temp, ctx.ignore_index = inv_temp, ignore_index
        return ent, lp

    def backward(ctx, g_ent, g_lp):
        return chunked_backward(ctx, g_ent, g_lp, dlogits_fn)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


# the torch path: explicit logits one row chunk at a time (triton_entropy.LinearEntropyLogprobTriton: the Triton one)
LinearEntropyLogprob = entropy_function(_forward_torch, dlogits_torch, "LinearEntropyLogprob")


def linear_entropy_logprob_torch(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                                 temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """The torch path of ``linear_entropy_logprob``: (entropy, logprob), both float32 [N], of
    softmax((hidden·weightᵀ + bias) / temperature), row chunks of explicit logits (bounded memory).
    Differentiable in hidden, weight and bias (both outputs)."""
    check_inputs(hidden, weight, targets, bias, temperature)
    return LinearEntropyLogprob.apply(hidden, weight, bias, targets, float(temperature), int(ignore_index))


def linear_entropy_logprob_naive(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                                 temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Reference on explicit logits: :func:`token_entropy` and ``log_softmax``, plain autograd (N × V memory)."""
    check_inputs(hidden, weight, targets, bias, temperature)
    logits = F.linear(hidden, weight, bias).float()  # (N, V)
    ent = token_entropy(logits, temperature)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    ok = targets != ignore_index
    lp = logp.gather(1, torch.where(ok, targets, 0).long()[:, None]).squeeze(1)
    return ent, torch.where(ok, lp, torch.zeros((), device=lp.device))


def __getattr__(name: str):
    """``saetune.kernels.entropy.linear_entropy_logprob``, the public op's older import path: the op
    itself lives in ``dispatch`` (imported on first use, so this module never imports it at load)."""
    if name == "linear_entropy_logprob":
        from .dispatch import linear_entropy_logprob
        return linear_entropy_logprob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
