"""SAELens-style analysis verbs on the models notebook users already have.

Works on a plain Hugging Face causal LM, a transformer-lens 3 ``TransformerBridge`` and a
transformer-lens ``HookedTransformer`` (any model whose classes come from ``transformer_lens``)::

    with saetune.saes(model, [sae]):                       # SAE spliced in for the block
        out = model(ids)
    logits, cache = saetune.run_with_cache(model, ids, saes=[sae], names_filter=["blocks.1.hook_mlp_out"])
    logits = saetune.run_with_saes(model, ids, saes=[sae])
    logits = saetune.run_with_hooks(model, ids, saes=[sae],
                                    fwd_hooks=[(f"{sae.cfg.hook_name}.hook_sae_acts_post", ablate)])

**Where an SAE sits.** Each SAE hooks at ``sae.cfg.hook_name``, or at the name given with it
(``[(hook, sae), …]`` or ``{hook: sae}``), in any spelling: HF module paths (``model.layers.12``,
``transformer.h.3``, ``model.layers.12.mlp``), TransformerLens names (``blocks.12.hook_resid_post``,
``hook_resid_pre``, ``hook_mlp_out``, ``hook_attn_out``), TransformerBridge names
(``blocks.12.hook_out``, ``hook_in``, ``mlp.hook_out``, ``attn.hook_out``) and sparsify names
(``layers.12``, ``layers.12.mlp``) all reach the same place on either kind of model. On a
transformer-lens model any name in ``model.hook_dict`` works too.

**What a spliced SAE computes** at its hook, on the activation x there (as SAELens'
``HookedSAETransformer`` / ``SAETransformerBridge``; each step is a hook point named
``{hook}.<step>``, where ``{hook}`` is the name the SAE was given — its ``cfg.hook_name`` or the
pair's / dict's key — exactly as spelled)::

    hook_sae_input     x                                    (in the SAE's dtype)
    hook_sae_acts_pre  pre = (x − b_dec) · W_enc + b_enc
    hook_sae_acts_post f = act(pre)                         (= sae.encode(x); d_sae wide)
    hook_sae_recons    x̂ = f · W_dec + b_dec               (= sae.decode(f))
    hook_sae_error     e = x − sae.decode(sae.encode(x))    (no gradient: a constant, as in SAELens)
    hook_sae_output    x̂ + e  with use_error_term=True,  x̂  with use_error_term=False

The output replaces the activation downstream. A hook on ``hook_sae_acts_post`` that edits f
(ablate, clamp, scale a latent; patch another run's f) changes x̂ and so the output; ``e`` is
always the unedited SAE's error, so with ``use_error_term=True`` the model runs exactly as without
the SAE except for the edit (x − Δf · W_dec). Hooks at the plain name (``model.layers.12``) see
the value after the SAE (what flows on).

Hooks follow TransformerLens' convention ``fn(tensor, hook) -> tensor | None`` (None keeps the
tensor, which the function may have changed in place); ``hook.name`` is the name it was
registered under. Every hook this module adds is removed when its call or ``with`` block ends,
also when it raises. Nested calls compose: ``run_with_cache`` inside ``with saes(...)`` records
the outer SAEs too; an inner SAE at the same place takes over until its block ends.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .errors import SaetuneError
from .hook_backends import Place, backend_for, hook_names, to_bridge  # noqa: F401 (re-exported)
from .sae import SAE
from .sae_convert import as_saetune, is_saelens_sae

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output")
_SAE_INNER = SAE_HOOKS[:4]  # a hook on one of these edits x̂, so the error must come from a clean re-encode
_SAE_SUFFIX = re.compile(r"(.+)\.(" + "|".join(SAE_HOOKS) + r")")

HookFn = Callable[[Tensor, Any], "Tensor | None"]


@dataclass(frozen=True)
class Hook:
    """What a hook function gets as its ``hook`` argument (TransformerLens passes a HookPoint)."""

    name: str

    def layer(self) -> int:
        """The block index in the name (``blocks.3.hook_mlp_out`` → 3), as TransformerLens' ``hook.layer()``."""
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", self.name)
        if m is None:
            raise SaetuneError(f"hook {self.name!r} names no layer")
        return int(m.group(1))


# ---- per-model hook state -------------------------------------------------------------------

@dataclass(eq=False)
class _Splice:
    label: str  # the name the SAE was given: {label}.hook_sae_* in caches and hook names
    sae: SAE
    use_error_term: bool


@dataclass(eq=False)
class PlaceState:
    """Everything hooked at one place of one model, across nested calls; one torch hook runs it all."""

    place: Place
    remove: Callable[[], None] | None = None
    refs: int = 0
    splices: list[_Splice] = field(default_factory=list)  # the last one is active
    hooks: list[tuple[str, str, HookFn]] = field(default_factory=list)  # (step or "", name as given, fn)
    caches: list[tuple["HookCache", list[str]]] = field(default_factory=list)  # (cache, plain names here)

    def __call__(self, x: Tensor) -> Tensor | None:
        changed = False
        if self.splices:
            x, changed = self._splice(self.splices[-1], x), True
        for step, name, fn in self.hooks:
            if step == "":
                r = fn(x, Hook(name))
                if r is not None:
                    x, changed = r, True
        for cache, names in self.caches:
            for name in names:
                cache._put(name, x, self.place.key, "")
        return x if changed else None

    def _fire(self, sp: _Splice, step: str, t: Tensor) -> Tensor:
        for s, name, fn in self.hooks:
            if s == step:
                r = fn(t, Hook(name))
                if r is not None:
                    t = r
        for cache, _ in self.caches:
            cache._put(f"{sp.label}.{step}", t, self.place.key, step)
        return t

    def _splice(self, sp: _Splice, x: Tensor) -> Tensor:
        sae = sp.sae
        _check_width(sae, x.shape[-1], sp.label, self.place)
        if x.device != sae.W_enc.device:
            raise SaetuneError(f"the SAE at {sp.label!r} is on {sae.W_enc.device} but the model's activations are "
                               f"on {x.device}; move it with sae.to({str(x.device)!r})")
        xs = x.to(sae.W_enc.dtype)  # (..., d_in)
        sae_in = self._fire(sp, "hook_sae_input", xs)
        pre = self._fire(sp, "hook_sae_acts_pre", sae.pre_acts(sae_in))  # (..., d_sae)
        post = self._fire(sp, "hook_sae_acts_post", encode_from_pre(sae, sae_in, pre))  # (..., d_sae)
        recons = self._fire(sp, "hook_sae_recons", sae.decode(post))  # (..., d_in)
        with torch.no_grad():
            edited = any(step in _SAE_INNER for step, _, _ in self.hooks)
            clean = sae.decode(sae.encode(xs)) if edited else recons
            error = xs - clean
        error = self._fire(sp, "hook_sae_error", error)
        out = recons + error if sp.use_error_term else recons
        return self._fire(sp, "hook_sae_output", out).to(x.dtype)


_STATE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, PlaceState]]" = weakref.WeakKeyDictionary()


def _acquire(stack: contextlib.ExitStack, backend, place: Place, hp: Any) -> PlaceState:
    """The state of ``place`` (hooked on first use); released, and unhooked when unused, as ``stack`` closes.

    ``hp`` (the backend's hook handle for the place) may be None when the place is already hooked.
    """
    states = _STATE.setdefault(backend.model, {})
    state = states.get(place.key)
    if state is None:
        if hp is None:
            raise SaetuneError(f"internal: place {place.name!r} is not hooked and no hook point was given")
        state = states[place.key] = PlaceState(place)
        state.remove = backend.attach(hp, state)
    state.refs += 1

    def release() -> None:
        state.refs -= 1
        if state.refs == 0:
            if state.remove is not None:
                state.remove()
            states.pop(place.key, None)
            if not states:
                _STATE.pop(backend.model, None)
    stack.callback(release)
    return state


def _remove_on_exit(stack: contextlib.ExitStack, items: list, item: Any) -> None:
    """Append ``item`` now; remove that very object (by identity: caches compare by content) on exit."""
    items.append(item)

    def remove() -> None:
        for i, it in enumerate(items):
            if it is item:
                del items[i]
                return
    stack.callback(remove)


def active_places(model: nn.Module) -> list[str]:
    """Places of ``model`` that saetune has hooked right now (empty outside every call and block)."""
    return [s.place.name for s in _STATE.get(model, {}).values()]


# ---- the maths that is not just SAE.encode / SAE.decode ------------------------------------------

def encode_from_pre(sae: SAE, x: Tensor, pre: Tensor) -> Tensor:
    """``sae.encode(x)`` with the pre-activation taken as ``pre`` (f = act(pre)), for an edited ``pre``.

    The activation rule (TopK, JumpReLU, BatchTopK θ, …) lives in ``SAE.encode``; this runs that very
    code with ``pre_acts`` answering ``pre``, so it cannot drift from it. With ``pre =
    sae.pre_acts(x)`` the result is ``sae.encode(x)`` bit for bit.
    """
    used = []

    def given(_x: Tensor) -> Tensor:
        used.append(True)
        return pre
    sae.pre_acts = given  # an instance attribute shadows the method for this one call
    try:
        f = sae.encode(x)
    finally:
        del sae.pre_acts
    if not used:
        raise SaetuneError(f"{type(sae).__name__}.encode does not go through pre_acts, so its pre-activations "
                           "cannot be hooked; hook hook_sae_acts_post instead")
    return f


def _check_width(sae: SAE, width: int, label: str, place: Place) -> None:
    if width != sae.d_in:
        where = repr(label) if label == place.name else f"{label!r} (the model's {place.name!r})"
        raise SaetuneError(f"the SAE for hook {where} has d_in={sae.d_in}, but the model's activation there is "
                           f"{width} wide; use an SAE trained at this hook of this model")


# ---- the verbs ----------------------------------------------------------------------------------

def _sae_list(saes: Any) -> list[tuple[str, SAE]]:
    """``saes`` as ``[(hook name as given, SAE)]``; SAELens SAE objects are converted (sharing weights)."""
    if saes is None:
        return []
    if isinstance(saes, Mapping):
        items: Iterable = list(saes.items())
    elif isinstance(saes, SAE) or is_saelens_sae(saes):
        items = [saes]
    elif isinstance(saes, tuple) and len(saes) == 2 and isinstance(saes[0], str):
        items = [saes]
    elif isinstance(saes, (list, tuple)):
        items = saes
    else:
        raise SaetuneError(f"saes must be an SAE, a list of SAEs or (hook, SAE) pairs, or a {{hook: SAE}} dict; "
                           f"got {type(saes).__name__}")
    out = []
    for n, item in enumerate(items):
        hook = None
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            hook, item = item
        if is_saelens_sae(item):
            item = as_saetune(item)
        if not isinstance(item, SAE):
            raise SaetuneError(f"saes[{n}] is a {type(item).__name__}, not a saetune.SAE or SAELens SAE")
        hook = hook or item.cfg.hook_name
        if not hook:
            raise SaetuneError(f"saes[{n}] has no cfg.hook_name; give its hook: saes=[(\"model.layers.12\", sae)] "
                               "or {\"model.layers.12\": sae}")
        out.append((hook, item))
    return out


def _splice_all(stack: contextlib.ExitStack, backend, saes: Any, use_error_term: bool) -> None:
    seen: dict[tuple, str] = {}
    for label, sae in _sae_list(saes):
        place, hp = backend.resolve(label)
        if place.key in seen:
            raise SaetuneError(f"two SAEs given for one hook point: {seen[place.key]!r} and {label!r} are both "
                               f"{place.name!r}; splice one SAE per hook")
        seen[place.key] = label
        if place.width is not None:
            _check_width(sae, place.width, label, place)
        trained = sae.cfg.hook_name
        if trained and trained != label:
            try:
                same = backend.resolve(trained)[0].key == place.key
            except SaetuneError:
                same = False
            if not same:
                import warnings
                warnings.warn(f"the SAE trained at {trained!r} is spliced at {label!r}, another hook point",
                              stacklevel=4)
        state = _acquire(stack, backend, place, hp)
        _remove_on_exit(stack, state.splices, _Splice(label, sae, bool(use_error_term)))


@contextlib.contextmanager
def saes(model: nn.Module, saes: Any = (), use_error_term: bool = False) -> Iterator[nn.Module]:
    """Within the block, each SAE replaces the activation at its hook by its output (see the module doc).

    ``saes``: SAEs (each at ``sae.cfg.hook_name``), ``(hook, sae)`` pairs, or ``{hook: sae}``;
    SAELens SAE objects are accepted. ``use_error_term=False``: the activation becomes x̂ = SAE(x);
    ``True``: x̂ + (x − x̂), the clean model's output, through which latent edits still act.
    Yields the model; every hook is removed on exit, also on an exception.
    """
    backend = backend_for(model)
    with contextlib.ExitStack() as stack:
        _splice_all(stack, backend, saes, use_error_term)
        yield model


def _split_sae_name(name: str) -> tuple[str, str]:
    """``"model.layers.2.hook_sae_acts_post"`` → ("model.layers.2", "hook_sae_acts_post"); plain → (name, "")."""
    m = _SAE_SUFFIX.fullmatch(name)
    return (m.group(1), m.group(2)) if m else (name, "")


def _resolve_step(backend, name: str) -> tuple[Place, Any, str]:
    base, step = _split_sae_name(name)
    place, hp = backend.resolve(base)
    if step:
        state = _STATE.get(backend.model, {}).get(place.key)
        if state is None or not state.splices:
            spliced = [s.splices[-1].label for s in _STATE.get(backend.model, {}).values() if s.splices]
            raise SaetuneError(f"hook {name!r} is inside an SAE, but no SAE is spliced at {base!r} in this run; "
                               f"SAEs spliced: {', '.join(spliced) or 'none'} (pass saes=[…])")
    return place, hp, step


def _expand(backend, spec: Any, what: str) -> list[str]:
    """A name, a list of names, or a predicate over names (model's names plus the spliced SAEs' steps)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    if callable(spec):
        names = backend.names() + [f"{s.splices[-1].label}.{step}" for s in _STATE.get(backend.model, {}).values()
                                   if s.splices for step in SAE_HOOKS]
        return [n for n in names if spec(n)]
    if isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec):
        return list(spec)
    raise SaetuneError(f"{what} must be a hook name, a list of hook names or a function name → bool; "
                       f"got {type(spec).__name__}")


def _add_hooks(stack: contextlib.ExitStack, backend, fwd_hooks: Any) -> None:
    if not fwd_hooks:
        return
    if not isinstance(fwd_hooks, (list, tuple)):
        raise SaetuneError(f"fwd_hooks must be a list of (name, fn) pairs, got {type(fwd_hooks).__name__}")
    for n, pair in enumerate(fwd_hooks):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and callable(pair[1])):
            raise SaetuneError(f"fwd_hooks[{n}] must be a (name, fn) pair with fn(tensor, hook) -> tensor or None")
        spec, fn = pair
        names = _expand(backend, spec, f"fwd_hooks[{n}]'s name")
        if callable(spec) and not names:
            raise SaetuneError(f"the name filter of fwd_hooks[{n}] matches no hook point of this model")
        for name in names:
            place, hp, step = _resolve_step(backend, name)
            state = _acquire(stack, backend, place, hp)
            _remove_on_exit(stack, state.hooks, (step, name, fn))


class HookCache(dict):
    """Activations by name, as ``run_with_cache`` returns them (a dict; tensors detached).

    Keys are the names as asked for (``names_filter``) and ``{hook}.hook_sae_*`` with ``{hook}`` each
    SAE's name as given. Looking a key up in another spelling of the same place works too:
    ``cache["blocks.2.hook_resid_post.hook_sae_acts_post"]`` finds ``model.layers.2.hook_sae_acts_post``.
    """

    def __init__(self, resolve: Callable[[str], Place]):
        super().__init__()
        self._resolve = resolve
        self._where: dict[tuple, str] = {}

    def _put(self, name: str, t: Tensor, place_key: tuple, step: str) -> None:
        self[name] = t.detach()
        self._where[(place_key, step)] = name

    def _alias(self, name: str) -> str | None:
        base, step = _split_sae_name(name)
        try:
            place = self._resolve(base)
        except SaetuneError:
            return None
        return self._where.get((place.key, step))

    def __missing__(self, name: str) -> Tensor:
        alias = self._alias(name) if isinstance(name, str) else None
        if alias is None:
            raise KeyError(f"{name!r} is not in the cache; it holds: {', '.join(self) or 'nothing'}")
        return self[alias]

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and self._alias(name) is not None)

    def get(self, name: Any, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __reduce__(self):
        return dict, (dict(self),)  # pickles / torch.saves as a plain dict of tensors


def run_with_cache(model: nn.Module, inputs: Any, saes: Any = (), names_filter: Any = None, *,
                   use_error_term: bool = False, fwd_hooks: Any = (), tokenizer: Any = None
                   ) -> tuple[Tensor, HookCache]:
    """Run ``model`` on ``inputs`` with ``saes`` spliced in; return ``(logits, cache)``.

    ``inputs``: token ids [B, T] or [T] (logits are then [1, T, V]), text or a list of texts (HF
    models: pass ``tokenizer=``; transformer-lens: ``model.tokenizer`` is used), or for a HF model a
    dict of forward arguments (``input_ids``, ``attention_mask``).

    The cache holds, for every SAE spliced in this run (these and any from an enclosing
    ``with saes(...)``), ``{hook}.hook_sae_input / _acts_pre / _acts_post / _recons / _error / _output``
    (meanings in the module doc; ``{hook}`` is the SAE's name as given), plus the model's activation
    at each hook ``names_filter`` asks for — a name, a list of names in any spelling (stored under
    that spelling) or a function name → bool (asked about :func:`hook_names`; on a transformer-lens
    model, its ``hook_dict``). Unlike TransformerLens, ``names_filter=None`` adds no model
    activations (on a large model "everything" is gigabytes; pass ``lambda name: True`` for that).
    At a hook with an SAE the model activation is the SAE's output (what flows on).
    ``fwd_hooks`` as in :func:`run_with_hooks` (the cache records the edited values).
    """
    backend = backend_for(model)
    cache = HookCache(lambda name: backend.resolve(name)[0])
    with contextlib.ExitStack() as stack:
        _splice_all(stack, backend, saes, use_error_term)
        _add_hooks(stack, backend, fwd_hooks)
        wanted: dict[tuple, tuple[Place, Any, list[str]]] = {}
        for name in _expand(backend, names_filter, "names_filter"):
            place, hp, step = _resolve_step(backend, name)
            if not step:  # SAE steps are always recorded
                wanted.setdefault(place.key, (place, hp, []))[2].append(name)
        for state in list(_STATE.get(model, {}).values()):
            if state.splices and state.place.key not in wanted:
                wanted[state.place.key] = (state.place, None, [])
        for place, hp, names in wanted.values():
            state = _acquire(stack, backend, place, hp)
            _remove_on_exit(stack, state.caches, (cache, names))
        logits = backend.forward(inputs, tokenizer)
    return logits, cache


def run_with_saes(model: nn.Module, inputs: Any, saes: Any = (), *, use_error_term: bool = False,
                  tokenizer: Any = None) -> Tensor:
    """Logits of ``model`` on ``inputs`` with ``saes`` spliced in (inputs as in :func:`run_with_cache`)."""
    backend = backend_for(model)
    with contextlib.ExitStack() as stack:
        _splice_all(stack, backend, saes, use_error_term)
        return backend.forward(inputs, tokenizer)


def run_with_hooks(model: nn.Module, inputs: Any, fwd_hooks: Any = (), saes: Any = (), *,
                   use_error_term: bool = False, tokenizer: Any = None) -> Tensor:
    """Logits of ``model`` on ``inputs`` with ``saes`` spliced in and ``fwd_hooks`` applied.

    ``fwd_hooks``: ``[(name, fn), …]``; ``name`` is a model hook (any spelling; ``fn`` sees the value
    that flows on, after any SAE there) or a spliced SAE's step ``{hook}.hook_sae_acts_post`` (any
    spelling of ``{hook}``), or a function name → bool; ``fn(tensor, hook) -> tensor | None`` as in
    TransformerLens. E.g. zero-ablate latent j:
    ``(f"{hook}.hook_sae_acts_post", lambda f, hook: f.index_fill(-1, torch.tensor([j]), 0))``.
    """
    backend = backend_for(model)
    with contextlib.ExitStack() as stack:
        _splice_all(stack, backend, saes, use_error_term)
        _add_hooks(stack, backend, fwd_hooks)
        return backend.forward(inputs, tokenizer)
