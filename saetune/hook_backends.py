"""Where hooks go in the models notebook users already have: a plain Hugging Face causal LM, or a
transformer-lens model (a transformer-lens 3 ``TransformerBridge``, a ``HookedTransformer``).

A backend resolves a hook name in any spelling (HF module path, TransformerLens, TransformerBridge,
sparsify; see :mod:`saetune.models`) to a :class:`Place` — one place in the forward pass, the same
for every spelling of it — hooks a function ``x -> replacement or None`` there, lists the names a
``names_filter`` function is asked about, and runs the model on token ids or text. HF models are
hooked through :mod:`saetune.models` (module outputs, a block's input for resid_pre);
transformer-lens models through their own HookPoints (``model.hook_dict``), so TL's hooks compose.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .errors import SaetuneError
from .models import (ATTN_MODULE_NAMES, MLP_MODULE_NAMES, HookPoint, _register, decoder_layers, model_width,
                     parse_standard_hook, resolve_hook, tl_hook_names)


@dataclass(frozen=True)
class Place:
    """One place in a model's forward pass, whatever name reached it."""

    key: tuple  # identity of the place within its model
    name: str  # the model's own name for it (messages)
    width: int | None  # activation width when known before running


def is_transformer_lens(model: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "transformer_lens" for c in type(model).__mro__)


class HFBackend:
    """Plain torch modules: hooks via :mod:`saetune.models` (module outputs; a block's input for resid_pre)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def resolve(self, name: str) -> tuple[Place, HookPoint]:
        hp = resolve_hook(self.model, name)
        try:
            width = model_width(self.model, hp) if hp.site != "module" else None
        except SaetuneError:
            width = None
        return Place(("hf", hp.module_path, hp.is_input), hp.name, width), hp

    def attach(self, hp: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> Callable[[], None]:
        return _register(self.model, hp, fn).remove  # what replace_activation undoes on exit

    def names(self) -> list[str]:
        """Names a callable ``names_filter`` is asked about: each standard point as a HF path and as a TL name."""
        prefix, layers = decoder_layers(self.model)
        out = []
        for i, block in enumerate(layers):
            children = dict(block.named_children())
            out += [f"{prefix}.{i}", tl_hook_names(i, "resid_pre")[0], tl_hook_names(i, "block")[0]]
            for site, kinds in (("mlp", MLP_MODULE_NAMES), ("attn", ATTN_MODULE_NAMES)):
                child = next((c for c in kinds if c in children), None)
                if child is not None:
                    out += [f"{prefix}.{i}.{child}", tl_hook_names(i, site)[0]]
        return out

    def forward(self, inputs: Any, tokenizer: Any = None) -> Tensor:
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if _is_text(inputs):
            if tokenizer is None:
                raise SaetuneError("inputs are text, but a Hugging Face model needs its tokenizer: pass tokenizer=, "
                                   "or pass token ids [B, T]")
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            if len(texts) > 1 and tokenizer.pad_token_id is None:
                raise SaetuneError("several texts need padding, but the tokenizer has no pad token; set "
                                   "tokenizer.pad_token (e.g. = tokenizer.eos_token) or pass one text at a time")
            kwargs = dict(tokenizer(texts, return_tensors="pt", padding=len(texts) > 1))
        elif isinstance(inputs, Mapping):
            kwargs = dict(inputs)
        else:
            kwargs = {"input_ids": _as_ids(inputs)}
        kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        kwargs.setdefault("use_cache", False)
        out = self.model(**kwargs)
        return out.logits if hasattr(out, "logits") else out[0]


class TLBackend:
    """transformer-lens models: hooks on their HookPoints (``model.hook_dict``), so TL's own hooks compose."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.hook_dict = dict(model.hook_dict)
        self.n_layers = int(getattr(model.cfg, "n_layers", 0) or 0)
        self.d_model = getattr(model.cfg, "d_model", None)

    def resolve(self, name: str) -> tuple[Place, Any]:
        hp = self.hook_dict.get(name)
        if hp is None:
            parsed = parse_standard_hook(name)
            if parsed is not None:
                layer, site = parsed
                if not 0 <= layer < self.n_layers:
                    raise SaetuneError(f"hook {name!r} names layer {layer}, but the model has {self.n_layers} layers "
                                       f"(0…{self.n_layers - 1}); " + self._help(name))
                hp = next((self.hook_dict[n] for n in tl_hook_names(layer, site) if n in self.hook_dict), None)
        if hp is None:
            raise SaetuneError(f"unknown hook name {name!r}; " + self._help(name))
        canonical = hp.name or name
        std = parse_standard_hook(canonical)
        width = int(self.d_model) if std is not None and self.d_model else None
        return Place(("tl", canonical), canonical, width), hp

    def _help(self, name: str) -> str:
        n = self.n_layers
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
        return (f"valid hook names: blocks.N.hook_resid_pre / hook_resid_post / hook_mlp_out / hook_attn_out "
                f"(TransformerBridge: blocks.N.hook_in / hook_out / mlp.hook_out / attn.hook_out), HF paths "
                f"model.layers.N[.mlp|.self_attn] or transformer.h.N[.mlp|.attn], sparsify layers.N[.mlp], "
                f"N in 0…{n - 1}, or any of the model's {len(self.hook_dict)} hook points (model.hook_dict)"
                + (f"; close matches: {', '.join(close)}" if close else ""))

    def attach(self, hp: Any, fn: Callable[[Tensor], Tensor | None]) -> Callable[[], None]:
        # permanent: a TL reset_hooks() (e.g. in the model's own run_with_hooks) must not drop a splice mid-block
        hp.add_hook(lambda tensor, hook: fn(tensor), dir="fwd", is_permanent=True)
        handle = hp.fwd_hooks[-1]

        def remove() -> None:
            handle.hook.remove()
            hp.fwd_hooks[:] = [h for h in hp.fwd_hooks if h is not handle]
        return remove

    def names(self) -> list[str]:
        return list(self.hook_dict)

    def forward(self, inputs: Any, tokenizer: Any = None) -> Tensor:
        if _is_text(inputs):
            if getattr(self.model, "tokenizer", None) is None:
                raise SaetuneError(f"inputs are text, but this {type(self.model).__name__} has no tokenizer "
                                   "(model.tokenizer is None); pass token ids [B, T]")
            return self.model(inputs)
        if isinstance(inputs, Mapping):
            raise SaetuneError("a transformer-lens model takes token ids [B, T] or text, not a dict of inputs")
        ids = _as_ids(inputs).to(self.model.cfg.device or "cpu")
        return self.model(ids)


def backend_for(model: nn.Module) -> "HFBackend | TLBackend":
    if not isinstance(model, nn.Module):
        raise SaetuneError(f"expected a torch model (Hugging Face causal LM or transformer-lens model), "
                           f"got {type(model).__name__}")
    return TLBackend(model) if is_transformer_lens(model) else HFBackend(model)


def _is_text(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, str) for t in x))


def _as_ids(x: Any) -> Tensor:
    ids = torch.as_tensor(x)
    if ids.dtype not in (torch.int64, torch.int32):
        raise SaetuneError(f"token ids must be an integer tensor [B, T] or [T], got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise SaetuneError(f"token ids must be [B, T] or [T], got shape {tuple(ids.shape)}")
    return ids.long()


def to_bridge(model: nn.Module, tokenizer: Any = None) -> nn.Module:
    """Wrap a Hugging Face causal LM in a transformer-lens 3 ``TransformerBridge`` (its TL hook points).

    transformer-lens wraps the model's modules in place: use the returned bridge from then on (it
    computes the same logits), or pass ``copy.deepcopy(model)`` to keep the HF model as it was.
    The tokenizer is copied first (transformer-lens rewires the one it gets, e.g. its BOS token).
    Raises a sentence when the installed transformer-lens has no ``TransformerBridge`` (it came with
    transformer-lens 3).
    """
    try:
        import transformer_lens
    except ImportError:
        raise SaetuneError("transformer-lens is not installed; install transformer-lens>=3 for TransformerBridge, "
                           "or use the Hugging Face model directly (saetune hooks it as it is)") from None
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        version = getattr(transformer_lens, "__version__", "?")
        raise SaetuneError(f"transformer-lens {version} has no TransformerBridge (it came with transformer-lens 3); "
                           "upgrade to transformer-lens>=3, or use the Hugging Face model directly") from None
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
    return TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)


def hook_names(model: nn.Module) -> list[str]:
    """The names a callable ``names_filter`` is asked about for ``model`` (TL: ``model.hook_dict``)."""
    return backend_for(model).names()
