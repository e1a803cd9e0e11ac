"""One fused parameter pass for a TopK SAE: the optimiser update together with the decoder upkeep.

The plain-torch step (the reference, :func:`sae_update_torch`) is three sweeps over W_dec plus the
optimiser's own::

    g_c ← g_c − ⟨g_c, ŵ_c⟩ ŵ_c,   ŵ_c = W_dec[c] / ‖W_dec[c]‖     (parallel-gradient removal)
    optimiser step on every parameter
    W_dec[c] ← W_dec[c] / ‖W_dec[c]‖                                 (unit-norm decoder rows)

:func:`sae_update_triton` does all of it in one read and one write of each parameter and its state:
one program per decoder row (the row fits in registers: both norms are in-program reductions),
elementwise programs for W_enc, b_enc, b_dec. It updates the optimiser's own state tensors in the
layout torch keeps them, so checkpoints, ``state_dict()`` and a later torch step stay valid.

Optimisers (formulas as their torch implementations compute them):

- ``torch.optim.Adam`` (no weight decay, no amsgrad): with t the step count,
  m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε).
  The step count stays on the device (β^t is computed in the kernel): no host sync.
- Resa's sign-SGD in ``schedulefree.ScheduleFreeWrapper`` (Defazio et al. 2024), per element,
  with y the stored parameter, z the wrapper's state, μ its momentum, c = w_t / Σw (host scalars):
  x = lerp(y, z, 1 − 1/μ),  z ← z − lr·sign(g),  x ← lerp(x, z, c),  y ← lerp(x, z, 1 − μ).

Any other optimiser or option falls back to the reference (same results, not faster).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import next_pow2
from .topk_sae import sae_update_torch  # the fallback for an optimiser or SAE the pass does not fuse

BLOCK = 1024


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's formula (two branches, for values equal to torch's to the last bit where possible)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _adam(p, g, m, v, step, lr, beta1, beta2, eps):
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    bc2 = 1.0 - tl.exp2(step * tl.log2(beta2))
    denom = tl.sqrt(v) / tl.sqrt(bc2) + eps
    return p - (lr / bc1) * (m / denom), m, v


@triton.jit
def _sf_sign(y, z, g, lr, mom, ckp1):
    x = _lerp(y, z, 1.0 - 1.0 / mom)
    sg = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    z = z - lr * sg
    x = _lerp(x, z, ckp1)
    return _lerp(x, z, 1.0 - mom), z


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, numel, lr, beta1, beta2, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < numel
    step = tl.load(step_ptr).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    p, m, v = _adam(p, g, m, v, step, lr, beta1, beta2, eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=msk)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=msk)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _sf_kernel(y_ptr, z_ptr, g_ptr, numel, lr, mom, ckp1, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < numel
    y = tl.load(y_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    y, z = _sf_sign(y, z, g, lr, mom, ckp1)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=msk)
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _decoder_row_kernel(p_ptr, g_ptr, s1_ptr, s2_ptr, step_ptr, D, lr, beta1, beta2, eps, mom, ckp1,
                        ADAM: tl.constexpr, RENORM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One decoder row: parallel-gradient removal, the optimiser update, unit norm. s1/s2 = (m, v) for
    Adam, (z, unused) for schedule-free sign-SGD."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    msk = cols < D
    base = row * D + cols
    p = tl.load(p_ptr + base, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + base, mask=msk, other=0.0).to(tl.float32)
    if RENORM:
        w = p / tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), 1e-12)
        g = g - tl.sum(g * w, axis=0) * w
    s1 = tl.load(s1_ptr + base, mask=msk, other=0.0).to(tl.float32)
    if ADAM:
        s2 = tl.load(s2_ptr + base, mask=msk, other=0.0).to(tl.float32)
        p, s1, s2 = _adam(p, g, s1, s2, tl.load(step_ptr).to(tl.float32), lr, beta1, beta2, eps)
        tl.store(s2_ptr + base, s2.to(s2_ptr.dtype.element_ty), mask=msk)
    else:
        p, s1 = _sf_sign(p, s1, g, lr, mom, ckp1)
    tl.store(s1_ptr + base, s1.to(s1_ptr.dtype.element_ty), mask=msk)
    if RENORM:
        p = p / tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), 1e-12)
    tl.store(p_ptr + base, p.to(p_ptr.dtype.element_ty), mask=msk)


# ---- host side ---------------------------------------------------------------------------------

def _plain_adam(opt) -> bool:
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return False
    g = opt.param_groups[0]
    return (not g["weight_decay"] and not g["amsgrad"] and not g["maximize"] and not isinstance(g["lr"], torch.Tensor)
            and not g.get("capturable", False) and not g.get("differentiable", False) and not g.get("decoupled_weight_decay", False))


def _signum_sf(opt) -> bool:
    from saetune.optim import SignSGD
    return (type(opt).__name__ == "ScheduleFreeWrapper" and isinstance(getattr(opt, "base", None), SignSGD)
            and len(opt.param_groups) == 1 and opt.weight_decay_at_y == 0.0 and opt.train_mode)


def fusable(opt, sae) -> bool:
    """Whether :func:`sae_update_triton` handles this optimiser and SAE (else it uses the reference)."""
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    if any(p.grad is None or not p.is_contiguous() or not p.grad.is_contiguous() for p in params):
        return False
    if sae.W_dec.shape[1] > 16384 or not (_plain_adam(opt) or _signum_sf(opt)):
        return False
    if _plain_adam(opt) and any(opt.state[p] and opt.state[p]["step"].device != p.device for p in params):
        return False  # a step count on the host (non-fused torch Adam): the kernels read it on the device
    return {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in params}


@torch.no_grad()
def sae_update_triton(opt, sae, renorm: bool) -> None:
    """The fused pass (module docstring); same effect on parameters and optimiser state as the reference."""
    if not fusable(opt, sae):
        sae_update_torch(opt, sae, renorm)
        return
    group = opt.param_groups[0]
    adam = _plain_adam(opt)
    lr = float(group["lr"])
    if adam:
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, mom, ckp1 = float(group["eps"]), 0.0, 0.0
        for p in group["params"]:
            st = opt.state[p]
            if len(st) == 0:  # the layout torch's fused Adam creates
                st["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
    else:
        beta1 = beta2 = eps = 0.0
        mom = float(opt.momentum)
        for p in group["params"]:
            if "z" not in opt.state[p]:
                opt.state[p]["z"] = torch.clone(p, memory_format=torch.preserve_format)
        k = group.get("k", 0)
        lr_max = group["lr_max"] = max(lr * group.get("d", 1.0), group.get("lr_max", 0))
        weight = ((k + 1) ** opt.r) * (lr_max ** opt.weight_lr_power)
        weight_sum = group["weight_sum"] = group.get("weight_sum", 0.0) + weight
        ckp1 = weight / weight_sum
        group["k"] = k + 1
    for p in group["params"]:
        st = opt.state[p]
        if adam:
            s1, s2, step = st["exp_avg"], st["exp_avg_sq"], st["step"]
        else:
            s1, s2, step = st["z"], st["z"], p
        if p is sae.W_dec:
            n, D = p.shape
            _decoder_row_kernel[(n,)](p, p.grad, s1, s2, step, D, lr, beta1, beta2, eps, mom, ckp1,
                                      ADAM=adam, RENORM=renorm, BLOCK_D=next_pow2(D))
        elif adam:
            _adam_kernel[(triton.cdiv(p.numel(), BLOCK),)](p, p.grad, s1, s2, step, p.numel(), lr, beta1, beta2,
                                                           eps, BLOCK=BLOCK)
        else:
            _sf_kernel[(triton.cdiv(p.numel(), BLOCK),)](p, s1, p.grad, p.numel(), lr, mom, ckp1, BLOCK=BLOCK)
