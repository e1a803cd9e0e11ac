"""Merge a LoRA adapter into its model: ``saetune merge``.

An adapter (a peft dir or a ``saetune tune`` run dir) + its base model → ``merged/``, a normal HF model dir with a
model card (base model, SAE hash, adapter hash, recipe). The SAE is dropped: it was only a training-time
bottleneck. The adapter helpers here (find an adapter, read the widths it expects, check a model against them) are
shared with ``saetune attach`` (:mod:`saetune.attach`), which transplants an adapter onto another model and merges
it with :func:`merge_adapter`.

(The module is ``merging``, not ``merge``: a submodule ``saetune.merge`` would shadow the public function
``saetune.merge`` once imported.)
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import opt
from .errors import SaetuneError
from .io import atomic_replace_dir, atomic_write_text, sha256_dir
from .runs import RunDir, record_path, resolve_recorded

ADAPTER_CONFIG = "adapter_config.json"


# ---- adapters ------------------------------------------------------------------------------

def resolve_adapter(path: str | Path) -> Path:
    """A peft adapter dir: ``path`` itself or ``path/adapter`` (a tune run dir)."""
    p = Path(path)
    for cand in (p, p / "adapter"):
        if (cand / ADAPTER_CONFIG).exists():
            return cand
    raise SaetuneError(f"{str(path)!r} holds no peft adapter ({ADAPTER_CONFIG} not found in it or in its "
                       "adapter/ subdir); pass an adapter dir or a `saetune tune` run dir")


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, int]]:
    """Adapted module path (as in the base model) → (in_features, out_features) the adapter expects."""
    from safetensors import safe_open
    f = adapter_dir / "adapter_model.safetensors"
    if not f.exists():
        raise SaetuneError(f"{str(adapter_dir)!r} has no adapter_model.safetensors (only safetensors adapters "
                           "are read; pickled .bin adapters are refused)")
    ins: dict[str, int] = {}
    outs: dict[str, int] = {}
    with safe_open(str(f), "pt") as sf:
        for key in sf.keys():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if not m:
                continue
            shape = sf.get_slice(key).get_shape()
            if m.group(2) == "A":
                ins[m.group(1)] = int(shape[1])
            else:
                outs[m.group(1)] = int(shape[0])
    return {k: (ins[k], outs.get(k, -1)) for k in sorted(ins)}


def check_adapter_fits(model: nn.Module, adapter_dir: Path) -> None:
    """Raise naming the first adapted module that is missing in ``model`` or has other widths."""
    modules = dict(model.named_modules())
    for path, (n_in, n_out) in adapter_shapes(adapter_dir).items():
        mod = modules.get(path)
        if mod is None:
            raise SaetuneError(f"the adapter adapts {path!r}, which this model does not have (it has "
                               f"{sum(1 for n in modules if n.endswith(path.rsplit('.', 1)[-1]))} modules named "
                               f"'{path.rsplit('.', 1)[-1]}'); adapter and model must share the adapted modules")
        have = (getattr(mod, "in_features", None), getattr(mod, "out_features", None))
        if have != (n_in, n_out):
            raise SaetuneError(f"the adapter's {path!r} maps {n_in} → {n_out} features, this model's maps "
                               f"{have[0]} → {have[1]}; the adapter needs a model with the same shapes there")


# ---- merging -------------------------------------------------------------------------------

def model_card(info: dict[str, Any]) -> str:
    """The README.md of a merged model dir: what it is made of, with hashes."""
    lines = ["---", "library_name: transformers", "tags: [saetune, sae-tuning, lora-merged]", "---", "",
             f"# {info.get('title', 'SAE-tuned model')}", "",
             "A LoRA adapter merged into its model with saetune. The SAE was a training-time bottleneck "
             "only; this model runs without it.", "", "| | |", "|---|---|"]
    for key in ("base_model", "adapter_trained_on", "adapter_sha256", "sae", "sae_sha256", "hook", "loss",
                "tune_run", "merged_sha256"):
        if info.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | `{info[key]}` |")
    if info.get("recipe"):
        lines += ["", "## Recipe (SAE-Tuning config)", "", "```yaml", info["recipe"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _tune_provenance(adapter_dir: Path) -> dict[str, Any]:
    """What the tune run that made ``adapter_dir`` recorded (empty when it is a bare adapter)."""
    run = adapter_dir.parent
    mf = run / "manifest.json"
    if not mf.exists():
        return {}
    m = json.loads(mf.read_text())
    if m.get("stage") != "tune":
        return {}
    res = m.get("results") or {}
    sae = (m.get("inputs") or {}).get("sae") or {}
    recipe = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else None
    return {"sae": resolve_recorded(sae.get("path"), run), "sae_sha256": sae.get("sha256"), "hook": res.get("hook"),
            "loss": res.get("loss"), "tune_run": str(run.resolve()), "recipe": recipe}


CARD_PATHS = ("base_model", "adapter_trained_on", "sae", "tune_run")


def recorded_card(card: dict[str, Any], where: Path, scope: Path) -> dict[str, Any]:
    """The model card's paths as a file in ``where`` records them (:func:`saetune.runs.record_path`)."""
    return {k: record_path(v, where, scope) if k in CARD_PATHS and isinstance(v, str) else v for k, v in card.items()}


def merge_adapter(model_name: str, adapter_dir: Path, dest: Path, dtype: str = "float32",
                  info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load ``model_name``, check and load the adapter, merge it, save an HF model dir at ``dest`` (atomic).

    ``dest`` is a run dir's ``merged/``: the card's paths are recorded relative to ``dest`` in its README.md
    and, in the card returned (for the manifest), relative to the run dir (:func:`recorded_card`).
    """
    from peft import PeftModel
    from .models import load_model
    model, tok = load_model(model_name, dtype=dtype, device="cpu")
    check_adapter_fits(model, adapter_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    tmp = dest.parent / f".tmp-{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    card = dict(info or {})
    card.update(base_model=model_name, adapter_sha256=sha256_dir(adapter_dir))
    atomic_write_text(tmp / "README.md", model_card(recorded_card(card, dest, dest.parent.parent)))
    atomic_replace_dir(tmp, dest)
    return recorded_card(card, dest.parent, dest.parent.parent)


@dataclass
class MergeConfig:
    """``saetune merge``: merge a LoRA adapter into its model and save an HF model dir (``merged/``)."""

    adapter: str = opt("", "peft adapter dir, or a `saetune tune` run dir (its adapter/)")
    model: str = opt("", "model to merge into (default: the adapter's own base model)")
    dtype: str = opt("float32", "dtype of the merged weights (float32, bfloat16, float16)")

    def __post_init__(self):
        if not self.adapter:
            raise SaetuneError("merge needs an adapter (adapter: an adapter dir or a tune run dir)")


def merge(cfg: MergeConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Merge ``cfg.adapter`` into its model; the run dir gets ``merged/`` with a model card."""
    from .models import resolve_model_path
    adapter_dir = resolve_adapter(cfg.adapter)
    recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    base = cfg.model or resolve_recorded(recorded, adapter_dir)
    if not base:
        raise SaetuneError(f"the adapter in {str(adapter_dir)!r} names no base model; pass model")
    try:
        resolve_model_path(base)  # before the run dir is made
    except SaetuneError as e:
        if cfg.model:
            raise
        raise SaetuneError(f"the adapter in {str(adapter_dir)!r} was trained on {recorded!r}, which cannot be "
                           f"loaded: {e}; pass model (the base model's dir)") from None
    run = RunDir.open(out, "merge", cfg, resume=resume, overwrite=overwrite, inputs=(base,))
    with run:  # a failure, Ctrl-C or SIGTERM is recorded in the run dir
        run.add_input("adapter", adapter_dir)
        with run.phase("merge"):
            card = merge_adapter(base, adapter_dir, run.path / "merged", cfg.dtype,
                                 dict(_tune_provenance(adapter_dir), title="SAE-tuned model (merged)"))
        card["merged_sha256"] = run.add_artifact("merged", "merged")
        run.finish(model_card=card)
        return card
