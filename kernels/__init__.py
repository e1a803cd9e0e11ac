"""saetune.kernels: SAE training ops and a fused entropy/log-prob, each fast path beside its torch reference.

Public ops (the path — Triton on CUDA, torch elsewhere, ``SAETUNE_KERNELS`` to force — is picked
per call by ``dispatch``): ``topk_autoencode`` (the whole TopK SAE in one autograd node), ``topk_encode``, ``sparse_decode``, ``topk_select``,
``batch_topk``, ``sae_update``, ``linear_entropy_logprob``.

Modules: ``topk_sae`` (torch references of the SAE ops), ``entropy`` (fused linear entropy/log-prob:
autograd and torch path), ``launch`` (what dispatch, references and kernels share), ``dispatch``;
the Triton halves ``triton_topk`` (radix top-k, AuxK, BatchTopK threshold), ``triton_sparse``
(gather decoder, latent-major backward), ``triton_optim`` (fused Adam / signum-schedule-free +
decoder upkeep), ``triton_entropy``. Only dispatch imports a ``triton_*`` module, and only when a
Triton path runs: everything works where ``import triton`` fails.
"""

if __name__ != "saetune.kernels":  # found as a top-level `kernels` from a checkout root: see saetune/_checkout.py
    from saetune._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from .dispatch import batch_topk, sae_update, sparse_decode, topk_autoencode, topk_encode, topk_select, use_triton
    from .entropy import linear_entropy_logprob

    __all__ = ["batch_topk", "linear_entropy_logprob", "sae_update", "sparse_decode", "topk_autoencode", "topk_encode",
               "topk_select", "use_triton"]
