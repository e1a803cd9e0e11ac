"""``saetune eval-sae``: SAEBench's core metrics and one quality table, for any SAE on any model.

One or several SAEs (saetune's or SAELens's layout, sparsify's, a train-sae run dir, or a dir of one SAE per
hook) are spliced into one model at their hook (or ``--hook``) on the same evaluation tokens; each gets the
metrics of :mod:`saetune.sae_quality` (SAEBench 0.5.0's core eval, ``sae_bench/evals/core/main.py``
@ 10e0728: ``ce_loss_score`` against zero ablation, ``kl_div_score`` with KL(clean ‖ spliced) as the code
computes it, explained variance, L0, fraction alive, feature-density statistics), plus sparse-probing accuracy
(:mod:`saetune.probing`, on by default for the toy model) and MCC / F1 against a synthetic ground truth
(:mod:`saetune.ground_truth`, ``--ground-truth DIR``) when available. The run dir holds ``results.json``
(one entry per SAE), the table as ``quality.md`` and ``quality.csv``, and each SAE's per-latent firing
density in ``feature_density.safetensors`` (its log10 histogram is in ``results.json``).

:func:`core_eval` is the one loop that runs the model for these metrics; ``train-sae`` calls it too.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch

from .config import opt
from .data import DataConfig
from .errors import SaetuneError
from .sae_quality import SAEBENCH_SOURCE, CoreMetrics, keep_mask, reference_terms

STAGE = "eval-sae"


@dataclass
class EvalSAEConfig(DataConfig):
    """``saetune eval-sae``: SAEBench's core metrics and one quality table for one or several SAEs."""

    sae: list[str] = opt(None, "SAEs to evaluate, side by side: SAE dirs (saetune / SAELens or sparsify layout), "
                               "train-sae run dirs (their sae/), or dirs holding one SAE per hook (each SAE in "
                               "it is a row)", factory=list)
    model: str = opt("", "model the SAEs are spliced into: 'toy', a local HF dir or a hub id; empty = the model "
                         "the first SAE records (its train-sae run, or its cfg.json's model_name)")
    hook: str = opt("", "hook point for every SAE (e.g. model.layers.2); empty = each SAE's own hook_name")
    n_tokens: int = opt(20480, "evaluation tokens: whole context_size chunks from the start of the data "
                               "(SAEBench's core eval: 10 batches × 16 prompts × 128 tokens)")
    batch_seqs: int = opt(16, "sequences per forward; also the batch whose mean SAEBench's explained variance "
                              "subtracts (SAEBench: 16)")
    exclude_special: bool = opt(True, "leave positions whose input token is pad / eos / bos out of every metric, "
                                      "as SAEBench's multiple_evals does (the SAE is still spliced in everywhere)")
    density_bins: int = opt(40, "bins of each SAE's log10 feature-density histogram")
    probe: Literal["auto", "on", "off"] = opt("auto", "sparse-probing accuracy columns (saetune.probing, SAEBench's "
                                                      "k-sparse probes on the toy task's concepts): auto = on for the "
                                                      "toy model (and models sharing its tokenizer), which it needs")
    probe_problems: int = opt(512, "toy problems drawn for sparse probing (a quarter held out for testing)")
    ground_truth: str = opt("", "a synthetic ground-truth dataset dir (saetune.ground_truth.save_ground_truth): the "
                                "SAEs are evaluated on its activations instead of a model's (no CE / KL columns) "
                                "and get MCC and F1 against its true features")
    data_seed: int = opt(1, "seed of the toy traces (1: not train-sae's default 0, so the toy tokens are fresh)")
    device: str = opt("auto", "'auto' (cuda if present), 'cpu' or 'cuda'")
    model_dtype: str = opt("float32", "dtype the model runs in")
    seed: int = opt(0, "seed (recorded; the metrics themselves draw nothing)")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        if not self.sae:
            raise SaetuneError("eval-sae needs at least one SAE: --sae DIR [DIR …] (an SAE dir, a train-sae run "
                               "dir, or a dir of one SAE per hook)")
        if self.n_tokens < 1:
            raise SaetuneError(f"n_tokens must be at least 1, got {self.n_tokens}")
        if self.batch_seqs < 1:
            raise SaetuneError(f"batch_seqs must be at least 1, got {self.batch_seqs}")
        if self.density_bins < 1:
            raise SaetuneError(f"density_bins must be at least 1, got {self.density_bins}")
        if self.probe_problems < 8:
            raise SaetuneError(f"probe_problems must be at least 8, got {self.probe_problems}")
        if self.ground_truth and (self.model or self.hook):
            raise SaetuneError(f"--ground-truth {self.ground_truth!r} evaluates the SAEs on its synthetic activations, "
                               "so --model / --hook do not apply; drop them, or drop --ground-truth to evaluate on "
                               "a model")
        if self.ground_truth and self.probe == "on":
            raise SaetuneError("probe 'on' probes the toy model's activations, which a --ground-truth evaluation "
                               "does not use; pass probe 'off' or 'auto'")


# ---- the evaluation loop (shared with train-sae) --------------------------------------------------

def special_ids(tokenizer) -> list[int]:
    """pad, eos and bos ids of ``tokenizer`` (the tokens SAEBench's multiple_evals leaves out)."""
    if tokenizer is None:
        return []
    ids = {getattr(tokenizer, f"{n}_token_id", None) for n in ("pad", "eos", "bos")}
    return sorted(int(i) for i in ids if i is not None)


@torch.no_grad()
def core_eval(model, saes: Sequence[tuple[str, Any, Any]], ids_all: torch.Tensor, batch_seqs: int = 16,
              ignore_ids: Iterable[int] = (), bins: int = 40,
              progress: bool = False) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Splice each SAE into ``model`` over ``ids_all`` [N, T] and measure it (:class:`~saetune.sae_quality.CoreMetrics`).

    ``saes``: ``(name, HookPoint, SAE)``; SAEs on one hook share each batch's zero-ablation forward, all share
    the clean one. Per batch of ``batch_seqs`` sequences: clean logits; for each hook the logits with the
    activation zeroed (every position); for each SAE the logits with ``decode(encode(x))`` in place of x at every
    position, capturing x. Returns (results by name, per-latent firing density by name)."""
    from tqdm.auto import tqdm

    from .models import replace_activation
    if ids_all.ndim != 2 or ids_all.shape[0] == 0 or ids_all.shape[1] < 2:
        raise SaetuneError(f"the evaluation data must be [sequences, tokens] with at least one sequence of 2+ "
                           f"tokens; got shape {tuple(ids_all.shape)}")
    dev = next(model.parameters()).device
    acc = {name: CoreMetrics(sae.d_sae) for name, _, sae in saes}
    ignore = list(ignore_ids)
    by_hook: dict[str, list] = {}
    for name, hp, sae in saes:
        by_hook.setdefault(hp.name, []).append((name, hp, sae))
    starts = range(0, ids_all.shape[0], batch_seqs)
    for b in tqdm(starts, desc="eval-sae", unit="batch", disable=not progress):
        ids = ids_all[b:b + batch_seqs].to(dev)
        keep = keep_mask(ids, ignore)
        clean = model(input_ids=ids, use_cache=False).logits
        for group in by_hook.values():  # one hook's zero-ablated logits at a time: [B, T, V] each is large
            with replace_activation(model, group[0][1], torch.zeros_like):
                zero = model(input_ids=ids, use_cache=False).logits
            ref = reference_terms(clean, zero, ids)  # once for every SAE on this hook
            for name, hp, sae in group:
                cap: dict[str, torch.Tensor] = {}

                def splice(a, sae=sae, cap=cap):
                    x = a.float()
                    acts = sae.encode(x)
                    x_hat = sae.decode(acts)
                    cap["x"], cap["acts"], cap["x_hat"] = x, acts, x_hat
                    return x_hat.to(a.dtype)

                with replace_activation(model, hp, splice):
                    spliced = model(input_ids=ids, use_cache=False).logits
                acc[name].add_batch(ids, keep, clean, spliced, zero, cap["x"], cap["acts"], cap["x_hat"], ref)
                del spliced, cap
            del zero, ref
    results = {name: {**a.result(bins), "n_positions": int(ids_all.numel()), "ignored_token_ids": ignore}
               for name, a in acc.items()}
    return results, {name: a.density().float() for name, a in acc.items()}


@torch.no_grad()
def fire_counts(saes: dict[str, tuple[str, Any]], batches: Iterable[dict[str, torch.Tensor]], max_tokens: int = 0,
                chunk: int = 4096) -> tuple[dict[str, torch.Tensor], int]:
    """How often each latent fires (f > 0) over activation ``batches`` ({hook: [n, d_in]}), per SAE
    (``saes``: name → (hook, SAE)), and the token count: liveness over, e.g., the training tokens with the weights
    as they are now. Stops after ``max_tokens`` (0 = all); rows go through the SAE ``chunk`` at a time, so the dense
    [rows, d_sae] latents stay small."""
    counts = {name: torch.zeros(sae.d_sae, dtype=torch.long) for name, (_, sae) in saes.items()}
    n = 0
    for batch in batches:
        rows = next(iter(batch.values())).shape[0]
        take = min(rows, max_tokens - n) if max_tokens else rows
        if take <= 0:
            break
        for name, (hook, sae) in saes.items():
            x = batch[hook][:take]
            for lo in range(0, take, chunk):
                xc = x[lo:lo + chunk].to(sae.W_enc.device).float()
                counts[name] += (sae.encode(xc) > 0).sum(0).cpu().long()
        n += take
    return counts, n


# ---- which SAEs --------------------------------------------------------------------------------

@dataclass
class SAESpec:
    label: str
    path: Path  # the dir holding cfg.json
    run: Path | None  # the train-sae run dir it came from, if any


def find_sae_specs(paths: Sequence[str]) -> list[SAESpec]:
    """Every SAE under ``paths`` (an SAE dir, a train-sae run dir, a dir of one SAE per hook), labelled by its
    path (``path/name`` when a path holds several); a path given twice is refused."""
    from saetune.analysis.rundirs import find_saes
    seen: set[str] = set()
    out = []
    for p in paths:
        key = str(Path(p).expanduser().resolve())
        if key in seen:
            raise SaetuneError(f"SAE path {p!r} is given twice; give each SAE once")
        seen.add(key)
        found, run = find_saes(p)
        for name, d in found.items():
            out.append(SAESpec(p if len(found) == 1 else f"{p.rstrip('/')}/{name}", Path(d), run))
    return out


def _load_sae(spec: SAESpec):
    from .sae import SAE
    return SAE.load(spec.path)  # a bad cfg (e.g. k ≥ d_sae) is refused here, naming the value and the dir


def _model_name(cfg: EvalSAEConfig, specs: list[SAESpec], saes: list) -> str:
    if cfg.model:
        return cfg.model
    from saetune.analysis.rundirs import recorded_model
    try:
        return recorded_model({specs[0].label: specs[0].path}, specs[0].run)
    except SaetuneError:
        recorded = saes[0].cfg.model_name
        if recorded and not Path(recorded).is_absolute() and not recorded.startswith("."):
            return recorded  # a hub id (e.g. gpt2), for the loader to find or to name in its error
        raise SaetuneError(f"cannot tell which model the SAE in {str(specs[0].path)!r} reads (recorded: "
                           f"{recorded or 'nothing'!r}); pass --model (a local HF dir, a hub id, or toy)") from None


def _hook_points(model, cfg: EvalSAEConfig, specs: list[SAESpec], saes: list, ids: torch.Tensor) -> list:
    """Each SAE's HookPoint, checked: the hook exists in ``model`` and its width is the SAE's d_in."""
    from .models import resolve_hook, run_to_hooks
    hps = []
    for spec, sae in zip(specs, saes):
        name = cfg.hook or sae.cfg.hook_name
        if not name:
            raise SaetuneError(f"the SAE in {str(spec.path)!r} records no hook_name; pass --hook (e.g. "
                               "model.layers.2)")
        try:
            hp = resolve_hook(model, name)
        except SaetuneError as e:
            src = "--hook" if cfg.hook else f"the hook_name of the SAE in {str(spec.path)!r}"
            raise SaetuneError(f"{src}: {e}") from None
        if cfg.hook and sae.cfg.hook_name:
            from .sae import warn_hook_mismatch
            warn_hook_mismatch(f"the SAE in {str(spec.path)!r}", sae.cfg.hook_name, cfg.hook, model)
        hps.append(hp)
    first = ids[:1].to(next(model.parameters()).device)
    widths = {hp.name: run_to_hooks(model, first, [hp])[hp.name].shape[-1] for hp in {h.name: h for h in hps}.values()}
    for spec, sae, hp in zip(specs, saes, hps):
        if widths[hp.name] != sae.d_in:
            raise SaetuneError(f"the SAE in {str(spec.path)!r} has d_in={sae.d_in}, but hook {hp.name!r} of this "
                               f"model has width {widths[hp.name]}; pass the model it was trained on (--model) or "
                               "a hook of that width (--hook)")
    return hps


def _eval_chunks(cfg: EvalSAEConfig, tok) -> torch.Tensor:
    from .data import load_chunks
    chunks = load_chunks(cfg, tok)
    want = max(1, math.ceil(cfg.n_tokens / cfg.context_size))
    if chunks.shape[0] < want:
        warnings.warn(f"the data gives {chunks.numel():,} tokens ({chunks.shape[0]} chunks of {cfg.context_size}), "
                      f"fewer than n_tokens={cfg.n_tokens:,}; evaluating on all of them (add data, e.g. "
                      "max_examples, for more)", stacklevel=3)
    return chunks[:want]


# ---- optional columns: probing and ground truth ----------------------------------------------------

def _is_toy(model_name: str, tok) -> bool:
    """Whether the model is the toy organism (or one trained from it): 'toy', or the toy's own tokenizer."""
    if model_name == "toy":
        return True
    from .toy.tokenizer import build_tokenizer
    try:
        return tok.get_vocab() == build_tokenizer().get_vocab()
    except Exception:  # a tokenizer without get_vocab: not the toy's
        return False


def _probe_columns(cfg: EvalSAEConfig, model, tok, sae, hook: str, toy: bool, label: str = "",
                   concepts: list | None = None) -> dict[str, Any]:
    """Sparse-probing scalars for one SAE (:func:`saetune.probing.probe_summary`), or {} when off / not the toy;
    which latents carry which concept (:func:`saetune.probing.concept_latents`, an ``sae`` column = ``label``)
    is appended to ``concepts``."""
    if cfg.probe == "off" or (cfg.probe == "auto" and not toy):
        return {}
    if not toy:
        raise SaetuneError("probe 'on' needs the toy model (its task defines the probed concepts) or a model "
                           "sharing its tokenizer; this model's tokenizer is another")
    from . import probing
    df = probing.sparse_probe_scores(sae, model, tok, hook, n_problems=cfg.probe_problems, seed=cfg.seed)
    if concepts is not None:
        concepts.append(probing.concept_latents(df).assign(sae=label))
    return dict(probing.probe_summary(df))


def _ground_truth(cfg: EvalSAEConfig, specs: list[SAESpec], saes: list):
    """The ground-truth dataset of ``cfg``, checked against every SAE's d_in."""
    from .ground_truth import load_ground_truth
    if not Path(cfg.ground_truth).exists():
        raise SaetuneError(f"--ground-truth {cfg.ground_truth!r} does not exist; pass a dataset dir written by "
                           "saetune.ground_truth.save_ground_truth")
    data = load_ground_truth(cfg.ground_truth)
    width = data.feature_vectors.shape[1]
    for spec, sae in zip(specs, saes):
        if sae.d_in != width:
            raise SaetuneError(f"the SAE in {str(spec.path)!r} has d_in={sae.d_in}, but the ground-truth data in "
                               f"{cfg.ground_truth!r} has hidden_dim {width}; evaluate SAEs trained on that data")
    return data


@torch.no_grad()
def ground_truth_eval(data, saes: Sequence[tuple[str, Any]], batch_rows: int = 2048,
                      bins: int = 40) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The metrics that need no model (EV, FVU, L0, alive, density) on the synthetic activations, ``batch_rows``
    samples per batch (SAEBench's batch: 16 prompts × 128 tokens), plus the ground-truth scores
    (:func:`saetune.ground_truth.ground_truth_scores`, prefixed ``gt_``)."""
    from .ground_truth import ground_truth_scores
    results, density = {}, {}
    x_all = data.activations
    for name, sae in saes:
        acc = CoreMetrics(sae.d_sae)
        dev = sae.W_enc.device
        for lo in range(0, x_all.shape[0], batch_rows):
            x = x_all[lo:lo + batch_rows].to(dev).float()
            acts = sae.encode(x)
            ones = torch.ones(1, x.shape[0], dtype=torch.bool)
            acc.add_batch(ones.long(), ones, None, None, None, x, acts, sae.decode(acts))
        results[name] = {**acc.result(bins), "n_positions": int(x_all.shape[0]), "ignored_token_ids": [],
                         **{f"gt_{k}": v for k, v in ground_truth_scores(sae, data).items()}}
        density[name] = acc.density().float()
    return results, density


# ---- the verb ------------------------------------------------------------------------------------

@dataclass
class _EvalSAEInputs:
    """What ``eval_sae``'s phases share: the SAEs and what they are evaluated on (a model, its tokens and each
    SAE's hook point; or the ground truth's activations), resolved and checked before the run dir exists."""

    specs: list[SAESpec]
    saes: list
    device: str
    inputs: tuple  # what the manifest's input digest covers
    n_eval: int  # evaluation tokens (ground truth: activation rows)
    model_name: str = ""
    model: Any = None
    tok: Any = None
    hps: list | None = None  # per SAE: its hook point (None with a ground truth)
    chunks: torch.Tensor | None = None
    data: Any = None  # the ground truth's activations and features


def eval_sae(cfg: EvalSAEConfig, out: str | Path | None = None, resume: bool = False,
             overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate the SAEs of ``cfg`` into a run dir; returns the results by SAE label (also ``results.json``).

    Bad inputs are refused before the run dir is written: a missing or unloadable SAE (e.g. k ≥ d_sae), a hook
    the model lacks, an SAE whose d_in is not the hook's width, data that gives no tokens. Phases:
    :func:`_prepare_eval_sae` (SAEs, model, tokens, hook points; every check), :func:`_measure_saes` (core
    metrics, probes), :func:`_finish_eval_sae` (``results.json``, the table, densities, concepts)."""
    from .runs import RunDir
    from .sae_quality import format_quality_table

    ev = _prepare_eval_sae(cfg)
    run = RunDir.open(out, STAGE, cfg, resume=resume, overwrite=overwrite, seed=cfg.seed, device=ev.device,
                      inputs=ev.inputs)
    with run:  # records a failure, Ctrl-C or SIGTERM (RunDir.fail_with)
        if cfg.ground_truth:
            run.add_input("ground_truth", cfg.ground_truth)
        else:
            run.add_input("model", ev.model_name)
        for s in ev.specs:
            run.add_input(f"sae:{s.label}", s.path)
        ev.saes = [s.to(ev.device).eval() for s in ev.saes]
        results, density, concepts = _measure_saes(cfg, ev, run)
        table = _finish_eval_sae(cfg, ev, run, results, density, concepts)
    print(format_quality_table(table))
    print(f"\nrun dir: {run.path}")
    return results


def _prepare_eval_sae(cfg: EvalSAEConfig) -> _EvalSAEInputs:
    """Load every SAE and what it is evaluated on: the ground truth's activations (no model), or the model, the
    evaluation tokens and each SAE's hook point; raises :class:`SaetuneError` on any bad input."""
    from .models import load_model, resolve_device

    specs = find_sae_specs(cfg.sae)
    saes = [_load_sae(s) for s in specs]
    device = resolve_device(cfg.device)
    if cfg.ground_truth:  # the synthetic activations are the evaluation data: no model
        data = _ground_truth(cfg, specs, saes)
        return _EvalSAEInputs(specs, saes, device, (cfg.ground_truth, *[s.path for s in specs]),
                              int(data.activations.shape[0]), hps=[None] * len(specs), data=data)
    model_name = _model_name(cfg, specs, saes)
    model, tok = load_model(model_name, dtype=cfg.model_dtype, device=device)
    model.requires_grad_(False)
    chunks = _eval_chunks(cfg, tok)
    hps = _hook_points(model, cfg, specs, saes, chunks)
    return _EvalSAEInputs(specs, saes, device, (model_name, *[s.path for s in specs]), int(chunks.numel()),
                          model_name=model_name, model=model, tok=tok, hps=hps, chunks=chunks)


def _measure_saes(cfg: EvalSAEConfig, ev: _EvalSAEInputs, run) -> tuple[dict, dict, list]:
    """Every SAE's core metrics on the same tokens (or its ground-truth scores), then, unless ``--probe off``,
    its sparse-probing columns; returns the results by label, the firing densities and the concept rows."""
    with run.phase("core"):
        if cfg.ground_truth:
            results, density = ground_truth_eval(ev.data, [(s.label, sae) for s, sae in zip(ev.specs, ev.saes)],
                                                 cfg.batch_seqs * cfg.context_size, cfg.density_bins)
        else:
            results, density = core_eval(ev.model, [(s.label, hp, sae) for s, hp, sae in
                                                     zip(ev.specs, ev.hps, ev.saes)],
                                         ev.chunks, cfg.batch_seqs,
                                         special_ids(ev.tok) if cfg.exclude_special else (),
                                         cfg.density_bins, progress=cfg.progress)
    concepts: list = []  # per SAE: which latents carry which toy concept (the explorer's SAE quality page)
    if not cfg.ground_truth and cfg.probe != "off":
        toy = _is_toy(ev.model_name, ev.tok)
        with run.phase("probe"):
            for s, hp, sae in zip(ev.specs, ev.hps, ev.saes):
                results[s.label].update(_probe_columns(cfg, ev.model, ev.tok, sae, hp.name, toy, s.label,
                                                       concepts))
    return results, density, concepts


def _finish_eval_sae(cfg: EvalSAEConfig, ev: _EvalSAEInputs, run, results: dict, density: dict,
                     concepts: list):
    """Put each SAE's identity first in its ``results`` entry (in place), write ``results.json``, the quality
    table (``quality.md``, ``quality.csv``), ``feature_density.safetensors`` and, with probes, ``concepts.csv``;
    finish the manifest; returns the table."""
    from .io import atomic_save_safetensors, atomic_write_json, atomic_write_text
    from .runs import record_path
    from .sae_quality import quality_markdown, quality_table

    for s, hp, sae in zip(ev.specs, ev.hps, ev.saes):
        where = {"ground_truth": record_path(cfg.ground_truth, run.path)} if cfg.ground_truth else {
            "hook": hp.name, "model": record_path(ev.model_name, run.path)}
        results[s.label] = {"label": s.label, "sae_path": record_path(s.path, run.path), **where,
                            "d_sae": sae.d_sae, "k": sae.cfg.k, "architecture": sae.cfg.architecture,
                            "definition": SAEBENCH_SOURCE, **results[s.label]}
    table = quality_table(list(results.values()))
    atomic_write_json(run.path / "results.json", results)
    atomic_write_text(run.path / "quality.md", quality_markdown(table))
    atomic_write_text(run.path / "quality.csv", table.to_csv(index=False))
    atomic_save_safetensors(run.path / "feature_density.safetensors",
                            {f"sae{i}": density[s.label].contiguous() for i, s in enumerate(ev.specs)},
                            metadata={f"sae{i}": s.label for i, s in enumerate(ev.specs)})
    written = ["results.json", "quality.md", "quality.csv", "feature_density.safetensors"]
    if concepts:
        import pandas as pd
        frame = pd.concat(concepts, ignore_index=True)
        atomic_write_text(run.path / "concepts.csv", frame[["sae", *frame.columns.drop("sae")]].to_csv(index=False))
        written.append("concepts.csv")
    for name in written:
        run.add_artifact(name, name)
    run.finish(definition=SAEBENCH_SOURCE, n_tokens=ev.n_eval)
    return table
