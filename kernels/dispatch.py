"""Which implementation of a kernel op runs: Triton on CUDA, plain torch elsewhere.

``SAETUNE_KERNELS`` forces one, and is read at every call (not only at import)::

    SAETUNE_KERNELS=torch    always the plain-torch reference path
    SAETUNE_KERNELS=triton   always the Triton kernels; on CPU tensors this needs
                             TRITON_INTERPRET=1 set before triton is first imported
    unset / "auto"           Triton for CUDA tensors when triton imports, torch otherwise

The CPU default stays torch even under ``TRITON_INTERPRET=1`` (the interpreter is orders of
magnitude slower); tests force the Triton path with ``SAETUNE_KERNELS=triton``.

This is the one place that picks a path. Every op ``<op>`` here has two implementations with its
signature: ``<op>_torch`` in a reference module (``topk_sae`` for the SAE ops, ``entropy`` for
``linear_entropy_logprob``) and ``<op>_triton`` in a ``triton_*`` module; ``<op>`` only picks and
calls one (``linear_entropy_logprob`` checks its arguments first). The ``triton_*`` modules (which
import triton at module level) are imported only inside a Triton branch; the references and
``launch`` never import triton (nor this module, when they load), so every op works where triton
is not installed (macOS, Windows, ARM Linux). CUDA tensors without triton take the torch path with a one-time
warning; ``SAETUNE_KERNELS=triton`` without it is a ``SaetuneError``.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from saetune.errors import SaetuneError

from .launch import interpreting

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    """Why ``import triton`` fails here (None when it works); the import is tried once."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # a missing package, or one that fails at import (no usable compiler, …)
        return f"{type(e).__name__}: {e}"
    return None


def triton_available() -> bool:
    return _triton_import_error() is None


@functools.lru_cache(maxsize=1)
def _warn_cuda_without_triton() -> None:
    warnings.warn(f"CUDA tensors but triton cannot be imported ({_triton_import_error()}): the saetune kernels "
                  "run their plain-torch path (same results, slower). Install triton, or set SAETUNE_KERNELS=torch "
                  "to silence this.", RuntimeWarning, stacklevel=3)


def requested() -> str:
    """The backend ``SAETUNE_KERNELS`` asks for, checked."""
    v = os.environ.get("SAETUNE_KERNELS", "auto").strip().lower() or "auto"
    if v not in BACKENDS:
        raise SaetuneError(f"SAETUNE_KERNELS={v!r} is not a kernel backend; valid: {', '.join(BACKENDS)}")
    return v


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` takes the Triton path (see the module docstring)."""
    want = requested()
    if want == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if want == "auto":
        if on_cuda and not triton_available():
            _warn_cuda_without_triton()  # once a process
            return False
        return on_cuda
    if not triton_available():
        raise SaetuneError(f"SAETUNE_KERNELS=triton but the triton package cannot be imported "
                           f"({_triton_import_error()}); install triton (Linux x86_64 only) or unset SAETUNE_KERNELS")
    if not on_cuda and not interpreting():
        raise SaetuneError("SAETUNE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1, set before triton is "
                           "first imported (the kernels then run in Triton's interpreter, slowly)")
    return True


# ---- the public ops: one signature, the path chosen per call -----------------------------------

def topk_autoencode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                    b_dec: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x̂, v, i of a TopK SAE in one autograd node (``topk_sae.TopKAutoencode`` or
    ``triton_sparse.TopKAutoencodeTriton``)."""
    if use_triton(x, W_enc, W_dec):
        from .triton_sparse import topk_autoencode_triton
        return topk_autoencode_triton(x, W_enc, b_enc, W_dec, b_dec, k)
    from .topk_sae import topk_autoencode_torch
    return topk_autoencode_torch(x, W_enc, b_enc, W_dec, b_dec, k)


def topk_encode(x_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                aux_mask: torch.Tensor | None = None, k_aux: int = 0):
    """(v, i, v_aux, i_aux): top-k encoder with sparse backward and the AuxK selection among ``aux_mask``."""
    if use_triton(x_in, W_enc):
        from .triton_sparse import topk_encode_triton
        return topk_encode_triton(x_in, W_enc, b_enc, k, aux_mask, k_aux)
    from .topk_sae import topk_encode_torch
    return topk_encode_torch(x_in, W_enc, b_enc, k, aux_mask, k_aux)


def sparse_decode(v: torch.Tensor, i: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j v[b,j] · W_dec[i[b,j]] → (B, d), without b_dec; backward from the k active rows only."""
    if use_triton(v, W_dec):
        from .triton_sparse import sparse_decode_triton
        return sparse_decode_triton(v, i, W_dec)
    from .topk_sae import sparse_decode_torch
    return sparse_decode_torch(v, i, W_dec)


def topk_select(pre: torch.Tensor, k: int, aux_mask: torch.Tensor | None = None, k_aux: int = 0):
    """(v, i, v_aux, i_aux): ReLU'd top-k per row of ``pre`` (B, n) and the AuxK top among ``aux_mask``."""
    if use_triton(pre):
        from .triton_topk import topk_select_triton
        return topk_select_triton(pre, k, aux_mask, k_aux)
    from .topk_sae import topk_select_torch
    return topk_select_torch(pre, k, aux_mask, k_aux)


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK activations: the k·B largest ReLU(pre) of the batch. The Triton path keeps every value
    ≥ the global threshold (ties at it included); the torch path, as ``SAE.batch_topk``, exactly k·B."""
    if use_triton(pre):
        from .triton_topk import batch_topk_triton
        return batch_topk_triton(pre, k)
    from .topk_sae import batch_topk_torch
    return batch_topk_torch(pre, k)


def sae_update(opt, sae, renorm: bool) -> None:
    """Optimiser step with decoder upkeep: one fused Triton pass (which itself falls back to the torch
    sweeps for an optimiser it does not fuse), or the three torch sweeps."""
    if use_triton(sae.W_dec):
        from .triton_optim import sae_update_triton
        sae_update_triton(opt, sae, renorm)
        return
    from .topk_sae import sae_update_torch
    sae_update_torch(opt, sae, renorm)


def linear_entropy_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           bias: torch.Tensor | None = None, temperature: float = 1.0,
                           ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy, logprob), both float32 [N], of softmax((hidden·weightᵀ + bias) / temperature) — maths in
    ``entropy``'s docstring; logprob 0 where ``targets`` is ``ignore_index``. Differentiable in hidden,
    weight and bias (both outputs). Triton on CUDA (logits never written), the chunked torch algorithm
    elsewhere (``SAETUNE_KERNELS`` overrides). Both paths check their inputs first (``entropy.check_inputs``)."""
    if use_triton(*[hidden, weight] + ([bias] if bias is not None else [])):
        from .triton_entropy import linear_entropy_logprob_triton
        return linear_entropy_logprob_triton(hidden, weight, targets, bias, temperature, ignore_index)
    from .entropy import linear_entropy_logprob_torch
    return linear_entropy_logprob_torch(hidden, weight, targets, bias, temperature, ignore_index)
