"""Shared set-up of the kernel tests. Without a GPU the Triton kernels run in Triton's interpreter,
which must be switched on before triton is first imported — importing this module first does it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

from saetune.kernels.dispatch import interpreting  # noqa: E402

NO_SHRINK = [Phase.generate]  # a failing example is reported as drawn: shrinking re-runs the slow interpreter
DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
TRITON_OK = interpreting() or torch.cuda.is_available()
FAST = settings(max_examples=6, deadline=None, database=None, phases=NO_SHRINK)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
