"""saetune.kernels: SAE training ops and a fused entropy/log-prob, each fast path beside its torch reference.

Public ops (the path — Triton on CUDA, torch elsewhere, ``SAETUNE_KERNELS`` to force — is picked
per call by ``dispatch``): ``topk_autoencode`` (the whole TopK SAE in one autograd node), ``topk_encode``, ``sparse_decode``, ``topk_select``,
``batch_topk``, ``sae_update``, ``linear_entropy_logprob``.

Modules: ``topk_sae`` (torch reference of the sparse TopK ops), ``triton_topk`` (radix top-k,
AuxK, BatchTopK threshold), ``triton_sparse`` (gather decoder, latent-major backward),
``triton_optim`` (fused Adam / signum-schedule-free + decoder upkeep), ``entropy`` (fused linear
entropy/log-prob), ``dispatch``. Triton is imported only when a Triton path runs.
"""

if __name__ != "saetune.kernels":  # found as a top-level `kernels` from a checkout root: see saetune/_checkout.py
    from saetune._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from saetune._lazy import lazy_exports

    from .dispatch import batch_topk, sae_update, sparse_decode, topk_autoencode, topk_encode, topk_select, use_triton

    # linear_entropy_logprob imports triton (when present): only on first use
    __getattr__, __dir__ = lazy_exports(__name__, globals(), {"linear_entropy_logprob": "saetune.kernels.entropy"})

    __all__ = ["batch_topk", "linear_entropy_logprob", "sae_update", "sparse_decode", "topk_autoencode", "topk_encode",
               "topk_select", "use_triton"]
