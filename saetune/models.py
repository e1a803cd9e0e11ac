"""Load causal LMs and read or rewrite their activations at named hook points.

A hook point's canonical name is the HF module path of a decoder block, ``model.layers.12``,
meaning the block's output hidden state (resid_post) — what Resa and sparsify hook.
TransformerLens names (``blocks.12.hook_resid_post``, ``blocks.12.hook_mlp_out``,
``blocks.12.hook_attn_out``, ``blocks.12.hook_resid_pre``), their transformer-lens 3
``TransformerBridge`` spellings (``blocks.12.hook_out``, ``blocks.12.hook_in``,
``blocks.12.mlp.hook_out``, ``blocks.12.attn.hook_out``) and sparsify names (``layers.12``,
``layers.12.mlp``) map onto module paths. :func:`parse_standard_hook` and :func:`tl_hook_names`
translate the other way, for models that carry TransformerLens hook points
(see :mod:`saetune.hooked`).

A decoder layer may return a tensor (recent transformers) or a tuple whose first element is
the hidden state (older ones, many remote-code models): hooks handle both.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import SaetuneError

_LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers",
                "layers", "h", "blocks")
# the attention and MLP projections of a Llama / Qwen / Mistral decoder block: where LoRA goes unless a stage's
# target_modules says otherwise (saetune tune and saetune rl; Resa adapts all seven)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class HookPoint:
    """Where to read: ``module_path``'s output (or its input when ``site == 'resid_pre'``)."""

    name: str  # canonical name
    module_path: str
    layer: int  # index of the decoder block it belongs to
    site: str  # "block" | "mlp" | "attn" | "resid_pre" | "module"

    @property
    def is_input(self) -> bool:
        return self.site == "resid_pre"


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks and its module path (e.g. ``model.layers``)."""
    modules = dict(model.named_modules())
    for path in _LAYER_LISTS:
        m = modules.get(path)
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return path, m
    lists = [(p, m) for p, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise SaetuneError(f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList in it")
    return max(lists, key=lambda pm: sum(p.numel() for p in pm[1].parameters()))


def _sub_path(block: nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(block.named_children())
    for n in names:
        if n in children:
            return n
    return None


def valid_hook_names(model: nn.Module) -> list[str]:
    prefix, layers = decoder_layers(model)
    return [f"{prefix}.{i}" for i in range(len(layers))]


def _hook_help(model: nn.Module) -> str:
    prefix, layers = decoder_layers(model)
    n = len(layers)
    return (f"valid hook names: {prefix}.0 … {prefix}.{n - 1} (block outputs), "
            f"{prefix}.N.mlp, {prefix}.N.self_attn, or TransformerLens names blocks.N.hook_resid_post / "
            f"hook_resid_pre / hook_mlp_out / hook_attn_out (TransformerBridge: blocks.N.hook_out / hook_in / "
            f"mlp.hook_out / attn.hook_out), N in 0…{n - 1}")


# The four standard hook points: site → (TransformerLens name, transformer-lens 3 TransformerBridge name),
# each after ``blocks.N.``. The bridge also answers to the first spelling (its aliases).
TL_SITE_NAMES = {"block": ("hook_resid_post", "hook_out"), "resid_pre": ("hook_resid_pre", "hook_in"),
                 "mlp": ("hook_mlp_out", "mlp.hook_out"), "attn": ("hook_attn_out", "attn.hook_out")}
_TL_SUFFIX_SITE = {suffix: site for site, pair in TL_SITE_NAMES.items() for suffix in pair}
MLP_MODULE_NAMES = ("mlp", "feed_forward", "ffn")
ATTN_MODULE_NAMES = ("self_attn", "attn", "attention", "self_attention")


def parse_tl_hook(name: str) -> tuple[int, str] | None:
    """``(layer, site)`` of a TransformerLens / TransformerBridge name of a standard point, else None.

    ``blocks.3.hook_resid_post`` and ``blocks.3.hook_out`` → (3, "block"); ``blocks.3.hook_in`` →
    (3, "resid_pre"); ``blocks.3.mlp.hook_out`` → (3, "mlp"); ``blocks.3.hook_attn_out`` → (3, "attn").
    """
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m and m.group(2) in _TL_SUFFIX_SITE:
        return int(m.group(1)), _TL_SUFFIX_SITE[m.group(2)]
    return None


def parse_module_hook(name: str, prefixes: tuple[str, ...] = _LAYER_LISTS) -> tuple[int, str] | None:
    """``(layer, site)`` of a HF module path / sparsify name of a standard point, else None.

    ``model.layers.3`` / ``transformer.h.3`` / ``layers.3`` → (3, "block"); ``….3.mlp`` → (3, "mlp");
    ``….3.self_attn`` / ``….3.attn`` → (3, "attn"); deeper paths (``….3.mlp.down_proj``) → None.
    """
    for prefix in sorted(prefixes, key=len, reverse=True):
        m = re.fullmatch(re.escape(prefix) + r"\.(\d+)(?:\.(\w+))?", name)
        if not m:
            continue
        sub = m.group(2)
        if sub is None:
            return int(m.group(1)), "block"
        if sub in MLP_MODULE_NAMES:
            return int(m.group(1)), "mlp"
        if sub in ATTN_MODULE_NAMES:
            return int(m.group(1)), "attn"
        return None
    return None


def parse_standard_hook(name: str) -> tuple[int, str] | None:
    """``(layer, site)`` for any spelling of a standard point (HF path, sparsify, TL, TL3), else None."""
    return parse_tl_hook(name) or parse_module_hook(name)


def tl_hook_names(layer: int, site: str) -> tuple[str, str]:
    """The TransformerLens and TransformerBridge names of a standard point: ``(classic, bridge)``."""
    classic, bridge = TL_SITE_NAMES[site]
    return f"blocks.{layer}.{classic}", f"blocks.{layer}.{bridge}"


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Map a hook name in any accepted spelling to a :class:`HookPoint`, or explain what is valid."""
    prefix, layers = decoder_layers(model)
    n = len(layers)
    modules = dict(model.named_modules())

    def layer_index(s: str) -> int:
        i = int(s)
        if not 0 <= i < n:
            raise SaetuneError(f"hook {name!r} names layer {i}, but the model has {n} layers (0…{n - 1}); "
                               + _hook_help(model))
        return i

    tl = parse_tl_hook(name)
    if tl:
        i, kind = layer_index(str(tl[0])), tl[1]
        block = f"{prefix}.{i}"
        if kind == "block":
            return HookPoint(block, block, i, "block")
        if kind == "resid_pre":
            return HookPoint(f"blocks.{i}.hook_resid_pre", block, i, "resid_pre")
        sub = _sub_path(layers[i], MLP_MODULE_NAMES if kind == "mlp" else ATTN_MODULE_NAMES)
        if sub is None:
            raise SaetuneError(f"hook {name!r}: block {block} has no {'MLP' if kind == 'mlp' else 'attention'} "
                               f"submodule (children: {', '.join(dict(layers[i].named_children()))})")
        return HookPoint(f"{block}.{sub}", f"{block}.{sub}", i, kind)

    sp = re.fullmatch(r"layers\.(\d+)(\.(.+))?", name)
    if sp and prefix != "layers":
        rest = sp.group(3)
        i = layer_index(sp.group(1))
        name = f"{prefix}.{i}" + (f".{rest}" if rest else "")

    m = re.fullmatch(re.escape(prefix) + r"\.(\d+)(\.(.+))?", name)
    if m:
        i = layer_index(m.group(1))
        if m.group(3) is None:
            return HookPoint(name, name, i, "block")
        if name in modules:
            rest = m.group(3)
            site = "mlp" if rest in MLP_MODULE_NAMES else ("attn" if rest in ATTN_MODULE_NAMES else "module")
            return HookPoint(name, name, i, site)
    raise SaetuneError(f"unknown hook name {name!r}; " + _hook_help(model))


def first_tensor(out):
    """The hidden state in a module's output: the tensor itself, or a tuple's first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "__getitem__"):
        return out[0]
    raise TypeError(f"cannot find a hidden state in a module output of type {type(out).__name__}")


def replace_first(out, new: torch.Tensor):
    """``out`` with its hidden state replaced by ``new``, keeping the tuple shape if it had one."""
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    out[0] = new
    return out


class StopForward(Exception):
    """Raised from a hook once every requested activation is in hand (stops the forward early)."""


def _register(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register ``fn(hidden) -> replacement or None`` at ``hp``; returns the handle."""
    module = model.get_submodule(hp.module_path)
    if hp.is_input:
        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                if new is not None:
                    return (new,) + tuple(args[1:]), kwargs
            else:
                new = fn(kwargs["hidden_states"])
                if new is not None:
                    kwargs = dict(kwargs, hidden_states=new)
                    return args, kwargs
            return None
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod, args, out):
        new = fn(first_tensor(out))
        return None if new is None else replace_first(out, new)
    return module.register_forward_hook(hook)


@contextlib.contextmanager
def capture(model: nn.Module, hooks: list[HookPoint], stop_early: bool = False,
            detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the activation at each hook point into the yielded dict (name → [B, T, d]).

    With ``stop_early`` the forward raises :class:`StopForward` as soon as every hook has fired,
    so nothing after the deepest hooked layer is computed; call the model through
    :func:`run_to_hooks` (or catch StopForward yourself).
    """
    acts: dict[str, torch.Tensor] = {}
    wanted = {h.name for h in hooks}
    handles = []

    def make(hp: HookPoint):
        def fn(h: torch.Tensor):
            acts[hp.name] = h.detach() if detach else h
            if stop_early and wanted <= acts.keys():
                raise StopForward
            return None
        return fn

    try:
        for hp in hooks:
            handles.append(_register(model, hp, make(hp)))
        yield acts
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replace_activation(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, the activation at ``hp`` is replaced by ``fn(activation)``."""
    handle = _register(model, hp, fn)
    try:
        yield
    finally:
        handle.remove()


def run_to_hooks(model: nn.Module, input_ids: torch.Tensor, hooks: list[HookPoint],
                 attention_mask: torch.Tensor | None = None, stop_early: bool = True) -> dict[str, torch.Tensor]:
    """Forward ``input_ids`` and return the activations at ``hooks`` ([B, T, d] each).

    Stops after the deepest hooked layer when ``stop_early`` (the tail of the model is never run).
    """
    with torch.no_grad(), capture(model, hooks, stop_early=stop_early) as acts:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    missing = [h.name for h in hooks if h.name not in acts]
    if missing:
        raise SaetuneError(f"hooks {missing} never fired during the forward pass")
    return dict(acts)


# ---- loading ------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


def parse_dtype(name: str):
    if name not in _DTYPES:
        raise SaetuneError(f"unknown dtype {name!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str) -> str:
    """The device a stage's ``device`` option names: ``auto`` → :func:`default_device`; ``cpu``, ``cuda`` and
    ``cuda:N`` as given, refused when CUDA is asked for but not available here."""
    if device == "auto":
        return default_device()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SaetuneError(f"device {device!r} is not valid; valid: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaetuneError(f"device {device!r} asked for, but CUDA is not available here; use 'cpu' or 'auto'")
    return device


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``n`` = 0: leave the count as it is), then restore the
    previous count. A stage's ``threads`` option: float sums depend on the thread count, so a run that must be
    reproduced byte for byte (the toy build, RL on CPU) fixes it."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    u = urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def resolve_model_path(name: str) -> str:
    """``toy`` → the shipped toy base; a local dir → itself; a hub id → itself if reachable or cached.

    A hub id that is neither cached nor reachable fails at once with a clear message (no retry loop).
    """
    if name == "toy":
        from .toy import shipped_base_path
        return str(shipped_base_path())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise SaetuneError(f"model path {name!r} exists but holds no config.json; expected a Hugging Face "
                               "model dir (config.json + weights) or the name 'toy'")
        return str(p)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "/")):
        raise SaetuneError(f"model {name!r} is neither an existing directory, 'toy', nor a hub id like 'Qwen/Qwen2.5-1.5B'")
    if _in_hf_cache(name):
        return name
    if not _hub_reachable():
        raise SaetuneError(f"model {name!r} is not a local directory and the model hub is unreachable (no network "
                           "or HF_HUB_OFFLINE set); download it where there is network and pass its local path, "
                           "or use 'toy'")
    return name


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of a model dir or hub id, honouring a local dir's declared generic tokenizer class.

    transformers 5 overrides the declared class for some model types (a ``qwen2`` config always gets
    ``Qwen2Tokenizer``, which rebuilds a byte-level BPE from the vocab): for a dir whose
    ``tokenizer_config.json`` declares a plain ``tokenizer.json`` tokenizer (e.g. the toy's word-level
    one) that silently tokenizes differently, so such a dir is loaded as exactly that tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if (p / "tokenizer.json").exists() and (p / "tokenizer_config.json").exists():
        import json
        try:
            declared = json.loads((p / "tokenizer_config.json").read_text()).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            declared = None
        if declared in _GENERIC_TOKENIZER_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(name: str = "toy", dtype: str = "float32", device: str | None = None,
               trust_remote_code: bool = False):
    """Load a HF causal LM and its tokenizer by local path, hub id, or ``toy``. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    device = device or default_device()
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise next to saetune's own
    try:
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype),
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SaetuneError(f"could not load model {name!r}: {e}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise SaetuneError(f"model {name!r} needs custom code; pass trust_remote_code=True if you trust it") from None
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    return model, tok


def model_width(model: nn.Module, hp: HookPoint) -> int:
    """The activation width at ``hp`` (hidden size for block outputs)."""
    cfg = getattr(model, "config", None)
    if hp.site in ("block", "resid_pre", "mlp", "attn") and cfg is not None and hasattr(cfg, "hidden_size"):
        return int(cfg.hidden_size)
    raise SaetuneError(f"cannot tell the width of hook {hp.name!r}; run one forward to find it")
