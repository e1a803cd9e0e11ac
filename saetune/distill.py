"""Distillation losses computed from final hidden states, a block of positions at a time.

Resa's Stage II loss is a KL between the teacher's and the student's next-token distributions
over a 150k vocabulary at every position of a 2,048-token sequence. Materialised in fp32 that
is two 2,048 × 151,936 logit tensors (2.5 GB) plus their softmaxes. Here the logits of a block
of ``chunk`` positions are formed from the hidden states, reduced to a per-block sum, and
dropped; the gradient in the hidden states is formed in the same pass from the closed form of the
loss's gradient in the logits, so the extra memory is O(chunk × V) instead of O(T × V) and no
logits are recomputed. The values equal the materialised computation.

Precision: by default the logits, softmaxes and KL are fp32, more exact than the reference, whose
bf16 stack (model and ``kl_div`` in bfloat16) computes them in bf16. ``dtype=torch.bfloat16`` does
that instead, block by block (``F.kl_div`` on bf16 softmaxes); the per-block sums are added in fp32.

With z = h·Wᵀ (+ b) per position, p = softmax(z_teacher), log q = log_softmax(z_student)::

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)          summed over positions (Resa: batchmean, batch 1)
    CE        = −log q_{y}                            y the next token
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    z = h.to(dtype) @ weight.to(dtype).t()  # (n, V)
    return z if bias is None else z + bias.to(dtype)


class _FusedHeadLoss(torch.autograd.Function):
    """Σ over positions of a loss on logits z = h·Wᵀ + b whose gradient in z is known in closed form;
    the gradient in h (and W, b) is formed in the forward, block by block, so nothing of size N × V
    is kept and no logits are recomputed in the backward:

        KL(p ‖ q):  ∂/∂z_student = q − p          (p = softmax(z_teacher), q = softmax(z_student))
        CE(y):      ∂/∂z         = softmax(z) − onehot(y)   (0 for ignored targets)
    """

    @staticmethod
    def forward(ctx, h_s: Tensor, weight: Tensor, bias: Tensor | None, h_t: Tensor | None, targets: Tensor | None,
                chunk: int, ignore_index: int, dtype: torch.dtype = torch.float32):
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        n = h_s.shape[0]
        grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=h_s.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        w32 = weight.float()
        for i in range(0, n, chunk):
            hs = h_s[i:i + chunk]
            if h_t is not None and dtype != torch.float32:  # the reference's bf16 KL: softmaxes and kl_div in dtype
                log_q = F.log_softmax(_logits(hs, weight, bias, dtype), dim=-1)  # (c, V) in dtype
                p = F.softmax(_logits(h_t[i:i + chunk], weight, bias, dtype), dim=-1)
                total += F.kl_div(log_q, p, reduction="sum").float()
                dz = (log_q.exp() - p).float()  # q − p, rounded as the reference's bf16 logits gradient
            elif h_t is not None:
                log_q = F.log_softmax(_logits(hs, weight, bias), dim=-1)  # (c, V)
                log_p = F.log_softmax(_logits(h_t[i:i + chunk], weight, bias), dim=-1)
                p = log_p.exp()
                total += (p * (log_p - log_q)).sum()
                dz = log_q.exp_().sub_(p)  # q − p
            else:
                log_q = F.log_softmax(_logits(hs, weight, bias), dim=-1)  # (c, V)
                y = targets[i:i + chunk]
                valid = y != ignore_index
                y0 = torch.where(valid, y, torch.zeros_like(y))
                total -= log_q.gather(1, y0[:, None]).squeeze(1)[valid].sum()
                dz = log_q.exp_()
                dz[torch.arange(len(y0), device=dz.device), y0] -= 1.0
                dz[~valid] = 0.0
            grad_h[i:i + chunk] = dz @ w32  # (c, D)
            if need_w:
                grad_w += dz.t() @ hs.float()
            if need_b:
                grad_b += dz.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h_s.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        return ((grad_h * g).to(dh), None if grad_w is None else (grad_w * g).to(dw),
                None if grad_b is None else (grad_b * g).to(db), None, None, None, None, None)


def kl_from_hidden(h_teacher: Tensor, h_student: Tensor, weight: Tensor, bias: Tensor | None = None,
                   chunk: int = 1024, dtype: torch.dtype = torch.float32) -> Tensor:
    """Σ over positions of KL(softmax(h_teacher·Wᵀ) ‖ softmax(h_student·Wᵀ)), a block at a time.

    ``dtype``: of the logits, softmaxes and KL — float32 (default; more exact than the reference) or
    bfloat16 (as the reference's bf16 stack: ``F.kl_div`` of bf16 log-softmax and softmax).

    ``h_teacher``, ``h_student``: (..., D), same shape; ``weight``: (V, D) LM head. Gradient
    flows to ``h_student`` (and ``weight``/``bias`` if they require it, through the student's logits);
    the teacher's distribution is a constant, as from a no-grad teacher pass.
    Three (N × D × V) GEMMs in all, as with materialised logits, and O(chunk × V) extra memory.
    """
    if h_teacher.shape != h_student.shape:
        raise ValueError(f"teacher and student hidden states differ in shape: {tuple(h_teacher.shape)} vs "
                         f"{tuple(h_student.shape)}")
    t = h_teacher.detach().reshape(-1, h_teacher.shape[-1])
    s = h_student.reshape(-1, h_student.shape[-1])
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"kl_from_hidden computes in float32 or bfloat16, not {dtype}")
    return _FusedHeadLoss.apply(s, weight, bias, t, None, chunk, -100, dtype)


def ce_from_hidden(h_student: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None = None,
                   chunk: int = 1024, ignore_index: int = -100) -> Tensor:
    """Σ over positions of −log softmax(h·Wᵀ)[target], fp32, a block at a time; ``ignore_index`` counts 0."""
    s = h_student.reshape(-1, h_student.shape[-1])
    y = targets.reshape(-1)
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"{y.shape[0]} targets for {s.shape[0]} hidden states")
    return _FusedHeadLoss.apply(s, weight, bias, None, y, chunk, ignore_index, torch.float32)
