"""Helpers shared by every kernel launch: output buffers and block sizes.

Plain torch, no triton, no other kernels module: ``dispatch`` and the Triton modules import it, so
neither needs the other for these.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer a kernel must fill completely.

    With ``SAETUNE_POISON=1`` (tests) it is filled with NaN (floats) or -7 (ints) instead of left
    uninitialised, so an element a kernel forgets to write makes a comparison fail.
    """
    if os.environ.get("SAETUNE_POISON", "0") not in ("", "0"):
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1): Triton block shapes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())
