"""Test-time attachment: transplant an adapter onto another model, or hook an SAE into a model while it runs.

- ``saetune attach``: "reasoning as an adapter" (Resa §4) — an adapter trained on model A loaded
  onto model B, checked module by module (every adapted module must exist in B with the same
  input and output widths; the first mismatch is named), then saved and merged.
- :func:`attach_sae`: an SAE as an inference hook — record feature activations while the model
  generates, replace the activation by the reconstruction, or steer chosen features.

``saetune merge`` lives in :mod:`saetune.merging` (its names are re-exported here for old imports).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .config import opt
from .errors import SaetuneError
from .io import atomic_replace_dir, atomic_write_text
from .merging import (ADAPTER_CONFIG, MergeConfig, _tune_provenance, adapter_shapes,  # noqa: F401 (re-exported)
                      check_adapter_fits, merge, merge_adapter, model_card, resolve_adapter)
from .runs import RunDir, record_path, resolve_recorded
from .steering import (SAERecorder, Schedule, as_edits, intervene, parse_steer,  # noqa: F401 (re-exported)
                       steer_activation)


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
        from .steering import edits_from_items
        return edits_from_items(self.steer, self.add)


def attach(cfg: AttachConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Transplant an adapter onto ``cfg.model`` (``adapter/`` and ``merged/``), or generate with an SAE hooked in
    (``features.jsonl``: per generated token, its top features)."""
    run = RunDir.open(out, "attach", cfg, resume=resume, overwrite=overwrite)
    with run:  # a failure, Ctrl-C or SIGTERM is recorded in the run dir
        result = _attach_adapter(cfg, run) if cfg.adapter else _attach_sae_run(cfg, run)
        run.finish(result=result)
        return result


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
