"""Evaluating reasoning models on math benchmarks: benchmarks, the eval stage, comparisons.

- :func:`load_benchmark`, :func:`resolve_benchmark` (from :mod:`saetune.benchmarks`, re-exported) —
  ``problem``/``answer`` rows from a local file, a known name or a HF dataset id;
- the stage (``saetune eval``): :class:`EvalConfig` and :func:`run`, which samples through a
  backend of :mod:`saetune.generation`, grades, and writes ``eval/results.json`` and
  ``eval/samples.jsonl`` into a run dir (resumable per batch);
- :func:`compare` and :func:`format_table` put several eval runs side by side (base / source /
  SAE-tuned / controls).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from .config import opt
from .errors import SaetuneError
from .grading import Grader, extract_graded_text, gold_parses, is_correct, last_answer_tag, last_boxed, normalize_answer
from .scoring import avg_at_k, default_ks, pass_at_k, summarize
from .benchmarks import (BENCHMARKS_DIR_ENV, BOXED_INSTRUCTION, KNOWN_BENCHMARKS, RESA_BENCHMARKS, KnownBenchmark,
                         load_benchmark, resolve_benchmark)

__all__ = [
    "extract_graded_text", "last_boxed", "last_answer_tag", "normalize_answer", "is_correct", "gold_parses",
    "pass_at_k", "avg_at_k", "summarize", "load_benchmark", "resolve_benchmark", "KNOWN_BENCHMARKS",
    "EvalConfig", "resolve_model", "run", "read_samples", "compare", "format_table",
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
    benchmarks: list[str] = opt(factory=list, help=(
        "benchmarks: 'toy' (exact-match toy task), known names aime24 aime25 amc23 math500 minerva "
        "math-beyond, local .jsonl/.json/.parquet files, or hub dataset ids (e.g. brendel-group/MATH-Beyond); "
        "empty = 'toy' for a toy model, else aime24 aime25 amc23 math500 minerva"))
    benchmarks_dir: str = opt("", "dir holding the known benchmarks' JSONL files (default: $SAETUNE_BENCHMARKS_DIR; "
                                  "names not found there are read from the hub)")
    split: str = opt("test", "split of a hub dataset that is not a known benchmark")
    problem_field: str = opt("problem", "problem field of benchmark files and unknown hub datasets")
    answer_field: str = opt("answer", "gold answer field of benchmark files and unknown hub datasets")
    add_instruction: bool = opt(True, "append 'Please reason step by step, and put your final answer within "
                                      "\\boxed{}.' to math problems that do not mention \\boxed")
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
    name: str
    source: str
    rows: list[dict[str, str]]
    toy: bool  # exact-match toy grader instead of math-verify


def _load_benchmarks(cfg: EvalConfig, toy_model: bool) -> list[_Bench]:
    from .toy.build import EVAL_SEED_OFFSET

    specs = list(cfg.benchmarks) or (["toy"] if toy_model else list(RESA_BENCHMARKS))
    out, names = [], set()
    for spec in specs:
        name, source, split, pf, af = resolve_benchmark(spec, cfg.benchmarks_dir)
        if name in names:
            raise SaetuneError(f"two benchmarks resolve to the name {name!r}; rename one of the files")
        names.add(name)
        if source == "toy":
            from .toy import task
            n = min(cfg.toy_problems, cfg.limit) if cfg.limit else cfg.toy_problems
            rows = [{"problem": e["problem"], "answer": e["answer"]} for e in task.examples(n, EVAL_SEED_OFFSET)]
            out.append(_Bench(name, source, rows, toy=True))
            continue
        rows = load_benchmark(source, pf or cfg.problem_field, af or cfg.answer_field, cfg.limit,
                              split or cfg.split)
        if cfg.add_instruction:
            for r in rows:
                if "\\boxed" not in r["problem"]:
                    r["problem"] = f"{r['problem'].rstrip()}\n{BOXED_INSTRUCTION}"
        out.append(_Bench(name, source, rows, toy=False))
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


def _build_backend(cfg: EvalConfig, where: dict[str, Any], device: str, batch: int):
    from .generation import HFBackend, VLLMBackend

    if cfg.backend == "vllm":
        if where["adapter"]:
            raise SaetuneError("backend 'vllm' evaluates model dirs; merge the adapter first (saetune merge) or "
                               "use backend 'hf'")
        return VLLMBackend(where["path"], cfg.tensor_parallel_size, cfg.data_parallel_size, dtype=cfg.dtype,
                           gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed,
                           trust_remote_code=cfg.trust_remote_code, max_model_len=cfg.max_model_len or None,
                           template=cfg.template)
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
           unparsable: list[int]) -> dict[str, Any]:
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
        "grader": "toy exact match" if bench.toy else "math-verify",
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


def run(cfg: EvalConfig, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
        backend: Any = None) -> dict[str, dict[str, Any]]:
    """Evaluate ``cfg.model`` on ``cfg.benchmarks`` into run dir ``out``; returns ``results.json``'s dict.

    For each benchmark: render prompts (``cfg.template``), sample ``cfg.samples`` responses per
    problem in chunks of ``cfg.batch_size``, grade each (the toy's exact match, or
    :func:`is_correct` — in this thread when it is the main one, else in a worker process), and
    append the chunk to ``eval/samples.jsonl`` (one row per sample: ``benchmark``,
    ``problem_index``, ``sample_index``, ``prompt``, ``response``, ``gold``, ``correct``,
    ``n_tokens``, ``truncated``). ``resume=True`` skips every sample already in that file.
    ``eval/results.json`` maps each benchmark to :func:`summarize`'s entry plus
    ``unparsable_gold`` (count) and throughput (``problems_per_s``, ``tokens_per_s``); the
    manifest records the same throughput, wall time per phase, GPU-hours and the cost at
    ``cfg.gpu_hour_usd`` ($SAETUNE_GPU_HOUR_USD overrides it). ``backend`` replaces the model
    loading (any object with the :class:`saetune.generation.Backend` interface).

    Example — greedy accuracy of a toy model dir on 128 toy problems::

        res = run(EvalConfig(model="runs/toy/model", benchmarks=["toy"], temperature=0, toy_problems=128),
                  "runs/eval-toy")
        res["toy"]["pass@1"]
    """
    from .io import atomic_write_json
    from .models import default_device
    from .runs import RunDir, record_path

    device = cfg.device or default_device()
    try:
        where = resolve_model(cfg.model, cfg.base_model)
    except SaetuneError:
        if backend is None:
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
    batch = cfg.batch_size or (1024 if cfg.backend == "vllm" else 32)
    own_backend = backend is None
    grader = Grader(cfg.grade_workers, cfg.grade_timeout_s)
    try:
        with run_dir.phase("load"):
            if own_backend:
                backend = _build_backend(cfg, where, device, batch)
            benches = _load_benchmarks(cfg, cfg.model == "toy" or _is_toy_tokenizer(backend.tokenizer))
        if own_backend:
            run_dir.add_input("model", where["path"], digest=None if Path(where["path"]).exists() else "hub")
            if where["adapter"]:
                run_dir.add_input("adapter", where["adapter"])
        for b in benches:
            if Path(b.source).exists():
                run_dir.add_input(f"benchmark:{b.name}", b.source)
        samples_path = run_dir.path / SAMPLES_FILE
        previous = read_samples(samples_path, _SLIM_KEYS) if resume else []
        if not resume:
            samples_path.unlink(missing_ok=True)
        results: dict[str, dict[str, Any]] = {}
        counts = {"samples": len(previous), "tokens": sum(int(r["n_tokens"]) for r in previous)}
        for b in benches:
            results[b.name] = _eval_benchmark(cfg, b, backend, run_dir, previous, batch, counts,  # extends previous
                                              grader)
            atomic_write_json(run_dir.path / RESULTS_FILE, results)  # finished benchmarks are readable early
        run_dir.add_artifact("results", RESULTS_FILE)
        run_dir.add_artifact("samples", SAMPLES_FILE)
        m["throughput"] = {name: {k: e[k] for k in ("problems_per_s", "tokens_per_s", "generate_seconds",
                                                      "grade_seconds")} for name, e in results.items()}
        run_dir.finish(results={n: {k: e[k] for k in ("n", "samples_per_problem", "pass@1", "avg@k", "ci95",
                                                      "unparsable_gold")} for n, e in results.items()})
        return results
    except KeyboardInterrupt:
        run_dir.fail("interrupted")
        raise
    except BaseException as e:
        run_dir.fail(str(e) or type(e).__name__)
        raise
    finally:
        grader.close()
        if own_backend and backend is not None:
            backend.close()


def _eval_benchmark(cfg: EvalConfig, b: _Bench, backend, run_dir, previous: list[dict[str, Any]], batch: int,
                    counts: dict[str, int], grader: Grader) -> dict[str, Any]:
    """Sample, grade and record the samples of one benchmark that are not yet in the samples file."""
    from tqdm.auto import tqdm

    from .generation import SamplingParams, render_prompt

    samples_path = run_dir.path / SAMPLES_FILE
    tok = backend.tokenizer
    stop: tuple[int, ...] = ()
    max_new = cfg.max_new_tokens
    if b.toy:
        from .toy import task
        from .toy.build import max_new_tokens as toy_max_new_tokens
        close = tok.convert_tokens_to_ids(task.ANSWER_CLOSE)
        stop = (int(close),) if close is not None and close != tok.unk_token_id else ()
        max_new = min(max_new, toy_max_new_tokens())

        def grade_all(texts: list[str], golds: list[str]) -> list[bool]:
            return [task.is_correct(t, g) for t, g in zip(texts, golds)]
    else:
        def grade_all(texts: list[str], golds: list[str]) -> list[bool]:
            return grader.grade(texts, golds)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new,
                            stop_token_ids=stop)
    prompts = [render_prompt(tok, r["problem"], cfg.template) for r in b.rows]
    with run_dir.phase(f"grade:{b.name}"):
        parses = [True] * len(b.rows) if b.toy else grader.gold_parses([r["answer"] for r in b.rows])
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
            correct = grade_all([c.text for c in comps], [b.rows[p]["answer"] for p, _ in chunk])
        rows = [{"benchmark": b.name, "problem_index": p, "sample_index": s, "prompt": prompts[p],
                 "response": c.text, "gold": b.rows[p]["answer"], "correct": bool(ok), "n_tokens": int(c.n_tokens),
                 "truncated": bool(c.truncated)} for (p, s), c, ok in zip(chunk, comps, correct)]
        _append_rows(samples_path, rows)
        previous.extend({k: r[k] for k in _SLIM_KEYS} for r in rows)
        counts["samples"] += len(rows)
        counts["tokens"] += sum(r["n_tokens"] for r in rows)
        run_dir.log({"step": counts["samples"], "tokens": counts["tokens"], "benchmark": b.name,
                     "accuracy_batch": round(sum(r["correct"] for r in rows) / len(rows), 4)})
        bar.update(len(rows))
    bar.close()
    rows = [r for r in previous if r["benchmark"] == b.name]
    return _entry(b, rows, cfg, run_dir.manifest["phases"], unparsable)


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


def compare(run_dirs: Sequence[str | Path], metric: str = "pass@1"):
    """A table of several eval runs: one row per run, one column per benchmark, then the rest.

    ``run_dirs``: eval run dirs, or parent dirs whose sub-dirs are eval runs (a demo). A row is
    labelled by the run's ``label`` (base, source, SAE-tuned, control, …) or else its dir name.
    Benchmark columns hold ``metric`` in percent — ``pass@1``, ``avg@k`` or ``pass@k:K`` (e.g.
    ``pass@k:16``) — and ``avg`` their mean over the benchmarks the run has; then ``n`` (problems
    × samples per benchmark, e.g. ``30x1``), ``eval_s`` and ``eval_usd`` (the eval's wall time
    and estimated cost) and ``model_s`` / ``model_usd`` (those of the runs that produced the
    model, when the model was a saetune run dir — a merge run adds the tune run it merged: the
    "SAE-Tuning: X minutes, $Y" of Resa).
    Returns a ``pandas.DataFrame`` indexed by label; :func:`format_table` renders it.
    """
    import pandas as pd

    from .runs import read_manifest

    if metric.startswith("pass@k:"):
        key, k = "pass@k", metric.split(":", 1)[1]
    elif metric in ("pass@1", "avg@k"):
        key, k = metric, None
    else:
        raise SaetuneError(f"metric {metric!r}; valid: pass@1, avg@k, pass@k:K (e.g. pass@k:16)")
    records, benchmarks = [], []
    for d in (sub for p in run_dirs for sub in _eval_dirs(Path(p))):
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
        row["eval_s"] = man.get("wall_seconds")
        row["eval_usd"] = man.get("estimated_cost_usd")
        src = man.get("model_run") or {}
        row["model_s"] = src.get("wall_seconds")
        row["model_usd"] = src.get("estimated_cost_usd")
        row["run_dir"] = str(d)
        records.append(row)
    labels = [r["label"] for r in records]
    for i, r in enumerate(records):  # two runs with one label stay apart
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} ({Path(r['run_dir']).name})"
    cols = ["label", *benchmarks, "avg", "n", "eval_s", "eval_usd", "model_s", "model_usd", "run_dir"]
    return pd.DataFrame.from_records(records, columns=cols).set_index("label")


def format_table(df, digits: int = 2) -> str:
    """A Markdown table of :func:`compare`'s frame (numbers rounded, missing values blank, no run_dir)."""
    import pandas as pd

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
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
