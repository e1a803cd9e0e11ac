"""Test-time attachment: merge an adapter into a model, transplant it onto another model, or
hook an SAE into a model while it runs.

- ``saetune merge``: adapter (peft dir or a ``saetune tune`` run dir) + its base model →
  ``merged/``, a normal HF model dir with a model card (base model, SAE hash, adapter hash,
  recipe). The SAE is dropped: it was only a training-time bottleneck.
- ``saetune attach``: "reasoning as an adapter" (Resa §4) — an adapter trained on model A loaded
  onto model B, checked module by module (every adapted module must exist in B with the same
  input and output widths; the first mismatch is named), then saved and merged.
- :func:`attach_sae`: an SAE as an inference hook — record feature activations while the model
  generates, replace the activation by the reconstruction, or steer chosen features.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .config import opt
from .errors import SaetuneError
from .io import atomic_replace_dir, atomic_write_text, sha256_dir
from .runs import RunDir, record_path, resolve_recorded
from .steering import (SAERecorder, Schedule, as_edits, intervene, parse_steer,  # noqa: F401 (re-exported)
                       steer_activation)

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


@dataclass
class AttachConfig:
    """``saetune attach``: put an adapter trained on one model onto another ("reasoning as an adapter"), save it
    and the merged model; or hook an SAE into a model and record (or steer) its features while generating."""

    model: str = opt("toy", "the model to attach to: 'toy', a local HF dir, or a hub id")
    adapter: str = opt("", "peft adapter dir or `saetune tune` run dir, trained on another model of the same shapes")
    merge: bool = opt(True, "also merge the adapter and save merged/ (a plain HF model dir)")
    dtype: str = opt("float32", "dtype of the model")
    sae: str = opt("", "instead of an adapter: an SAE (dir, train-sae run dir, or a pretrained release name, see "
                       "saetune.releases) hooked in while generating")
    sae_hook: str = opt("", "which SAE of a multi-hook dir, and where it hooks (default: its own hook name)")
    prompts: list[str] = opt(None, "prompts to generate from with the SAE attached", factory=list)
    max_new_tokens: int = opt(64, "tokens to generate per prompt (capped, with a warning, where prompt + response "
                                  "would pass the model's context; a prompt that fills the context is refused)")
    mode: Literal["record", "replace", "steer"] = opt("record", "SAE mode: record features only, replace the "
                                                                "activation by the reconstruction, or steer")
    steer: list[str] = opt(None, "steering as FEATURE=VALUE (clamp the feature's activation to VALUE)",
                           factory=list)
    add: list[str] = opt(None, "steering as FEATURE=ALPHA (add ALPHA times the feature's decoder direction)",
                         factory=list)
    schedule: str = opt("always", "where steering applies: always (prompt and every generated token), think "
                                  "(inside <think> … </think>), from:N (generated tokens N, N+1, …), tokens:N[@S] "
                                  "(N generated tokens from S); join with '+', e.g. think+tokens:200")
    top_features: int = opt(8, "features recorded per token (largest activations)")

    def __post_init__(self):
        if bool(self.adapter) == bool(self.sae):
            raise SaetuneError("attach needs exactly one of adapter (transplant an adapter) or sae (hook an SAE)")
        if self.sae and not self.prompts:
            raise SaetuneError("attaching an SAE needs prompts to generate from (prompts)")
        Schedule.parse(self.schedule)  # a bad schedule is named before any run dir is made
        as_edits(self.edits())

    def edits(self) -> list:
        """The steer (clamp) and add items as :class:`saetune.steering.LatentEdit` values."""
        from .steering import add, clamp
        return ([clamp(f, v) for f, v in parse_steer(self.steer).items()]
                + [add(f, a) for f, a in parse_steer(self.add).items()])


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
    try:
        run.add_input("adapter", adapter_dir)
        with run.phase("merge"):
            card = merge_adapter(base, adapter_dir, run.path / "merged", cfg.dtype,
                                 dict(_tune_provenance(adapter_dir), title="SAE-tuned model (merged)"))
        card["merged_sha256"] = run.add_artifact("merged", "merged")
        run.finish(model_card=card)
        return card
    except BaseException as e:
        run.fail_with(e)
        raise


def attach(cfg: AttachConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Transplant an adapter onto ``cfg.model`` (``adapter/`` and ``merged/``), or generate with an SAE hooked in
    (``features.jsonl``: per generated token, its top features)."""
    run = RunDir.open(out, "attach", cfg, resume=resume, overwrite=overwrite)
    try:
        result = _attach_adapter(cfg, run) if cfg.adapter else _attach_sae_run(cfg, run)
        run.finish(result=result)
        return result
    except BaseException as e:
        run.fail_with(e)
        raise


def _attach_adapter(cfg: AttachConfig, run: RunDir) -> dict:
    from .models import load_model
    src = resolve_adapter(cfg.adapter)
    run.add_input("adapter", src)
    trained_on = resolve_recorded(json.loads((src / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path"), src)
    with run.phase("check"):
        model, _ = load_model(cfg.model, dtype=cfg.dtype, device="cpu")
        check_adapter_fits(model, src)
        del model
    with run.phase("copy"):
        tmp = run.path / ".tmp-adapter"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        conf = json.loads((tmp / ADAPTER_CONFIG).read_text())
        conf["base_model_name_or_path"] = record_path(cfg.model, run.path / "adapter", scope=run.path.parent)
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(conf, indent=2))
        atomic_replace_dir(tmp, run.path / "adapter")
        run.add_artifact("adapter", "adapter")
    result: dict[str, Any] = {"model": record_path(cfg.model, run.path),
                              "adapter_trained_on": record_path(trained_on, run.path) if trained_on else None,
                              "adapted_modules": len(adapter_shapes(src))}
    if cfg.merge:
        with run.phase("merge"):
            card = merge_adapter(cfg.model, run.path / "adapter", run.path / "merged", cfg.dtype,
                                 dict(_tune_provenance(src), adapter_trained_on=trained_on,
                                      title="Adapter transplanted with saetune attach (merged)"))
        result["model_card"] = card
        result["merged_sha256"] = run.add_artifact("merged", "merged")
    return result


# ---- an SAE as an inference hook (the machinery lives in saetune.steering) ------------------------------------

def attach_sae(model: nn.Module, sae, hook: str | None = None, mode: str = "record",
               steer: dict[int, float] | None = None, top_k: int = 8,
               schedule: Schedule | None = None) -> contextlib.AbstractContextManager[SAERecorder]:
    """Hook ``sae`` into ``model`` at ``hook`` (default: the SAE's hook name) while the block runs.

    ``record``: the activation passes unchanged, features are recorded; ``replace``: the activation
    becomes x̂ = SAE(x); ``steer``: x + Σ_f (v_f − a_f)·W_dec[f] for the features in ``steer`` (a
    ``{feature: value}`` dict of clamps, or :func:`saetune.steering.clamp` / ``add`` edits). Every position by
    default; ``schedule`` limits it (:class:`saetune.steering.Schedule`). Works with generation and the KV cache
    (each decoding step records its new positions): :func:`saetune.steering.intervene` does the work.
    """
    if mode == "steer" and not steer:
        raise SaetuneError("mode 'steer' needs features to steer (steer={feature: value})")
    return intervene(model, sae, hook, steer if mode == "steer" else None, schedule, mode, top_k)


def context_budget(prompts: list[str], lengths: list[int], max_new_tokens: int,
                   max_positions: int | None) -> list[int]:
    """New tokens each prompt may generate: ``max_new_tokens``, capped (with a warning naming the prompt) where
    prompt + response would pass the model's ``max_positions``; a prompt that fills the context is refused."""
    import warnings
    from .generation import check_prompt_fits
    if not max_positions:
        return [max_new_tokens] * len(prompts)
    out = []
    for i, n in enumerate(lengths):
        check_prompt_fits(f"prompt {i}", n, max_positions)
        room = max_positions - n
        if room < max_new_tokens:
            warnings.warn(f"prompt {i} is {n} tokens long: with max_new_tokens {max_new_tokens} it would run past "
                          f"the model's {max_positions} positions, so it generates at most {room} new tokens",
                          stacklevel=3)
        out.append(min(max_new_tokens, room))
    return out


def _attach_sae_run(cfg: AttachConfig, run: RunDir) -> dict:
    from . import steering
    from .io import atomic_write_text as _write
    from .models import load_model
    from .sae import SAE
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    sae = SAE.load(cfg.sae, hook=cfg.sae_hook or None, device=str(next(model.parameters()).device))
    run.add_input("sae", cfg.sae)
    encoded = [tok(prompt, return_tensors="pt", verbose=False).input_ids for prompt in cfg.prompts]
    new_tokens = context_budget(cfg.prompts, [ids.shape[1] for ids in encoded], cfg.max_new_tokens,
                                getattr(model.config, "max_position_embeddings", None))
    edits, schedule = cfg.edits(), Schedule.parse(cfg.schedule)
    if cfg.mode == "steer" and not edits:
        raise SaetuneError("mode 'steer' needs features to steer (steer FEATURE=VALUE or add FEATURE=ALPHA)")
    rows = []
    with run.phase("generate"):
        for prompt, ids, max_new in zip(cfg.prompts, encoded, new_tokens):
            row = steering.generate(model, tok, ids[0].tolist(), sae, edits=edits if cfg.mode == "steer" else None,
                                    schedule=schedule, hook=cfg.sae_hook or None, max_new_tokens=max_new,
                                    top_k=cfg.top_features, mode=cfg.mode)[0]
            feats = [[(f, round(a, 4)) for f, a in row.features[p]] for p in range(len(row.ids))]
            rows.append({"prompt": prompt, "response": tok.decode(row.response_ids, skip_special_tokens=True),
                         "tokens": [tok.decode([t]) for t in row.ids], "features": feats,
                         "steered_positions": row.steered, "mode": cfg.mode, "steer": parse_steer(cfg.steer),
                         "add": parse_steer(cfg.add), "schedule": schedule.to_dict()})
    _write(run.path / "features.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    run.add_artifact("features", "features.jsonl")
    return {"prompts": len(rows), "mode": cfg.mode, "responses": [r["response"] for r in rows]}
