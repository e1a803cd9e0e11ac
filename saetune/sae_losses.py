"""Training losses of the SAE architectures: pure functions of a batch and the SAE's tensors.

``SAETrainer.loss`` (``saetune.sae_trainer``) picks one by ``SAEConfig.architecture`` and keeps the
bookkeeping (L0, the fired-latent mask, BatchTopK's inference threshold); everything below is maths.
Notation: x [B, d_in] a batch, pre = (x − b_dec)·W_enc + b_enc [B, d_sae] the pre-activations,
f [B, d_sae] the latents, x̂ = f·W_dec + b_dec, TV = Σ_b ‖x_b − x̄‖² the batch's total variance,
FVU = ‖x − x̂‖² / TV, MSE = (1/B) Σ_b ‖x_b − x̂_b‖².

- ``topk``, TopK + AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
  f = TopK_k(ReLU(pre)); loss = FVU + α·AuxK, where AuxK = s·‖e − ê‖² / Σ_b ‖e_b − ē‖² with
  e = x − x̂ (no gradient), ê the decode of the top-k_aux pre-activations among the dead latents
  and s = min(#dead / k_aux, 1). Resa trains with α = 0.
- ``batchtopk``, BatchTopK (Bussmann, Leask, Nanda 2024, "BatchTopK Sparse Autoencoders"):
  f = the k·B largest ReLU(pre) over the whole batch; loss = FVU.
- ``matryoshka_batchtopk``, Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda 2025,
  "Learning Multi-Level Features with Matryoshka Sparse Autoencoders"; Nabeshima 2024): with prefix
  sizes m_1 < … < m_n = d_sae, the latents [0, m_i) must reconstruct x on their own::

      x̂_i  = b_dec + Σ_{j < m_i} f_j · W_dec[j]
      loss = Σ_i ‖x − x̂_i‖² / TV        (= Σ_i FVU_i; n = 1 is BatchTopK's FVU loss)

  f is BatchTopK's selection over the whole dictionary. The prefix reconstructions are built
  incrementally, one block [m_{i−1}, m_i) of latents at a time, from the block's sparse (value,
  index) form through ``saetune.kernels.sparse_decode``, so each active latent is decoded once and
  the backward touches only active decoder rows (Triton on CUDA).
- ``standard``, ReLU + L1 (Bricken et al. 2023, "Towards Monosemanticity"; the penalty weighted by
  decoder row norms as in Anthropic's "Circuits Updates – April 2024" and SAELens' standard SAE,
  so shrinking f_j while growing ‖W_dec,j‖ cannot lower it): f = ReLU(pre);
  loss = MSE + λ₁·(1/B) Σ_b Σ_j f_bj ‖W_dec,j‖.
- ``jumprelu``, JumpReLU + L0 (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
  Fidelity with JumpReLU Sparse Autoencoders"): f = pre·H(pre − θ);
  loss = MSE + λ₀·(1/B) Σ_b Σ_j H(pre_bj − θ_j). H has no useful derivative, so θ learns through
  straight-through estimators with the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε:
  ∂JumpReLU/∂θ = −(θ/ε)·K((pre − θ)/ε) and ∂H(pre − θ)/∂θ = −(1/ε)·K((pre − θ)/ε)
  (:func:`jumprelu`, :func:`heaviside_l0`; ``SAE.encode`` uses :func:`jumprelu` too).

The TopK and BatchTopK selections and the sparse decodes go through the ``saetune.kernels`` ops
(Triton on CUDA, their torch twins elsewhere; ``saetune.kernels.dispatch`` decides per call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .metrics import fvu as fvu_of, mse as mse_of


# ---- straight-through estimators (Rajamanoharan et al. 2024) ------------------------------------

class _JumpReLU(torch.autograd.Function):
    """f = z·H(z−θ); ∂f/∂z = H(z−θ), ∂f/∂θ = −(θ/ε)·K((z−θ)/ε) with K the unit rectangle."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        rect = ((z - theta).abs() < eps / 2).to(g.dtype)
        d_theta = (-(theta / eps) * rect * g).reshape(-1, theta.shape[-1]).sum(0)
        return g * (z > theta), d_theta, None


class _StepL0(torch.autograd.Function):
    """L0 = Σ H(z−θ) with ∂/∂θ = −(1/ε)·K((z−θ)/ε) (no gradient to z)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        rect = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        d_theta = (-(1.0 / ctx.eps) * rect * g).reshape(-1, theta.shape[-1]).sum(0)
        return None, d_theta, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU f = pre·H(pre − θ) [..., d_sae]; gradient to pre where it fires, to θ (``threshold`` [d_sae])
    by the straight-through estimator −(θ/ε)·K((pre − θ)/ε), ε = ``bandwidth``."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def heaviside_l0(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(pre − θ) [..., d_sae] as a float tensor (its sum over latents is L0); no gradient to pre, to θ by the
    straight-through estimator −(1/ε)·K((pre − θ)/ε), ε = ``bandwidth``."""
    return _StepL0.apply(pre, threshold, bandwidth)


# ---- the losses ----------------------------------------------------------------------------------

def auxk_loss(x: Tensor, x_hat: Tensor, v_aux: Tensor, i_aux: Tensor, W_dec: Tensor, n_dead: int,
              k_aux: int) -> Tensor:
    """AuxK (Gao et al. 2024): s·‖e − ê‖² / Σ_b ‖e_b − ē‖², e = x − x̂ with no gradient, ê the decode of the
    dead latents' (value, index) [B, k_aux] ``v_aux``, ``i_aux`` (no b_dec), s = min(n_dead / k_aux, 1)."""
    from saetune.kernels import sparse_decode
    e = (x - x_hat).detach().float()  # (B, d)
    e_hat = sparse_decode(v_aux, i_aux, W_dec).float()  # (B, d)
    scale = min(n_dead / k_aux, 1.0)
    return scale * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)


def topk_loss(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int,
              total_variance: Tensor, dead: Tensor | None = None, k_aux: int = 0,
              auxk_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """TopK SAE: (loss, terms, v, i) for x [B, d_in]; v, i [B, k] are the active latents' values and indices.

    loss = ‖x − x̂‖² / TV (+ ``auxk_coef``·:func:`auxk_loss` over the top ``k_aux`` ≥ 1 dead latents of each row
    when ``dead`` [d_sae] marks any latent dead).
    ``total_variance`` is TV, given by the caller (over every process's rows when several train one SAE).
    terms: ``mse`` (detached), ``auxk`` (when used), ``fvu``. Without AuxK the whole SAE is one autograd node
    (``topk_autoencode``: the backward sorts the latents once); with it the encode also picks the top
    ``k_aux`` dead latents (``topk_encode``) and the decodes are separate (``sparse_decode``)."""
    from saetune.kernels import sparse_decode, topk_autoencode, topk_encode
    use_aux = dead is not None and bool(dead.any())
    if use_aux:
        v, i, v_aux, i_aux = topk_encode(x - b_dec, W_enc, b_enc, k, dead, k_aux)  # each (B, k) / (B, k_aux)
        x_hat = sparse_decode(v, i, W_dec) + b_dec  # (B, d)
    else:
        x_hat, v, i = topk_autoencode(x, W_enc, b_enc, W_dec, b_dec, k)
    sq = (x_hat.float() - x).pow(2).sum()
    fvu = loss = sq / total_variance.clamp_min(1e-12)
    terms = {"mse": sq.detach() / x.shape[0]}
    if use_aux:
        auxk = auxk_loss(x, x_hat, v_aux, i_aux, W_dec, int(dead.sum()), k_aux)
        loss = loss + auxk_coef * auxk
        terms["auxk"] = auxk
    terms["fvu"] = fvu
    return loss, terms, v, i


def _reconstruction_terms(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """(MSE, FVU) of a dense-latent SAE's reconstruction, in float32."""
    return mse_of(x, x_hat.float()), fvu_of(x, x_hat.float())


def batchtopk_loss(x: Tensor, pre: Tensor, W_dec: Tensor, b_dec: Tensor,
                   k: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """BatchTopK SAE: (loss = FVU, terms {mse, fvu}, f [B, d_sae]) with f the k·B largest ReLU(``pre``) of the
    batch (``saetune.kernels.batch_topk``)."""
    from saetune.kernels import batch_topk
    acts = batch_topk(pre, k)
    mse, fvu = _reconstruction_terms(x, acts @ W_dec + b_dec)
    return fvu, {"mse": mse.detach(), "fvu": fvu}, acts


def standard_loss(x: Tensor, pre: Tensor, W_dec: Tensor, b_dec: Tensor,
                  l1_coefficient: float) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """ReLU SAE with the decoder-norm-weighted L1 penalty: (loss, terms {mse, fvu}, f = ReLU(``pre``) [B, d_sae]),
    loss = MSE + λ₁·(1/B) Σ_b Σ_j f_bj ‖W_dec,j‖ with λ₁ = ``l1_coefficient``."""
    acts = pre.relu()
    mse, fvu = _reconstruction_terms(x, acts @ W_dec + b_dec)
    loss = mse + l1_coefficient * (acts * W_dec.norm(dim=1)).sum(-1).mean()
    return loss, {"mse": mse.detach(), "fvu": fvu}, acts


def jumprelu_loss(x: Tensor, pre: Tensor, threshold: Tensor, W_dec: Tensor, b_dec: Tensor, l0_coefficient: float,
                  bandwidth: float) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """JumpReLU SAE with the L0 penalty: (loss, terms {mse, fvu}, f = :func:`jumprelu` of ``pre`` [B, d_sae]),
    loss = MSE + λ₀·(1/B) Σ_b Σ_j H(pre_bj − θ_j) with λ₀ = ``l0_coefficient``; θ (``threshold``) learns through
    the straight-through estimators of bandwidth ε = ``bandwidth``."""
    acts = jumprelu(pre, threshold, bandwidth)
    mse, fvu = _reconstruction_terms(x, acts @ W_dec + b_dec)
    loss = mse + l0_coefficient * heaviside_l0(pre, threshold, bandwidth).sum(-1).mean()
    return loss, {"mse": mse.detach(), "fvu": fvu}, acts


# ---- Matryoshka: nested prefixes of one BatchTopK dictionary ----------------------------------------

def block_sparse(acts: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """(v, i) [B, c]: the non-zero activations of latents [lo, hi) of ``acts`` [B, n], c = the most
    any row has (rows with fewer are padded with value 0); ``i`` counts from ``lo``. ``v`` carries
    the gradient back to ``acts``."""
    from saetune.kernels import topk_select
    block = acts[:, lo:hi]  # (B, w)
    c = int((block.detach() != 0).sum(1).max()) if block.numel() else 0
    if c == 0:
        return block.new_zeros(block.shape[0], 0), torch.zeros(block.shape[0], 0, dtype=torch.long,
                                                                 device=block.device)
    # the c largest of a non-negative row are its non-zeros (and zeros as padding)
    _, i, _, _ = topk_select(block.detach().float().contiguous(), c)  # (B, c)
    i = i.long()
    return block.gather(1, i), i


def matryoshka_reconstructions(acts: Tensor, W_dec: Tensor, b_dec: Tensor, widths: list[int]) -> list[Tensor]:
    """[x̂_1, …, x̂_n], x̂_i = b_dec + acts[:, :m_i] · W_dec[:m_i], each [B, d_in]; x̂_n is the SAE's output."""
    from saetune.kernels import sparse_decode
    out, x_hat, lo = [], b_dec.expand(acts.shape[0], -1), 0
    for hi in widths:
        v, i = block_sparse(acts, lo, hi)
        if v.shape[1]:
            x_hat = x_hat + sparse_decode(v.to(W_dec.dtype), i, W_dec[lo:hi])  # (B, d) from block [lo, hi)
        out.append(x_hat)
        lo = hi
    return out


def _matryoshka_errors(x: Tensor, acts: Tensor, W_dec: Tensor, b_dec: Tensor, widths: list[int],
                       total_variance: Tensor | None) -> tuple[list[Tensor], Tensor, Tensor]:
    """([‖x − x̂_i‖² per prefix], TV clamped to ≥ 1e-12, x̂_n) in float32; shared by :func:`matryoshka_loss`
    and :func:`matryoshka_batchtopk_loss` so each term is computed once."""
    x = x.float()
    tv = (x - x.mean(0)).pow(2).sum() if total_variance is None else total_variance
    tv = tv.clamp_min(1e-12)
    recons = matryoshka_reconstructions(acts, W_dec, b_dec, widths)
    return [(x_hat.float() - x).pow(2).sum() for x_hat in recons], tv, recons[-1]


def matryoshka_loss(x: Tensor, acts: Tensor, W_dec: Tensor, b_dec: Tensor, widths: list[int],
                    total_variance: Tensor | None = None) -> tuple[Tensor, list[Tensor], Tensor]:
    """(loss, [FVU_i per prefix], x̂ of the whole dictionary) for ``x`` [B, d_in] and BatchTopK ``acts`` [B, d_sae].

    loss = Σ_i ‖x − x̂_i‖² / TV with TV = Σ_b ‖x_b − x̄‖² (``total_variance``, computed from ``x`` if None)."""
    sses, tv, x_hat = _matryoshka_errors(x, acts, W_dec, b_dec, widths, total_variance)
    fvus = [sse / tv for sse in sses]
    return torch.stack(fvus).sum(), fvus, x_hat


def matryoshka_batchtopk_loss(x: Tensor, pre: Tensor, W_dec: Tensor, b_dec: Tensor, k: int,
                              widths: list[int]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Matryoshka BatchTopK SAE: (loss = Σ_i FVU_i, terms, f [B, d_sae]) with f BatchTopK's selection from
    ``pre`` and the prefixes ``widths`` (:func:`matryoshka_loss`). terms: ``mse`` = ‖x − x̂_n‖² / B,
    ``fvu_<m_i>`` for every prefix but the whole dictionary (detached), ``fvu`` (of the whole dictionary's x̂)."""
    from saetune.kernels import batch_topk
    acts = batch_topk(pre, k)
    sses, tv, _ = _matryoshka_errors(x, acts, W_dec, b_dec, widths, None)
    fvus = [sse / tv for sse in sses]
    prefixes = {f"fvu_{width}": fv.detach() for width, fv in zip(widths[:-1], fvus)}
    mse = sses[-1].detach() / x.shape[0]
    return torch.stack(fvus).sum(), {"mse": mse, **prefixes, "fvu": fvus[-1]}, acts


# ---- BatchTopK's inference threshold ------------------------------------------------------------

@torch.no_grad()
def update_batch_topk_threshold_(threshold: Tensor, acts: Tensor, rate: float = 0.01) -> None:
    """θ ← (1 − rate)·θ + rate·min(acts > 0): BatchTopK's inference threshold, the running mean of the
    smallest kept activation (Bussmann et al. 2024; SAELens' ``topk_threshold_lr`` = 0.01)."""
    pos = acts[acts > 0]
    if pos.numel():
        threshold.mul_(1 - rate).add_(rate * pos.min().to(threshold.dtype))
