"""saetune.kernels: SAE training ops and a fused entropy/log-prob, each fast path beside its torch reference.

Public ops (the path — Triton on CUDA, torch elsewhere, ``SAETUNE_KERNELS`` to force — is picked
per call by ``dispatch``): ``topk_autoencode`` (the whole TopK SAE in one autograd node),
``topk_encode``, ``sparse_decode``, ``topk_select``, ``batch_topk``, ``sae_update``,
``linear_entropy_logprob``. Each op has one name; its two implementations are ``<op>_torch`` and
``<op>_triton``, with the op's signature.

Modules, per op (Liger-Kernel's layout, plus the torch path):

- ``dispatch``: the public ops and ``use_triton``; the only place a path is picked, and the only
  importer of the ``triton_*`` modules (inside a Triton branch).
- ``topk_sae``: the torch references of the SAE ops (``topk_autoencode_torch`` … ``sae_update_torch``,
  their autograd Functions, dense definitions). Never imports triton.
- ``entropy``: ``token_entropy`` (explicit logits; ``saetune.rl.entropy`` re-exports it) and the torch
  path of ``linear_entropy_logprob`` with the backward both paths share. Never imports triton.
- ``launch``: what references and kernels share, without triton (``empty``, ``next_pow2``, ``interpreting``).
- the Triton halves: ``triton_topk`` (radix top-k, AuxK, BatchTopK threshold), ``triton_sparse``
  (gather decoder, latent-major backward, the SAE autograd Functions), ``triton_optim`` (fused Adam /
  signum-schedule-free + decoder upkeep), ``triton_entropy``.

Imports go one way: ``dispatch`` → references and ``triton_*`` → ``launch``; a ``triton_*`` module
may import a reference (a fallback, a shared backward) but never ``dispatch``; the references never
import a ``triton_*`` module or ``saetune.rl``, nor ``dispatch`` when they load. Everything works where ``import triton`` fails.
"""

if __name__ != "saetune.kernels":  # found as a top-level `kernels` from a checkout root: see saetune/_checkout.py
    from saetune._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from .dispatch import (batch_topk, linear_entropy_logprob, sae_update, sparse_decode, topk_autoencode, topk_encode,
                           topk_select, use_triton)

    __all__ = ["batch_topk", "linear_entropy_logprob", "sae_update", "sparse_decode", "topk_autoencode", "topk_encode",
               "topk_select", "use_triton"]
