"""Math benchmarks as ``problem``/``answer`` rows: local JSONL/JSON/Parquet files, known names
(:data:`KNOWN_BENCHMARKS`: AIME24/25, AMC23, MATH500, Minerva, MATH-Beyond, read from a benchmarks dir or
the hub) and HF dataset ids. A row with a missing field is named by its line."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SaetuneError
from .io import iter_lines_utf8


BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class KnownBenchmark:
    """A benchmark saetune knows by name: its file in a benchmarks dir and its hub dataset."""

    file: str | None  # file name inside a benchmarks dir (None: hub only)
    hub_id: str
    split: str
    problem_field: str = "problem"
    answer_field: str = "answer"
    config: str | None = None  # the hub dataset's config name, if it has several


KNOWN_BENCHMARKS: dict[str, KnownBenchmark] = {
    "aime24": KnownBenchmark("aime24.jsonl", "HuggingFaceH4/aime_2024", "train"),
    "aime25": KnownBenchmark("aime25.jsonl", "yentinglin/aime_2025", "train"),
    "amc23": KnownBenchmark("amc2023.jsonl", "knoveleng/AMC-23", "train"),
    "math500": KnownBenchmark("math500.jsonl", "HuggingFaceH4/MATH-500", "test"),
    "minerva": KnownBenchmark("minervamath.jsonl", "knoveleng/Minerva-Math", "train", answer_field="solution"),
    "math-beyond": KnownBenchmark(None, "brendel-group/MATH-Beyond", "test"),
    # multiple choice, gated on the hub: accept its terms there, or keep a local JSONL with its field names
    "gpqa": KnownBenchmark("gpqa_diamond.jsonl", "Idavidrein/gpqa", "train", "Question", "Correct Answer",
                           config="gpqa_diamond"),
    "gpqa_diamond": KnownBenchmark("gpqa_diamond.jsonl", "Idavidrein/gpqa", "train", "Question", "Correct Answer",
                                   config="gpqa_diamond"),
}
#: Resa's math benchmarks (SPEC_RESA.md); the sixth column of its average, GPQA-Diamond, is named apart.
RESA_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva")
GPQA_NAMES = ("gpqa", "gpqa_diamond")
#: GPQA's field names (its CSV headers, kept by the hub dataset): the question, the answer, three distractors.
GPQA_FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
BENCHMARKS_DIR_ENV = "SAETUNE_BENCHMARKS_DIR"


def canonical_benchmark(name: str) -> str | None:
    """The known benchmark a name or a local file's stem stands for (``amc2023`` → ``amc23``), else ``None``."""
    if name in KNOWN_BENCHMARKS:
        return name
    for known, k in KNOWN_BENCHMARKS.items():
        if k.file and Path(k.file).stem == name:
            return known
    return None


def _iter_jsonl(path: Path):
    """``(line number, row)`` of a JSONL file (1-based, blank lines skipped, bad JSON named)."""
    for i, line in iter_lines_utf8(path, "benchmark file"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SaetuneError(f"{str(path)!r} line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SaetuneError(f"{str(path)!r} line {i} holds a {type(row).__name__}, not a JSON object")
        yield i, row


def load_benchmark(source: str, problem_field: str = "problem", answer_field: str = "answer",
                   limit: int = 0, split: str = "train", keep: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows ``{"problem": str, "answer": str}`` from a local JSONL/JSON/Parquet file or a HF id.

    A JSONL row missing ``problem_field`` or ``answer_field`` is an error naming the file's line,
    the field and the fields present; a null or empty problem is an error naming the line; other
    sources name the row.
    A null answer becomes ``""`` (an unparsable gold: counted by :func:`run`, not an error).
    Answers are stringified (some datasets store AIME answers as ints); ``limit`` > 0 keeps the
    first rows. Hub ids are read through :func:`saetune.data.read_records`. Fields named in
    ``keep`` are copied as strings too, where a row has them (e.g. ``solution``).
    """
    p = Path(source).expanduser()
    if p.suffix == ".jsonl" and p.exists():
        located = []
        for line, row in _iter_jsonl(p):
            located.append((f"line {line}", row))
            if limit and len(located) >= limit:
                break
        if not located:
            raise SaetuneError(f"benchmark {source!r} is empty")
    else:
        from .data import read_records
        located = [(f"row {i}", row) for i, row in enumerate(read_records(source, split=split, limit=limit))]
    out = []
    for where, row in located:
        for field in (problem_field, answer_field):
            if field not in row:
                raise SaetuneError(f"benchmark {source!r} {where} has no field {field!r}; fields present: "
                                   f"{sorted(row)} (set problem_field/answer_field)")
        problem = row[problem_field]
        if problem is None or not str(problem).strip():
            raise SaetuneError(f"benchmark {source!r} {where}: field {problem_field!r} is "
                               f"{'null' if problem is None else 'empty'}; every row needs a problem text "
                               "(fix or drop that row)")
        answer = row[answer_field]
        out.append({"problem": str(row[problem_field]), "answer": "" if answer is None else str(answer).strip(),
                    **{k: str(row[k]) for k in keep if row.get(k) is not None}})
    return out


def is_gpqa_file(source: str) -> bool:
    """Whether a local file's first record carries GPQA's field names."""
    from .data import read_records
    p = Path(source).expanduser()
    if not p.is_file():
        return False
    try:
        first = read_records(str(p), limit=1)[0]
    except (SaetuneError, IndexError):
        return False
    return isinstance(first, dict) and all(f in first for f in GPQA_FIELDS)


def load_gpqa(source: str, limit: int = 0, split: str = "train", config: str | None = None) -> list[dict[str, Any]]:
    """GPQA rows ``{"question", "correct", "incorrect": [3 answers]}`` (texts stripped) from a local
    JSONL/JSON/Parquet file or a hub id (``Idavidrein/gpqa``, config ``gpqa_diamond``; gated: accept its
    terms on the hub and log in, or pass a local file). A record missing a field is named."""
    from .data import read_records
    try:
        records = read_records(source, split=split, limit=limit, config=config)
    except SaetuneError:
        raise
    except Exception as e:  # a gated or missing hub dataset: say what works instead
        raise SaetuneError(f"could not read GPQA from {source!r} ({type(e).__name__}: {e}); the hub dataset is "
                           "gated: accept its terms on huggingface.co and log in, or pass a local JSONL whose "
                           f"records have the fields {', '.join(GPQA_FIELDS)}") from None
    out = []
    for i, row in enumerate(records):
        missing = [f for f in GPQA_FIELDS if not isinstance(row, dict) or row.get(f) is None]
        if missing:
            raise SaetuneError(f"GPQA source {source!r} record {i} lacks {missing}; a GPQA record has the fields "
                               f"{', '.join(GPQA_FIELDS)}")
        out.append({"question": str(row["Question"]).strip(), "correct": str(row["Correct Answer"]).strip(),
                    "incorrect": [str(row[f"Incorrect Answer {j}"]).strip() for j in (1, 2, 3)]})
    return out


def _benchmarks_dir(configured: str) -> Path | None:
    d = configured or os.environ.get(BENCHMARKS_DIR_ENV, "")
    return Path(d).expanduser() if d else None


def resolve_benchmark(spec: str, benchmarks_dir: str = "") -> tuple[str, str, str, str, str]:
    """``(name, source, split, problem_field, answer_field)`` for one benchmark spec.

    ``spec`` is ``toy``; a local file; a known name (``aime24``, ``aime25``, ``amc23``,
    ``math500``, ``minerva``, ``math-beyond``) found as its file in ``benchmarks_dir`` (or
    ``$SAETUNE_BENCHMARKS_DIR``), else read from its hub dataset (``gpqa`` / ``gpqa_diamond``: the file
    ``gpqa_diamond.jsonl``, else ``Idavidrein/gpqa``); or any hub dataset id (known ids
    get their split and fields). Fields and split are empty when the caller's defaults apply.
    """
    if spec == "toy":
        return "toy", "toy", "", "", ""
    p = Path(spec).expanduser()
    if p.exists():
        return p.stem, str(p), "", "", ""
    by_hub = {k.hub_id.lower(): (name, k) for name, k in KNOWN_BENCHMARKS.items()}
    if spec.lower() in by_hub:
        name, known = by_hub[spec.lower()]
        return name, known.hub_id, known.split, known.problem_field, known.answer_field
    if spec in KNOWN_BENCHMARKS:
        known = KNOWN_BENCHMARKS[spec]
        d = _benchmarks_dir(benchmarks_dir)
        if d is not None and known.file and (d / known.file).exists():
            return (spec, str(d / known.file), "", *(("problem", "answer") if spec not in GPQA_NAMES
                                                      else (known.problem_field, known.answer_field)))
        return spec, known.hub_id, known.split, known.problem_field, known.answer_field
    if "/" in spec and not spec.startswith((".", "/", "~")) and not p.suffix:
        return spec, spec, "", "", ""
    raise SaetuneError(f"benchmark {spec!r} is neither 'toy', an existing file, a known name "
                       f"({', '.join(KNOWN_BENCHMARKS)}) nor a hub dataset id like 'org/name'")
