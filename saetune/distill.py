"""Distillation losses computed from final hidden states, a block of positions at a time.

Resa's Stage II loss is a KL between the teacher's and the student's next-token distributions
over a 150k vocabulary at every position of a 2,048-token sequence. Materialised in fp32 that
is two 2,048 × 151,936 logit tensors (2.5 GB) plus their softmaxes. Here the logits of a block
of ``chunk`` positions are formed from the hidden states, reduced to a per-block sum, and
dropped; the backward recomputes them block by block (activation checkpointing), so the extra
memory is O(chunk × V) instead of O(T × V). The values equal the materialised computation.

With z = h·Wᵀ (+ b) per position, p = softmax(z_teacher), log q = log_softmax(z_student)::

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)          summed over positions (Resa: batchmean, batch 1)
    CE        = −log q_{y}                            y the next token
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    z = h.float() @ weight.float().t()  # (n, V) in fp32, as the reference computes its KL
    return z if bias is None else z + bias.float()


def _kl_block(h_t: Tensor, h_s: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    log_p = F.log_softmax(_logits(h_t, weight, bias), dim=-1)  # (n, V)
    log_q = F.log_softmax(_logits(h_s, weight, bias), dim=-1)  # (n, V)
    return (log_p.exp() * (log_p - log_q)).sum()


def _ce_block(h_s: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, ignore_index: int) -> Tensor:
    return F.cross_entropy(_logits(h_s, weight, bias), targets, reduction="sum", ignore_index=ignore_index)


def kl_from_hidden(h_teacher: Tensor, h_student: Tensor, weight: Tensor, bias: Tensor | None = None,
                   chunk: int = 1024) -> Tensor:
    """Σ over positions of KL(softmax(h_teacher·Wᵀ) ‖ softmax(h_student·Wᵀ)), fp32, chunked.

    ``h_teacher``, ``h_student``: (..., D), same shape; ``weight``: (V, D) LM head. Gradient
    flows to ``h_student`` (and ``weight``/``bias`` if they require it); the teacher is constant.
    """
    if h_teacher.shape != h_student.shape:
        raise ValueError(f"teacher and student hidden states differ in shape: {tuple(h_teacher.shape)} vs "
                         f"{tuple(h_student.shape)}")
    t = h_teacher.detach().reshape(-1, h_teacher.shape[-1])
    s = h_student.reshape(-1, h_student.shape[-1])
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        total = total + checkpoint(_kl_block, t[i:i + chunk], s[i:i + chunk], weight, bias, use_reentrant=False)
    return total


def ce_from_hidden(h_student: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None = None,
                   chunk: int = 1024, ignore_index: int = -100) -> Tensor:
    """Σ over positions of −log softmax(h·Wᵀ)[target], fp32, chunked; ``ignore_index`` targets count 0."""
    s = h_student.reshape(-1, h_student.shape[-1])
    y = targets.reshape(-1)
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"{y.shape[0]} targets for {s.shape[0]} hidden states")
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        total = total + checkpoint(_ce_block, s[i:i + chunk], y[i:i + chunk], weight, bias, ignore_index,
                                   use_reentrant=False)
    return total
