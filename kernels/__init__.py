"""saetune.kernels: SAE training ops and a fused entropy/log-prob, each fast path beside its torch reference.

Public ops (the path — Triton on CUDA, torch elsewhere, ``SAETUNE_KERNELS`` to force — is picked
per call by ``dispatch``): ``topk_autoencode`` (the whole TopK SAE in one autograd node), ``topk_encode``, ``sparse_decode``, ``topk_select``,
``batch_topk``, ``sae_update``, ``linear_entropy_logprob``.

Modules: ``topk_sae`` (torch reference of the sparse TopK ops), ``triton_topk`` (radix top-k,
AuxK, BatchTopK threshold), ``triton_sparse`` (gather decoder, latent-major backward),
``triton_optim`` (fused Adam / signum-schedule-free + decoder upkeep), ``entropy`` (fused linear
entropy/log-prob), ``dispatch``. Triton is imported only when a Triton path runs.
"""

from .dispatch import batch_topk, sae_update, sparse_decode, topk_autoencode, topk_encode, topk_select, use_triton

__all__ = ["batch_topk", "linear_entropy_logprob", "sae_update", "sparse_decode", "topk_autoencode", "topk_encode",
           "topk_select", "use_triton"]


def __getattr__(name):
    if name == "linear_entropy_logprob":  # imports triton (when present): only on first use
        from .entropy import linear_entropy_logprob
        return linear_entropy_logprob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
