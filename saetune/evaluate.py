"""Evaluating reasoning models on math benchmarks: benchmarks, the eval stage, comparisons.

- :func:`load_benchmark`, :func:`resolve_benchmark` (from :mod:`saetune.benchmarks`, re-exported) —
  ``problem``/``answer`` rows from a local file, a known name or a HF dataset id;
- the stage (``saetune eval``): :class:`EvalConfig` and :func:`run`, which samples through a
  backend of :mod:`saetune.generation`, grades, and writes ``eval/results.json`` and
  ``eval/samples.jsonl`` into a run dir (resumable per batch);
- :func:`compare` and :func:`format_table` put several eval runs side by side (base / source /
  SAE-tuned / controls);
- presets (:mod:`saetune.eval_presets`, re-exported :func:`prompt_messages`): ``saetune`` (the
  default, strict grading) or ``resa`` (the reference evaluation behind Resa's table); GPQA-Diamond
  (multiple choice) under both.

Grading lives in :mod:`saetune.grading` (:func:`is_correct`, :func:`gold_parses`, what part of a
response is graded) and the numbers in :mod:`saetune.scoring` (:func:`pass_at_k`,
:func:`avg_at_k`, :func:`summarize`); both are re-exported here, so
``from saetune.evaluate import is_correct, pass_at_k`` keeps working.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from .config import opt
from .errors import SaetuneError
from .grading import Grader, extract_graded_text, gold_parses, is_correct, last_answer_tag, last_boxed, normalize_answer
from .scoring import avg_at_k, default_ks, pass_at_k, summarize
from .benchmarks import (BENCHMARKS_DIR_ENV, BOXED_INSTRUCTION, GPQA_NAMES, KNOWN_BENCHMARKS, RESA_BENCHMARKS,
                         KnownBenchmark, canonical_benchmark, is_gpqa_file, load_benchmark, load_gpqa,
                         resolve_benchmark)
from .eval_presets import PRESETS, prompt_messages

__all__ = [
    "extract_graded_text", "last_boxed", "last_answer_tag", "normalize_answer", "is_correct", "gold_parses",
    "pass_at_k", "avg_at_k", "summarize", "load_benchmark", "resolve_benchmark", "KNOWN_BENCHMARKS",
    "EvalConfig", "resolve_model", "run", "read_samples", "compare", "format_table", "prompt_messages", "PRESETS",
]

# --------------------------------------------------------------------------------------------
# The eval stage: config
# --------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """Evaluating a model on math benchmarks (``saetune eval``): sample, grade, pass@k, results.

    Writes ``eval/results.json`` and ``eval/samples.jsonl`` into the run dir; an interrupted
    eval continues with ``--resume RUN_DIR`` without regenerating finished samples.
    """

    model: str = opt("toy", "model to evaluate: a HF model dir, a hub id, 'toy' (the shipped toy model), or a "
                            "saetune run dir holding merged/, model/ or adapter/ (tried in that order)")
    base_model: str = opt("", "base model for an adapter/ (default: the adapter's base_model_name_or_path)")
    label: str = opt("", "row label in comparison tables, e.g. base, source, SAE-tuned, control "
                         "(default: the run dir's name)")
    preset: Literal["saetune", "resa"] = opt(
        "saetune", "how prompts are made and answers graded: 'saetune' (the problem + a boxed instruction; strict: "
                   "the last box after </think> against the answer field) or 'resa' (the reference evaluation of "
                   "Resa's table: its prompt, golds from answer or solution, math-verify over the whole response, "
                   "32,768 tokens in total, 4,096 for Qwen2.5-Math-1.5B); results of different presets do not compare")
    benchmarks: list[str] = opt(factory=list, help=(
        "benchmarks: 'toy' (exact-match toy task), known names aime24 aime25 amc23 math500 minerva "
        "math-beyond gpqa (GPQA-Diamond, multiple choice; gated on the hub, or gpqa_diamond.jsonl in "
        "benchmarks_dir), local .jsonl/.json/.parquet files (GPQA's field names make a GPQA file), or hub "
        "dataset ids (e.g. brendel-group/MATH-Beyond); empty = 'toy' for a toy model, else aime24 aime25 amc23 "
        "math500 minerva"))
    benchmarks_dir: str = opt("", "dir holding the known benchmarks' JSONL files (default: $SAETUNE_BENCHMARKS_DIR; "
                                  "names not found there are read from the hub)")
    split: str = opt("test", "split of a hub dataset that is not a known benchmark")
    problem_field: str = opt("problem", "problem field of benchmark files and unknown hub datasets")
    answer_field: str = opt("answer", "gold answer field of benchmark files and unknown hub datasets")
    add_instruction: bool = opt(True, "preset saetune: append 'Please reason step by step, and put your final "
                                      "answer within \\boxed{}.' to math problems that do not mention \\boxed "
                                      "(preset resa cuts such a trailing instruction instead)")
    limit: int = opt(0, "evaluate only the first N problems of each benchmark (0 = all)")
    toy_problems: int = opt(256, "problems of the 'toy' benchmark (fresh ones, not the training stream)")
    template: Literal["chat", "r1zero", "raw"] = opt(
        "chat", "prompt format: the tokenizer's chat template (Resa's evaluation), Resa's R1-Zero text "
                "format ending in '<think>', or the problem text as is")
    samples: int = opt(1, "samples per problem (Resa: 1; prefer more for avg@k; MATH-Beyond uses 1024)")
    ks: list[int] = opt(factory=list, help="k values of pass@k, each <= samples "
                                           "(default 1, 4, 16, ... and samples itself)")
    temperature: float = opt(0.6, "sampling temperature (0 = greedy)")
    top_p: float = opt(0.95, "nucleus sampling mass")
    max_new_tokens: int = opt(32768, "new tokens per response (capped by the model's context; the toy task "
                                     "caps it at its longest trace)")
    backend: Literal["hf", "vllm"] = opt("hf", "generation engine: HF generate, or vLLM (pip install saetune[vllm])")
    batch_size: int = opt(0, "samples per generate call and per checkpoint of samples.jsonl "
                             "(0 = 32 for hf, 1024 for vllm)")
    seed: int = opt(0, "seed of the samples (each sample's seed derives from it, the problem and the sample index)")
    device: str = opt("", "device for the hf backend (default: cuda if available, else cpu)")
    dtype: str = opt("auto", "weights dtype: auto (the checkpoint's), bfloat16, float16, float32")
    trust_remote_code: bool = opt(False, "allow the model's own code from the hub")
    grade_timeout_s: float = opt(5.0, "time bound of each math-verify parse/verify call")
    grade_workers: int = opt(0, "math-verify grading in this many worker processes, in parallel (0 = in this "
                                "process: the main thread, or one worker process when run from another thread)")
    n_boot: int = opt(1000, "bootstrap resamples of the problems for the 95-percent interval of pass@1")
    tensor_parallel_size: int = opt(1, "vllm: GPUs per engine")
    data_parallel_size: int = opt(1, "vllm: engines, one per process, each on its own tensor_parallel_size GPUs")
    gpu_memory_utilization: float = opt(0.9, "vllm: fraction of GPU memory for weights and KV cache")
    max_model_len: int = opt(0, "vllm: context length (0 = the model's)")
    gpu_hour_usd: float = opt(1.0, "price of one GPU-hour for the cost estimate (Resa's costing: about $1)")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("samples", "toy_problems", "max_new_tokens", "n_boot", "tensor_parallel_size",
                     "data_parallel_size"):
            if getattr(self, name) < 1:
                raise SaetuneError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("limit", "batch_size", "max_model_len", "grade_workers"):
            if getattr(self, name) < 0:
                raise SaetuneError(f"{name} must be 0 or more, got {getattr(self, name)}")
        bad = [k for k in self.ks if not 1 <= k <= self.samples]
        if bad:
            raise SaetuneError(f"ks {bad} exceed samples={self.samples}; pass@k needs 1 <= k <= samples "
                               "(raise samples or drop those k)")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise SaetuneError(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")
        if self.grade_timeout_s <= 0 or self.gpu_hour_usd < 0:
            raise SaetuneError(f"grade_timeout_s={self.grade_timeout_s} must be positive and "
                               f"gpu_hour_usd={self.gpu_hour_usd} not negative")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise SaetuneError(f"benchmarks {self.benchmarks} name one benchmark twice")
        if self.preset not in PRESETS:
            raise SaetuneError(f"preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        if self.preset == "resa" and self.template != "chat":
            raise SaetuneError(f"preset 'resa' sends its prompt through the chat template; template={self.template!r} "
                               "contradicts it (drop template, or use preset 'saetune')")


# --------------------------------------------------------------------------------------------
# The eval stage: model, benchmarks, samples file
# --------------------------------------------------------------------------------------------

def resolve_model(model: str, base_model: str = "") -> dict[str, Any]:
    """Where the weights of ``model`` are: ``{"path", "adapter", "run_dir"}``.

    A saetune run dir gives its ``merged/``, else ``model/``, else ``adapter/`` on top of
    ``base_model`` (default: the adapter's ``base_model_name_or_path``); ``run_dir`` is then the
    dir, whose manifest says what producing the model cost.
    """
    from .models import resolve_model_path
    from .runs import resolve_recorded

    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").exists():
        for sub in ("merged", "model"):
            if (p / sub / "config.json").exists():
                return {"path": str(p / sub), "adapter": None, "run_dir": str(p)}
        if (p / "adapter" / "adapter_config.json").exists():
            base = base_model or resolve_recorded(json.loads((p / "adapter" / "adapter_config.json").read_text()).get(
                "base_model_name_or_path"), p / "adapter") or ""
            if not base:
                raise SaetuneError(f"{str(p / 'adapter')!r} names no base model; pass base_model")
            return {"path": resolve_model_path(base), "adapter": str(p / "adapter"), "run_dir": str(p)}
        if (p / "adapter_config.json").exists():
            base = base_model or resolve_recorded(json.loads((p / "adapter_config.json").read_text()).get(
                "base_model_name_or_path"), p) or ""
            if not base:
                raise SaetuneError(f"{str(p)!r} names no base model; pass base_model")
            return {"path": resolve_model_path(base), "adapter": str(p), "run_dir": None}
        raise SaetuneError(f"{model!r} is a directory without a model: expected config.json, or a saetune run dir "
                           "holding merged/, model/ or adapter/")
    return {"path": resolve_model_path(model), "adapter": None, "run_dir": None}


def _is_toy_tokenizer(tokenizer) -> bool:
    from .toy.tokenizer import vocab
    try:
        v = tokenizer.get_vocab()
    except Exception:
        return False
    want = vocab()
    return len(v) == len(want) and all(v.get(t) == i for i, t in enumerate(want))


@dataclass
class _Bench:
    """One benchmark, ready to sample: each row holds ``user`` (the user message / prompt text before
    the template), ``gold`` (as graded), ``gold_source`` and ``prompt_edits`` (what was done to the
    file's text), and for GPQA ``choices`` (A–D as shown)."""

    name: str
    source: str
    rows: list[dict[str, Any]]
    toy: bool  # exact-match toy grader instead of math-verify
    kind: str = "saetune"  # grading kind of eval_presets.grade_one (toy: "toy")


GRADERS = {"toy": "toy exact match", "saetune": "math-verify",
           "expr": "math-verify (resa: the answer field parsed as an expression)",
           "latex": "math-verify (resa: the boxed LaTeX answer of the solution)",
           "letter": "letter match ('Answer: X')"}


def _load_benchmarks(cfg: EvalConfig, toy_model: bool) -> list[_Bench]:
    from .eval_presets import _user_message, gpqa_choices, gpqa_prompt, resa_gold, resa_gold_kind
    from .toy.build import EVAL_SEED_OFFSET

    specs = list(cfg.benchmarks) or (["toy"] if toy_model else list(RESA_BENCHMARKS))
    out, names = [], set()
    for spec in specs:
        name, source, split, pf, af = resolve_benchmark(spec, cfg.benchmarks_dir)
        if name in names:
            raise SaetuneError(f"two benchmarks resolve to the name {name!r}; rename one of the files")
        names.add(name)
        if source == "toy":
            if cfg.preset != "saetune":
                raise SaetuneError(f"benchmark 'toy' has its own format and exact-match grader; preset "
                                   f"{cfg.preset!r} applies to math benchmarks and gpqa (use preset 'saetune' for toy)")
            from .toy import task
            n = min(cfg.toy_problems, cfg.limit) if cfg.limit else cfg.toy_problems
            rows = [{"problem": e["problem"], "answer": e["answer"], "user": e["problem"], "gold": e["answer"],
                     "gold_source": "answer", "prompt_edits": []} for e in task.examples(n, EVAL_SEED_OFFSET)]
            out.append(_Bench(name, source, rows, toy=True, kind="toy"))
            continue
        local = Path(source).expanduser().exists()
        if canonical_benchmark(name) in GPQA_NAMES or (local and is_gpqa_file(source)):
            config = None if local else KNOWN_BENCHMARKS["gpqa"].config
            rows = []
            for i, r in enumerate(load_gpqa(source, cfg.limit, split or "train", config)):
                choices, letter = gpqa_choices(r["correct"], r["incorrect"], cfg.seed, i)
                rows.append({"problem": r["question"], "answer": r["correct"],
                             "user": gpqa_prompt(r["question"], choices), "gold": letter, "gold_source": "letter of 'Correct Answer' (seeded place)",
                             "choices": choices, "prompt_edits": []})
            out.append(_Bench(name, source, rows, toy=False, kind="letter"))
            continue
        rows = load_benchmark(source, pf or cfg.problem_field, af or cfg.answer_field, cfg.limit,
                              split or cfg.split, keep=("solution",) if cfg.preset == "resa" else ())
        kind = "saetune" if cfg.preset == "saetune" else resa_gold_kind(name)
        for r in rows:
            r["user"], r["prompt_edits"] = _user_message(r["problem"], cfg.preset, cfg.add_instruction)
            if kind == "saetune":
                r["gold"], r["gold_source"] = r["answer"], af or cfg.answer_field
            else:
                r["gold"], r["gold_source"] = resa_gold(r, kind)
        out.append(_Bench(name, source, rows, toy=False, kind=kind))
    return out


SAMPLES_FILE = "eval/samples.jsonl"
RESULTS_FILE = "eval/results.json"


_SLIM_KEYS = ("benchmark", "problem_index", "sample_index", "correct", "n_tokens", "truncated")


def read_samples(path: str | Path, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a ``samples.jsonl`` (only ``keys`` of each, if given), read line by line.

    A last line cut by a kill is dropped and cut off the file, so appending can go on; a bad
    line followed by good ones is an error naming it (such a file was not written by an eval).
    """
    path = Path(path)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    end = 0  # byte offset after the last good line
    bad_line = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                end += len(raw) if bad_line is None else 0
                continue
            if bad_line is not None:
                raise SaetuneError(f"{str(path)!r} line {bad_line} is not valid JSON; the samples file is "
                                   "damaged (start a new eval or remove that line)")
            try:
                row = json.loads(raw) if raw.endswith(b"\n") else None
            except json.JSONDecodeError:
                row = None
            if row is None:
                bad_line = lineno
                continue
            rows.append(row if keys is None else {k: row.get(k) for k in keys})
            end += len(raw)
    if bad_line is not None:
        with open(path, "rb+") as f:
            f.truncate(end)
    return rows


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append whole lines in one ``O_APPEND`` write and fsync: a kill leaves at most a cut last line."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sample_seed(seed: int, bench: str, problem: int, sample: int) -> int:
    return zlib.crc32(f"{seed}:{bench}:{problem}:{sample}".encode())


def _build_backend(cfg: EvalConfig, where: dict[str, Any], device: str, batch: int, total: int = 0):
    from .generation import HFBackend, VLLMBackend

    if cfg.backend == "vllm":
        if where["adapter"]:
            raise SaetuneError("backend 'vllm' evaluates model dirs; merge the adapter first (saetune merge) or "
                               "use backend 'hf'")
        return VLLMBackend(where["path"], cfg.tensor_parallel_size, cfg.data_parallel_size, dtype=cfg.dtype,
                           gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed,
                           trust_remote_code=cfg.trust_remote_code,
                           max_model_len=cfg.max_model_len or total or None, template=cfg.template)
    from .models import load_model, load_tokenizer
    model, tok = load_model(where["path"], dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    if where["adapter"]:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, where["adapter"]).merge_and_unload().eval()
        if (Path(where["adapter"]) / "tokenizer_config.json").exists():
            tok = load_tokenizer(where["adapter"], trust_remote_code=cfg.trust_remote_code)
    return HFBackend(model, tok, batch_size=batch, template=cfg.template)


# --------------------------------------------------------------------------------------------
# The eval stage: the run
# --------------------------------------------------------------------------------------------

def _entry(bench: _Bench, rows: list[dict[str, Any]], cfg: EvalConfig, phases: dict[str, float],
           unparsable: list[int], preset: dict[str, Any]) -> dict[str, Any]:
    """One benchmark's results entry from its sample rows."""
    s = cfg.samples
    correct = [[False] * s for _ in bench.rows]
    tokens = truncated = 0
    for r in rows:
        correct[r["problem_index"]][r["sample_index"]] = bool(r["correct"])
        tokens += int(r["n_tokens"])
        truncated += bool(r.get("truncated"))
    ks = list(cfg.ks) or sorted(set(default_ks(s)) | {s})
    entry = summarize(correct, ks=ks, n_boot=cfg.n_boot, seed=cfg.seed)
    gen_s = phases.get(f"generate:{bench.name}", 0.0)
    grade_s = phases.get(f"grade:{bench.name}", 0.0)
    entry.update({
        "source": bench.source,
        "preset": cfg.preset,
        "grader": GRADERS[bench.kind],
        "gold_sources": dict(Counter(r["gold_source"] for r in bench.rows)),
        "prompt_edits": dict(Counter(e for r in bench.rows for e in r["prompt_edits"])),
        "max_new_tokens": preset["max_new_tokens"], "max_total_tokens": preset["max_total_tokens"],
        "deviations": preset["deviations"],
        "unparsable_gold": len(unparsable), "unparsable_gold_problems": unparsable,
        "truncated_samples": truncated,
        "mean_response_tokens": round(tokens / max(len(rows), 1), 2),
        "generate_seconds": round(gen_s, 3), "grade_seconds": round(grade_s, 3),
        "problems_per_s": round(len(bench.rows) / gen_s, 3) if gen_s else None,
        "tokens_per_s": round(tokens / gen_s, 1) if gen_s else None,
    })
    return entry


def _model_provenance(run_dir: Path) -> dict[str, Any]:
    """What producing the model cost: its run dir's stage, time and cost, plus the runs it came from.

    A ``merge`` (or ``attach``) run names its input adapter; when that adapter sits in another
    run dir (a ``tune`` run), that run's time and cost are added: the model's total is tuning +
    merging, the "SAE-Tuning: X minutes, $Y" of Resa.
    """
    from .runs import read_manifest, resolve_recorded

    stages, seen, d = [], set(), run_dir
    while d is not None and d.resolve() not in seen and len(stages) < 4:
        seen.add(d.resolve())
        try:
            man = read_manifest(d)
        except (SaetuneError, ValueError):
            break
        stages.append({"path": str(d), "stage": man.get("stage"), "wall_seconds": man.get("wall_seconds") or 0.0,
                       "gpu_hours": man.get("gpu_hours") or 0.0,
                       "estimated_cost_usd": man.get("estimated_cost_usd") or 0.0})
        adapter = resolve_recorded((man.get("inputs") or {}).get("adapter", {}).get("path"), d)
        d = Path(adapter).parent if adapter and (Path(adapter).parent / "manifest.json").exists() else None
    return {"path": str(run_dir), "stages": stages,
            **{k: round(sum(st[k] for st in stages), 6) for k in ("wall_seconds", "gpu_hours", "estimated_cost_usd")}}


def _preset_settings(cfg: EvalConfig, where: dict[str, Any]) -> dict[str, Any]:
    """The preset's name, token limits and where this run departs from it (``deviations``, sentences).

    ``resa``: 32,768 tokens in total and as new tokens (4,096 when the model's name says
    Qwen2.5-Math-1.5B); a smaller ``max_new_tokens``, another temperature or top-p, or a vLLM
    ``max_model_len`` other than the total is recorded as a deviation from the reference.
    """
    from .eval_presets import resa_lengths

    if cfg.preset != "resa":
        return {"name": cfg.preset, "max_new_tokens": cfg.max_new_tokens, "max_total_tokens": None,
                "deviations": []}
    total = resa_lengths([cfg.model, cfg.base_model, where.get("path"), where.get("adapter")])
    deviations = []
    if cfg.max_new_tokens < total:
        deviations.append(f"max_new_tokens {cfg.max_new_tokens} (reference: {total})")
    if cfg.temperature != 0.6:
        deviations.append(f"temperature {cfg.temperature:g} (reference: 0.6)")
    if cfg.top_p != 0.95:
        deviations.append(f"top_p {cfg.top_p:g} (reference: 0.95)")
    if cfg.backend == "vllm" and cfg.max_model_len and cfg.max_model_len != total:
        deviations.append(f"max_model_len {cfg.max_model_len} (reference: {total})")
    return {"name": "resa", "max_new_tokens": min(cfg.max_new_tokens, total), "max_total_tokens": total,
            "deviations": deviations}


def run(cfg: EvalConfig, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
        backend: Any = None) -> dict[str, dict[str, Any]]:
    """Evaluate ``cfg.model`` on ``cfg.benchmarks`` into run dir ``out``; returns ``results.json``'s dict.

    For each benchmark: render prompts (``cfg.preset``'s user message through ``cfg.template``),
    sample ``cfg.samples`` responses per problem in chunks of ``cfg.batch_size``, grade each as
    the preset grades that benchmark (the toy's exact match, :func:`is_correct`, the resa
    preset's math-verify set-up or GPQA's letter — in this thread when it is the main one, else
    in a worker process), and append the chunk to ``eval/samples.jsonl`` (one row per sample:
    ``benchmark``, ``problem_index``, ``sample_index``, ``preset``, ``prompt`` (the exact text
    sent, after the template), ``prompt_edits`` (e.g. a stripped trailing instruction),
    ``response``, ``gold`` (as graded), ``gold_source``, ``gold_extracted`` (what math-verify
    read from the gold; resa and GPQA), ``extracted`` (the answer candidates read from the
    response), ``correct``, ``n_tokens``, ``truncated``; GPQA rows add ``choices``, A–D as
    shown). ``resume=True`` skips every sample already in that file.
    ``eval/results.json`` maps each benchmark to :func:`summarize`'s entry plus ``preset``,
    ``grader``, ``gold_sources`` and ``prompt_edits`` (counts over the problems), the token
    limits and the ``deviations`` from the preset, ``unparsable_gold`` (count) and throughput
    (``problems_per_s``, ``tokens_per_s``); the
    manifest records the same throughput, wall time per phase, GPU-hours and the cost at
    ``cfg.gpu_hour_usd`` ($SAETUNE_GPU_HOUR_USD overrides it). ``backend`` replaces the model
    loading (any object with the :class:`saetune.generation.Backend` interface).

    Example — greedy accuracy of a toy model dir on 128 toy problems::

        res = run(EvalConfig(model="runs/toy/model", benchmarks=["toy"], temperature=0, toy_problems=128),
                  "runs/eval-toy")
        res["toy"]["pass@1"]
    """
    run_dir, where, device, preset = _open_eval_run(cfg, out, resume=resume, overwrite=overwrite,
                                                    given_backend=backend is not None)
    batch = cfg.batch_size or (1024 if cfg.backend == "vllm" else 32)
    own_backend = backend is None
    grader = Grader(cfg.grade_workers, cfg.grade_timeout_s)
    try:
        with run_dir:  # records a failure, Ctrl-C or SIGTERM (RunDir.fail_with)
            with run_dir.phase("load"):
                if own_backend:
                    backend = _build_backend(cfg, where, device, batch, preset["max_total_tokens"] or 0)
                benches = _load_benchmarks(cfg, cfg.model == "toy" or _is_toy_tokenizer(backend.tokenizer))
            _record_eval_inputs(run_dir, where, benches, own_backend)
            results = _eval_benchmarks(cfg, benches, backend, run_dir, batch, grader, preset, resume=resume)
            _finish_eval(run_dir, results)
            return results
    finally:
        grader.close()
        if own_backend and backend is not None:
            backend.close()


def _open_eval_run(cfg: EvalConfig, out: str | Path | None, *, resume: bool, overwrite: bool,
                   given_backend: bool) -> tuple[Any, dict[str, Any], str, dict[str, Any]]:
    """Set-up of :func:`run`: ``(run_dir, where, device, preset)``: the model's weights (:func:`resolve_model`;
    with a given backend an unresolvable name is kept as is: the backend holds the model), the opened
    run dir and its manifest's label, price, GPU count, model provenance and preset."""
    from .models import default_device
    from .runs import RunDir, record_path

    device = cfg.device or default_device()
    try:
        where = resolve_model(cfg.model, cfg.base_model)
    except SaetuneError:
        if not given_backend:
            raise
        where = {"path": cfg.model, "adapter": None, "run_dir": None}  # the given backend holds the model
    run_dir = RunDir.open(out, "eval", cfg, resume=resume, overwrite=overwrite, seed=cfg.seed, device=device,
                          resume_ignore=("progress", "label"),
                          inputs=tuple(filter(None, (where["path"], where["adapter"]))))
    m = run_dir.manifest
    m["label"] = cfg.label
    m["gpu_hour_usd"] = cfg.gpu_hour_usd  # finish() prices gpu_hours at it ($SAETUNE_GPU_HOUR_USD overrides)
    m["n_gpus"] = (cfg.tensor_parallel_size * cfg.data_parallel_size if cfg.backend == "vllm"
                   else int(device.startswith("cuda")))
    if where["run_dir"]:
        m["model_run"] = _model_provenance(Path(where["run_dir"]))
        for rec in (m["model_run"], *m["model_run"]["stages"]):
            rec["path"] = record_path(rec["path"], run_dir.path)
    preset = _preset_settings(cfg, where)
    m["preset"] = preset
    return run_dir, where, device, preset


def _record_eval_inputs(run_dir, where: dict[str, Any], benches: list[_Bench], own_backend: bool) -> None:
    """The manifest's inputs: the model and adapter this run loaded itself, and each local benchmark file."""
    if own_backend:
        run_dir.add_input("model", where["path"], digest=None if Path(where["path"]).exists() else "hub")
        if where["adapter"]:
            run_dir.add_input("adapter", where["adapter"])
    for b in benches:
        if Path(b.source).exists():
            run_dir.add_input(f"benchmark:{b.name}", b.source)


def _eval_benchmarks(cfg: EvalConfig, benches: list[_Bench], backend, run_dir, batch: int, grader: Grader,
                     preset: dict[str, Any], *, resume: bool) -> dict[str, dict[str, Any]]:
    """The loop of :func:`run`: each benchmark in turn (continuing the samples file on ``resume``, else
    starting it anew); ``results.json`` is rewritten after each, so finished benchmarks are readable early."""
    from .io import atomic_write_json

    samples_path = run_dir.path / SAMPLES_FILE
    previous = read_samples(samples_path, _SLIM_KEYS) if resume else []
    if not resume:
        samples_path.unlink(missing_ok=True)
    results: dict[str, dict[str, Any]] = {}
    counts = {"samples": len(previous), "tokens": sum(int(r["n_tokens"]) for r in previous)}
    for b in benches:
        results[b.name] = _eval_benchmark(cfg, b, backend, run_dir, previous, batch, counts,  # extends previous
                                          grader, preset)
        atomic_write_json(run_dir.path / RESULTS_FILE, results)  # finished benchmarks are readable early
    return results


def _finish_eval(run_dir, results: dict[str, dict[str, Any]]) -> None:
    """The end of :func:`run`: artifacts, per-benchmark throughput in the manifest, and the run marked complete
    with the headline numbers of each benchmark."""
    run_dir.add_artifact("results", RESULTS_FILE)
    run_dir.add_artifact("samples", SAMPLES_FILE)
    run_dir.manifest["throughput"] = {
        name: {k: e[k] for k in ("problems_per_s", "tokens_per_s", "generate_seconds", "grade_seconds")}
        for name, e in results.items()}
    run_dir.finish(results={n: {k: e[k] for k in ("n", "samples_per_problem", "pass@1", "avg@k", "ci95",
                                                  "unparsable_gold")} for n, e in results.items()})


def _eval_benchmark(cfg: EvalConfig, b: _Bench, backend, run_dir, previous: list[dict[str, Any]], batch: int,
                    counts: dict[str, int], grader: Grader, preset: dict[str, Any]) -> dict[str, Any]:
    """Sample, grade and record the samples of one benchmark that are not yet in the samples file."""
    from tqdm.auto import tqdm

    from .eval_presets import gold_ok
    from .generation import render_prompt

    samples_path = run_dir.path / SAMPLES_FILE
    tok = backend.tokenizer
    grade_all, params = _benchmark_grading(cfg, b, tok, grader, preset)
    prompts = [render_prompt(tok, r["user"], cfg.template) for r in b.rows]
    with run_dir.phase(f"grade:{b.name}"):
        golds = [r["gold"] for r in b.rows]
        parses = [True] * len(b.rows) if b.toy else grader.map(gold_ok, golds, [b.kind] * len(golds))
        unparsable = [i for i, ok in enumerate(parses) if not ok]
    # longest prompts first: a batch pads little, and a too-long prompt fails at once
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    done = {(r["problem_index"], r["sample_index"]) for r in previous if r["benchmark"] == b.name}
    todo = [(p, s) for p in order for s in range(cfg.samples) if (p, s) not in done]
    total = len(b.rows) * cfg.samples
    bar = tqdm(total=total, initial=total - len(todo), desc=f"eval {b.name}", unit="sample",
               disable=not cfg.progress)
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        with run_dir.phase(f"generate:{b.name}"):
            comps = backend.generate([prompts[p] for p, _ in chunk], params,
                                     [_sample_seed(cfg.seed, b.name, p, s) for p, s in chunk])
        with run_dir.phase(f"grade:{b.name}"):
            graded = grade_all([c.text for c in comps], [b.rows[p]["gold"] for p, _ in chunk])
        rows = _sample_rows(cfg, b, prompts, chunk, comps, graded)
        _append_rows(samples_path, rows)
        previous.extend({k: r[k] for k in _SLIM_KEYS} for r in rows)
        counts["samples"] += len(rows)
        counts["tokens"] += sum(r["n_tokens"] for r in rows)
        run_dir.log({"step": counts["samples"], "tokens": counts["tokens"], "benchmark": b.name,
                     "accuracy_batch": round(sum(r["correct"] for r in rows) / len(rows), 4)})
        bar.update(len(rows))
    bar.close()
    rows = [r for r in previous if r["benchmark"] == b.name]
    return _entry(b, rows, cfg, run_dir.manifest["phases"], unparsable, preset)


def _benchmark_grading(cfg: EvalConfig, b: _Bench, tok, grader: Grader, preset: dict[str, Any]):
    """``(grade_all, params)`` of one benchmark: ``grade_all(texts, golds)`` → one ``{correct, gold_extracted,
    extracted}`` per response (the toy's exact match here, else ``eval_presets.grade_one`` through ``grader``),
    and the :class:`~saetune.generation.SamplingParams` (the toy stops at ``</answer>`` and caps the new
    tokens at its longest trace)."""
    from .eval_presets import grade_one
    from .generation import SamplingParams

    stop: tuple[int, ...] = ()
    max_new = preset["max_new_tokens"]
    if b.toy:
        from .toy import task
        from .toy.build import max_new_tokens as toy_max_new_tokens
        close = tok.convert_tokens_to_ids(task.ANSWER_CLOSE)
        stop = (int(close),) if close is not None and close != tok.unk_token_id else ()
        max_new = min(max_new, toy_max_new_tokens())

        def grade_all(texts: list[str], golds: list[str]) -> list[dict[str, Any]]:
            return [{"correct": task.is_correct(t, g), "gold_extracted": None,
                     "extracted": [x] if (x := task.extract_answer(t)) is not None else []}
                    for t, g in zip(texts, golds)]
    else:
        def grade_all(texts: list[str], golds: list[str]) -> list[dict[str, Any]]:
            return grader.apply(grade_one, texts, golds, [b.kind] * len(texts))
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new,
                            stop_token_ids=stop, max_total_tokens=preset["max_total_tokens"] or 0)
    return grade_all, params


def _sample_rows(cfg: EvalConfig, b: _Bench, prompts: list[str], chunk: list[tuple[int, int]], comps,
                 graded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``samples.jsonl`` rows of one generated and graded batch.

    Every number can be audited: the exact prompt text (after the template), the gold as graded and
    where it came from, what was done to the problem text, and what the grader read from the response.
    """
    return [{"benchmark": b.name, "problem_index": p, "sample_index": s, "preset": cfg.preset,
             "prompt": prompts[p], "prompt_edits": b.rows[p]["prompt_edits"], "response": c.text,
             "gold": b.rows[p]["gold"], "gold_source": b.rows[p]["gold_source"],
             "gold_extracted": g["gold_extracted"], "extracted": g["extracted"], "correct": bool(g["correct"]),
             "n_tokens": int(c.n_tokens), "truncated": bool(c.truncated),
             **({"choices": b.rows[p]["choices"]} if "choices" in b.rows[p] else {})}
            for (p, s), c, g in zip(chunk, comps, graded)]


# --------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------

def _eval_dirs(path: Path) -> list[Path]:
    """``path`` if it holds ``eval/results.json``, else its sub-dirs that do (a pipeline's parent dir)."""
    if (path / RESULTS_FILE).exists():
        return [path]
    if path.is_dir():
        subs = sorted(p for p in path.iterdir() if (p / RESULTS_FILE).exists())
        if subs:
            return subs
    raise SaetuneError(f"{str(path)!r} holds no {RESULTS_FILE} (nor do its sub-dirs); pass eval run dirs")


def compare(run_dirs: Sequence[str | Path], metric: str = "pass@1", allow_mixed_presets: bool = False):
    """A table of several eval runs: one row per run, one column per benchmark, then the rest.

    ``run_dirs``: eval run dirs, or parent dirs whose sub-dirs are eval runs (a demo). A row is
    labelled by the run's ``label`` (base, source, SAE-tuned, control, …) or else its dir name.
    Benchmark columns hold ``metric`` in percent — ``pass@1``, ``avg@k`` or ``pass@k:K`` (e.g.
    ``pass@k:16``) — and ``avg`` their mean over the benchmarks the run has; then ``n`` (problems
    × samples per benchmark, e.g. ``30x1``), ``preset`` (the eval preset: runs written before
    presets existed are ``saetune``), ``eval_s`` and ``eval_usd`` (the eval's wall time
    and estimated cost) and ``model_s`` / ``model_usd`` (those of the runs that produced the
    model, when the model was a saetune run dir — a merge run adds the tune run it merged: the
    "SAE-Tuning: X minutes, $Y" of Resa).
    Runs of different presets grade differently, so their numbers do not compare: they are refused
    unless ``allow_mixed_presets``, and then the frame's ``attrs["note"]`` says so (printed under
    the table by :func:`format_table`).
    Returns a ``pandas.DataFrame`` indexed by label; :func:`format_table` renders it.

    This is the wide table of ``saetune eval --compare``, strict about its input (a run without
    ``results.json`` or without the asked pass@k is an error). The explorer's Compare page shows
    another view, :func:`saetune.analysis.comparison_table`: one row per (model, benchmark) with the
    95 % interval, tolerant of half-written dirs, and adding a pipeline's ``summary.json`` rows.
    """
    import pandas as pd

    key, k = _metric_key(metric)
    records, benchmarks = [], []
    for d in (sub for p in run_dirs for sub in _eval_dirs(Path(p))):
        records.append(_compare_row(d, key, k, benchmarks))  # extends benchmarks
    labels = [r["label"] for r in records]
    for i, r in enumerate(records):  # two runs with one label stay apart
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} ({Path(r['run_dir']).name})"
    note = _mixed_presets_note(records, allow_mixed_presets)
    cols = ["label", *benchmarks, "avg", "n", "preset", "eval_s", "eval_usd", "model_s", "model_usd", "run_dir"]
    df = pd.DataFrame.from_records(records, columns=cols).set_index("label")
    df.attrs["note"] = note
    return df


def _metric_key(metric: str) -> tuple[str, str | None]:
    """``(results key, k)`` of a :func:`compare` metric: ``pass@1`` / ``avg@k`` (k None) or ``pass@k:K``."""
    if metric.startswith("pass@k:"):
        return "pass@k", metric.split(":", 1)[1]
    if metric in ("pass@1", "avg@k"):
        return metric, None
    raise SaetuneError(f"metric {metric!r}; valid: pass@1, avg@k, pass@k:K (e.g. pass@k:16)")


def _compare_row(d: Path, key: str, k: str | None, benchmarks: list[str]) -> dict[str, Any]:
    """One eval run's row of :func:`compare` (metric in percent per benchmark, their mean, sizes, preset, time
    and cost of the eval and of the model's making); benchmarks not yet in ``benchmarks`` are appended to it."""
    from .runs import read_manifest

    results = json.loads((d / RESULTS_FILE).read_text())
    try:
        man = read_manifest(d)
    except SaetuneError:
        man = {}
    row: dict[str, Any] = {"label": man.get("label") or d.name}
    values = []
    for name, e in results.items():
        if name not in benchmarks:
            benchmarks.append(name)
        v = e[key] if k is None else e[key].get(k)
        if v is None:
            raise SaetuneError(f"{str(d)!r}: benchmark {name!r} has no pass@{k} "
                               f"(its ks: {', '.join(e[key])})")
        row[name] = 100.0 * v
        values.append(100.0 * v)
    row["avg"] = sum(values) / len(values) if values else float("nan")
    row["n"] = " ".join(f"{e['n']}x{e['samples_per_problem']}" for e in results.values())
    row["preset"] = ",".join(sorted({str(e.get("preset", "saetune")) for e in results.values()})) or "saetune"
    row["eval_s"] = man.get("wall_seconds")
    row["eval_usd"] = man.get("estimated_cost_usd")
    src = man.get("model_run") or {}
    row["model_s"] = src.get("wall_seconds")
    row["model_usd"] = src.get("estimated_cost_usd")
    row["run_dir"] = str(d)
    return row


def _mixed_presets_note(records: list[dict[str, Any]], allow_mixed_presets: bool) -> str:
    """"" when every row has one preset; else the note printed under the table, or, unless
    ``allow_mixed_presets``, a refusal naming each row's preset."""
    presets = sorted({r["preset"] for r in records})
    if len(presets) <= 1:
        return ""
    which = "; ".join(f"{r['label']}: {r['preset']}" for r in records)
    if not allow_mixed_presets:
        raise SaetuneError(f"these eval runs use different presets ({which}); presets grade differently, so "
                           "their numbers do not compare. Compare runs of one preset, or pass "
                           "allow_mixed_presets (--allow-mixed-presets) to show them with a note")
    return (f"Note: these runs use different eval presets ({', '.join(presets)}): each preset makes prompts and "
            "grades answers its own way, so rows of different presets do not compare.")


def format_table(df, digits: int = 2) -> str:
    """A Markdown table of :func:`compare`'s frame (numbers rounded, missing values blank, no run_dir),
    followed by the frame's note (mixed presets), if any."""
    import pandas as pd

    note = df.attrs.get("note", "")
    df = df.drop(columns=[c for c in ("run_dir",) if c in df.columns])
    header = [df.index.name or "", *map(str, df.columns)]

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)) or (not isinstance(v, str) and pd.isna(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    rows = [[str(i), *(cell(v) for v in r)] for i, r in zip(df.index, df.itertuples(index=False))]
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows),
                      *(["", note] if note else [])])
