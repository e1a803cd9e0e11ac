"""Optimisers for SAE training and their pickle-free checkpoints.

- ``adam``: torch Adam (fused on CUDA), sparsify's default lr 2e-4 / √(n / 2¹⁴).
- ``signum_sf``: Resa's optimiser — sign-SGD, ``p ← p − lr·sign(g)`` (Bernstein et al. 2018),
  wrapped in schedule-free averaging (Defazio et al. 2024, package ``schedulefree``, momentum
  0.95), lr 5e-3 / √(n / 2¹⁴). Schedule-free keeps two sequences; the weights to save and
  evaluate are the averaged ones, reached with the wrapper's ``eval()``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

from .errors import SaetuneError
from .io import atomic_save_safetensors, atomic_write_json

OPTIMIZERS = ("signum_sf", "adam")


class SignSGD(Optimizer):
    """Steepest descent in the L∞ norm: p ← p − lr · sign(∇p)."""

    def __init__(self, params, lr: float = 1e-3):
        if lr <= 0:
            raise SaetuneError(f"learning rate must be positive, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def default_lr(optimizer: str, d_sae: int) -> float:
    """Width-scaled defaults of sparsify/Resa: c / √(d_sae / 2¹⁴)."""
    c = 5e-3 if optimizer == "signum_sf" else 2e-4
    return c / math.sqrt(d_sae / 2**14)


def build_optimizer(name: str, params, lr: float, momentum: float = 0.95):
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)  # fused kernels exist for CPU and CUDA
    if name == "signum_sf":
        from schedulefree import ScheduleFreeWrapper
        opt = ScheduleFreeWrapper(SignSGD(params, lr=lr), momentum=momentum)
        opt.train()
        return opt
    raise SaetuneError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def is_schedule_free(opt) -> bool:
    return hasattr(opt, "train_mode") and hasattr(opt, "base")


# ---- pickle-free optimiser state ------------------------------------------------------------

def save_optimizer(opt, path_prefix: Path) -> None:
    """Tensors of ``opt.state_dict()`` to ``<prefix>.safetensors``, the rest to ``<prefix>.json``."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        meta = {}
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val
                meta[key] = "tensor"
            else:
                meta[key] = val
        state_meta[str(pid)] = meta
    extra = {"param_groups": sd["param_groups"], "state": state_meta,
             "train_mode": getattr(opt, "train_mode", None)}
    atomic_save_safetensors(path_prefix.with_suffix(".safetensors"), tensors or {"_empty": torch.zeros(0)})
    atomic_write_json(path_prefix.with_suffix(".json"), extra)


def load_optimizer(opt, path_prefix: Path) -> None:
    from safetensors.torch import load_file
    extra = json.loads(path_prefix.with_suffix(".json").read_text())
    tensors = load_file(str(path_prefix.with_suffix(".safetensors")))
    state = {}
    for pid, meta in extra["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in meta.items()}
    opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
    if extra.get("train_mode") is not None:
        opt.train_mode = extra["train_mode"]
