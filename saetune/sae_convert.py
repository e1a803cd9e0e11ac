"""A SAELens ``SAE`` object (``sae_lens.SAE.from_pretrained(...)``) as a :class:`saetune.SAE`.

The result shares the SAELens object's weight tensors (no copy: editing one edits the other) and
computes the same ``encode`` / ``decode``:

    pre = (x − b_dec) · W_enc + b_enc,   x̂ = f · W_dec + b_dec
    standard: f = ReLU(pre);  topk: f = TopK_k(ReLU(pre));  jumprelu: f = pre · 1[pre > θ]

SAELens options that change that maths (input normalisation, decoder-norm rescaling, head
reshaping, ``apply_b_dec_to_input=False``) and other architectures (gated, transcoders) are refused
with a sentence naming the option, never silently dropped.
"""

from __future__ import annotations

import weakref
from typing import Any

from .errors import SaetuneError
from .sae import SAE, SAEConfig

# SAELens option → the values whose maths saetune's SAE computes
_SUPPORTED_OPTIONS = {"apply_b_dec_to_input": (True,), "normalize_activations": ("none", None),
                      "rescale_acts_by_decoder_norm": (False,), "reshape_activations": ("none", None)}
_ARCHITECTURES = ("standard", "topk", "jumprelu")


def is_saelens_sae(obj: Any) -> bool:
    """Whether ``obj`` is an SAE object from the ``sae_lens`` package (checked by class, no import)."""
    return any(c.__module__.split(".")[0] == "sae_lens" for c in type(obj).__mro__) and hasattr(obj, "W_enc")


def from_saelens(sl_sae: Any) -> SAE:
    """A :class:`saetune.SAE` computing what the SAELens SAE ``sl_sae`` computes, sharing its weights.

    Its ``cfg.hook_name`` is SAELens' ``cfg.metadata.hook_name`` (e.g. ``blocks.8.hook_resid_pre``).
    """
    if not is_saelens_sae(sl_sae):
        raise SaetuneError(f"expected a sae_lens SAE object, got {type(sl_sae).__name__}")
    c = sl_sae.cfg
    arch = c.architecture() if callable(getattr(c, "architecture", None)) else getattr(c, "architecture", None)
    if arch not in _ARCHITECTURES:
        raise SaetuneError(f"SAELens architecture {arch!r} has no saetune equivalent; supported: "
                           f"{', '.join(_ARCHITECTURES)}")
    for key, ok in _SUPPORTED_OPTIONS.items():
        if hasattr(c, key) and getattr(c, key) not in ok:
            raise SaetuneError(f"SAELens option {key}={getattr(c, key)!r} is not supported by saetune's SAE "
                               f"(supported: {' or '.join(map(repr, ok))})")
    meta = getattr(c, "metadata", None)
    hook = getattr(meta, "hook_name", None) or ""
    if getattr(meta, "hook_name_out", None) not in (None, hook):
        raise SaetuneError(f"SAELens SAE reads {hook!r} and writes {meta.hook_name_out!r} (a transcoder); "
                           "only SAEs that read and write one hook are supported")
    if arch == "jumprelu" and bool((sl_sae.threshold < 0).any()):
        # SAELens computes ReLU(pre)·1[pre > θ], saetune pre·1[pre > θ]: equal only where θ ≥ 0
        raise SaetuneError("SAELens JumpReLU SAE has negative thresholds; saetune's JumpReLU (pre · 1[pre > θ]) "
                           "matches SAELens' (ReLU(pre) · 1[pre > θ]) only for θ ≥ 0")
    dtype = str(sl_sae.W_enc.dtype).removeprefix("torch.")
    cfg = SAEConfig(d_in=int(c.d_in), d_sae=int(c.d_sae), k=getattr(c, "k", None) if arch == "topk" else None,
                    architecture=arch, hook_name=hook, model_name=getattr(meta, "model_name", None) or "",
                    dtype=dtype)
    sae = SAE(cfg)
    own = dict(sae.named_parameters())
    theirs = dict(sl_sae.named_parameters())
    for name, p in own.items():
        if name not in theirs:
            raise SaetuneError(f"SAELens SAE lacks parameter {name!r}; it has: {', '.join(theirs)}")
        if theirs[name].shape != p.shape:
            raise SaetuneError(f"SAELens SAE parameter {name!r} has shape {tuple(theirs[name].shape)}, expected "
                               f"{tuple(p.shape)} for d_in={cfg.d_in}, d_sae={cfg.d_sae}")
        p.data = theirs[name].data  # share storage (device and dtype follow the SAELens SAE)
    return sae.train(sl_sae.training)


_CONVERTED: "weakref.WeakKeyDictionary[Any, SAE]" = weakref.WeakKeyDictionary()


def as_saetune(sl_sae: Any) -> SAE:
    """:func:`from_saelens`, converted once per SAELens object (again only if its tensors were replaced)."""
    done = _CONVERTED.get(sl_sae)
    if done is not None and all(p.data_ptr() == getattr(sl_sae, n).data_ptr() and p.shape == getattr(sl_sae, n).shape
                                for n, p in done.named_parameters()):
        return done
    done = _CONVERTED[sl_sae] = from_saelens(sl_sae)
    return done
