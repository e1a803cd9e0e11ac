"""Pretrained SAEs for reasoning models, by name: where they live, what they read, how they load.

``SAE.load(name, hook=...)`` takes a release name (or its hub repo id) as well as a path::

    sae = SAE.load("EleutherAI/sae-DeepSeek-R1-Distill-Qwen-1.5B-65k", hook="layers.12.mlp")

Files are looked for, in order: ``local_dir`` (when given to :func:`load`), the local Hugging Face
cache (``huggingface_hub`` snapshot, only the hook's sub-directory), then the hub (only when it is
reachable). Without network and without the files, one sentence says which command fetches them
and where to put them instead.

Every entry records the page its facts come from (``source``). Only what that page (or the
repository's file listing) shows is filled in; a field left ``None`` is read from the release's
own ``cfg.json`` at load time.

Layouts:

- ``sparsify`` (EleutherAI sparsify): one sub-directory per hook point, named after the module
  (``layers.12.mlp``: the MLP's output), each with ``cfg.json`` + ``sae.safetensors``.
- ``saelens``: one sub-directory per SAE id (``blocks.19.hook_resid_post``), each with
  ``cfg.json`` + ``sae_weights.safetensors``.
- ``pickle``: a pickled PyTorch file (``.pt``). Listed so that users know the release exists;
  saetune never unpickles (loading a pickle runs arbitrary code), so these are refused.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import SaetuneError
from .models import parse_standard_hook

WEIGHTS = {"sparsify": "sae.safetensors", "saelens": "sae_weights.safetensors"}


@dataclass(frozen=True)
class Release:
    """A published SAE (or set of per-hook SAEs) and how saetune reads it."""

    name: str  # registry name (the hub repo id where there is one)
    repo_id: str  # Hugging Face repo
    layout: Literal["sparsify", "saelens", "pickle"]
    base_model: str  # the model whose activations it reads
    hook_dirs: tuple[str, ...]  # sub-directories (or files) of the repo, one SAE each, as the release names them
    site: str  # what each SAE reads, in words
    loads: str  # how saetune loads it, in words
    source: str  # where these facts were checked
    d_in: int | None = None
    width: int | None = None  # latents per SAE (None: read from cfg.json)
    k: int | None = None  # active latents per token for TopK SAEs (None: not TopK, or read from cfg.json)
    architecture: str | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""

    def canonical_hook(self, sub: str) -> str:
        """The saetune hook name (HF module path) of one of ``hook_dirs``."""
        std = parse_standard_hook(sub.strip())
        if std is None or std[1] not in _SITE_MODULE:
            return sub
        return f"model.layers.{std[0]}{_SITE_MODULE[std[1]]}"

    def hook_dir(self, hook: str | None) -> str:
        """The sub-directory holding the SAE for ``hook`` (release, saetune, sparsify or TransformerLens spelling)."""
        if hook is None:
            if len(self.hook_dirs) == 1:
                return self.hook_dirs[0]
            raise SaetuneError(f"release {self.name!r} holds SAEs for {len(self.hook_dirs)} hooks; pass hook= one "
                               f"of: {_preview(self.hook_dirs)}")
        want = _hook_key(hook)
        for sub in self.hook_dirs:
            if _hook_key(sub) == want:
                return sub
        raise SaetuneError(f"release {self.name!r} has no SAE for hook {hook!r}; it holds: {_preview(self.hook_dirs)}")


def _preview(items: tuple[str, ...], n: int = 6) -> str:
    return ", ".join(items) if len(items) <= n else f"{', '.join(items[:3])}, …, {', '.join(items[-2:])}"


def _hook_key(name: str) -> tuple[int, str] | str:
    """What two spellings of one hook share: ``(layer, site)`` for a standard point, else the stripped name."""
    s = name.strip()
    return parse_standard_hook(s) or s


# HF module path (Llama / Qwen naming) after ``model.layers.N`` of each standard site that has a module
_SITE_MODULE = {"block": "", "mlp": ".mlp", "attn": ".self_attn"}


RELEASES: dict[str, Release] = {r.name: r for r in [
    Release(
        name="EleutherAI/sae-DeepSeek-R1-Distill-Qwen-1.5B-65k",
        repo_id="EleutherAI/sae-DeepSeek-R1-Distill-Qwen-1.5B-65k",
        layout="sparsify",
        base_model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        hook_dirs=tuple(f"layers.{i}.mlp" for i in range(28)),
        site="MLP output of each decoder block (sparsify hook layers.N.mlp); the SAE Resa's reference code "
             "hooks into the block output model.layers.N",
        loads="SAE.load(name, hook='layers.N.mlp'): cfg.json + sae.safetensors (TopK, sparsify layout)",
        source="https://huggingface.co/EleutherAI/sae-DeepSeek-R1-Distill-Qwen-1.5B-65k",
        d_in=1536, width=65536, k=32, architecture="topk",
        aliases=("eleuther-r1-distill-qwen-1.5b-65k", "resa-r1-distill-qwen-1.5b"),
        note="one sub-directory per layer (layers.0.mlp … layers.27.mlp), 806 MB of fp32 weights each "
             "(2 · 65,536 · 1,536 · 4 bytes); k = 32 as its SaeConfig reads (cfg.json decides at load)"),
    Release(
        name="andreuka18/deepseek-r1-distill-llama-8b-lmsys-openthoughts",
        repo_id="andreuka18/deepseek-r1-distill-llama-8b-lmsys-openthoughts",
        layout="saelens",
        base_model="deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        hook_dirs=("blocks.19.hook_resid_post",),
        site="residual stream after decoder block 19 (SAELens blocks.19.hook_resid_post = model.layers.19)",
        loads="SAE.load(name): cfg.json + sae_weights.safetensors (SAELens layout; architecture from cfg.json)",
        source="https://github.com/AIRI-Institute/SAE-Reasoning (README 'Artifacts'; Galichin et al. 2025, "
               "arXiv:2503.18878)",
        d_in=4096,
        aliases=("airi-r1-distill-llama-8b-l19",),
        note="trained with SAELens on LMSYS-Chat-1M + OpenThoughts-114k; width and architecture are read from "
             "cfg.json"),
    Release(
        name="Goodfire/DeepSeek-R1-SAE-l37",
        repo_id="Goodfire/DeepSeek-R1-SAE-l37",
        layout="pickle",
        base_model="deepseek-ai/DeepSeek-R1",
        hook_dirs=("math/DeepSeek-R1-SAE-l37.pt",),
        site="layer 37 of DeepSeek-R1 (671B)",
        loads="refused: a pickled PyTorch file",
        source="https://github.com/goodfire-ai/r1-interpretability",
        aliases=("goodfire-r1-l37-math",),
        note="two SAEs (general reasoning and math) for the 671B model; shipped as .pt pickles with Goodfire's "
             "own loader"),
    Release(
        name="qresearch/DeepSeek-R1-Distill-Llama-8B-SAE-l19",
        repo_id="qresearch/DeepSeek-R1-Distill-Llama-8B-SAE-l19",
        layout="pickle",
        base_model="deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        hook_dirs=("DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt",),
        site="layer 19 of DeepSeek-R1-Distill-Llama-8B",
        loads="refused: a pickled PyTorch file",
        source="https://huggingface.co/qresearch/DeepSeek-R1-Distill-Llama-8B-SAE-l19",
        aliases=("qresearch-r1-distill-llama-8b-l19",),
        note="final L0 93 per its model card; one 2.15 GB .pt pickle"),
]}

_ALIASES = {a.lower(): r.name for r in RELEASES.values() for a in (r.name, r.repo_id, *r.aliases)}


def known() -> list[str]:
    """Registry names, sorted."""
    return sorted(RELEASES)


def find(name: str) -> Release | None:
    """The release called ``name`` (its name, hub repo id or an alias; case-insensitive), or None."""
    key = _ALIASES.get(str(name).strip().lower())
    return RELEASES[key] if key else None


def get(name: str) -> Release:
    """The release called ``name``; an unknown name is an error that lists the known ones."""
    rel = find(name)
    if rel is None:
        raise SaetuneError(f"unknown SAE release {name!r}; known releases: {', '.join(known())}")
    return rel


def _looks_like_name(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s)) and not s.startswith((".", "/", "~"))


# ---- finding the files ---------------------------------------------------------------------------

def _snapshot_download(repo_id: str, allow_patterns: list[str], local_files_only: bool) -> str:
    """``huggingface_hub.snapshot_download`` (one seam, so tests can stand in for the hub)."""
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=local_files_only)


def _hub_reachable() -> bool:
    from .models import _hub_reachable as reachable
    return reachable()


def _complete(d: Path, layout: str) -> bool:
    return (d / "cfg.json").is_file() and (d / WEIGHTS[layout]).is_file()


def _fetch_hint(rel: Release, sub: str) -> str:
    files = f"cfg.json and {WEIGHTS[rel.layout]}"
    return (f"on a machine with network run `huggingface-cli download {rel.repo_id} --include '{sub}/*'` (the cache "
            f"is then used offline), or put {files} in DIR/{sub}/ and pass local_dir=DIR to saetune.releases.load")


def release_files(rel: Release, hook: str | None = None, local_dir: str | Path | None = None) -> Path:
    """The local dir holding ``rel``'s SAE for ``hook`` (cfg.json + weights): ``local_dir``, else the HF cache,
    else a download when the hub is reachable; otherwise one sentence saying where to put the files."""
    if rel.layout == "pickle":
        raise SaetuneError(f"release {rel.name!r} is a pickled PyTorch file ({rel.hook_dirs[0]}); saetune never "
                           "unpickles (it can run arbitrary code), so convert it to safetensors in SAELens layout "
                           f"(cfg.json + {WEIGHTS['saelens']}) with its authors' loader and load that dir")
    sub = rel.hook_dir(hook)
    if local_dir is not None:
        root = Path(local_dir).expanduser()
        for cand in (root / sub, root):
            if _complete(cand, rel.layout):
                return cand
        raise SaetuneError(f"local_dir {str(root)!r} does not hold release {rel.name!r}'s SAE for {sub}: expected "
                           f"cfg.json and {WEIGHTS[rel.layout]} in {str(root / sub)!r}")
    patterns = [f"{sub}/*"]
    try:
        cached = Path(_snapshot_download(rel.repo_id, patterns, local_files_only=True)) / sub
        if _complete(cached, rel.layout):
            return cached
    except Exception:  # not cached (LocalEntryNotFoundError and friends): try the hub below
        pass
    if not _hub_reachable():
        raise SaetuneError(f"release {rel.name!r} (hook {sub}) is not in the local Hugging Face cache and the hub "
                           f"cannot be reached; {_fetch_hint(rel, sub)}")
    try:
        got = Path(_snapshot_download(rel.repo_id, patterns, local_files_only=False)) / sub
    except Exception as e:
        raise SaetuneError(f"downloading release {rel.name!r} (hook {sub}) failed ({type(e).__name__}: {e}); "
                           f"{_fetch_hint(rel, sub)}") from None
    if not _complete(got, rel.layout):
        raise SaetuneError(f"release {rel.name!r} downloaded, but {str(got)!r} lacks cfg.json or "
                           f"{WEIGHTS[rel.layout]}; the repo's layout may have changed (see {rel.source})")
    return got


def _check_cfg(rel: Release, d: Path) -> None:
    """Refuse files whose widths contradict the registry; warn on another k."""
    try:
        cfg = json.loads((d / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # SAE.load names the unreadable file
    if not isinstance(cfg, dict):
        return
    width = cfg.get("num_latents") or cfg.get("d_sae")
    d_in = cfg.get("d_in")
    for what, want, have in (("width", rel.width, width), ("d_in", rel.d_in, d_in)):
        if want is not None and have is not None and int(have) != want:
            raise SaetuneError(f"{str(d / 'cfg.json')!r} says {what} {have}, but release {rel.name!r} has {what} "
                               f"{want}; these are not that release's files")
    if rel.k is not None and cfg.get("k") is not None and int(cfg["k"]) != rel.k:
        warnings.warn(f"release {rel.name!r} is listed with k={rel.k}, its cfg.json says k={cfg['k']}; using "
                      "cfg.json", stacklevel=3)


def resolve_release(path_or_release: str | Path, hook: str | None = None,
                    local_dir: str | Path | None = None) -> Path:
    """What ``SAE.load`` reads: an existing path as it is; a release name → the local dir of its SAE for ``hook``.

    A string that is neither an existing path nor a known release, and could be a name, is an error listing
    the known releases; any other missing path is returned for ``SAE.load`` to report.
    """
    p = Path(path_or_release).expanduser()
    if p.exists():
        return p
    name = str(path_or_release)
    rel = find(name)
    if rel is None:
        if _looks_like_name(name):
            raise SaetuneError(f"SAE path {name!r} does not exist, and it is not a known SAE release either; known "
                               f"releases: {', '.join(known())}")
        return p
    d = release_files(rel, hook, local_dir)
    _check_cfg(rel, d)
    return d


def load(name: str, hook: str | None = None, local_dir: str | Path | None = None, device: str = "cpu"):
    """The SAE of release ``name`` at ``hook`` (see :func:`release_files` for where the files come from)."""
    from .sae import SAE
    rel = get(name)
    d = release_files(rel, hook, local_dir)
    _check_cfg(rel, d)
    sae = SAE.load(d, hook=rel.hook_dir(hook) if rel.layout == "sparsify" else None, device=device)
    if not sae.cfg.model_name:
        sae.cfg.model_name = rel.base_model
    return sae


def table() -> list[dict[str, Any]]:
    """One row per release (for docs and notebooks)."""
    return [{"release": r.name, "layout": r.layout, "base model": r.base_model,
             "hooks": _preview(r.hook_dirs, 2), "width": r.width, "k": r.k, "loads": r.loads, "source": r.source}
            for r in RELEASES.values()]
