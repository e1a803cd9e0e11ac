"""Text for activations and tuning: dataset readers, Resa's template, chat templates, packing.

Resa (SPEC_RESA.md) trains on question/answer data rendered without a chat template as::

    {R1_ZERO_SYSTEM}User:\\n {problem}\\n\\nAssistant:\\n <think> {answer} </think>\\n<answer> Answer: {answer}</answer>

and packs the token streams into fixed-length chunks joined by EOS, one epoch, no shuffle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch

from .config import opt
from .errors import SaetuneError
from .io import iter_lines_utf8, read_text_utf8

# The reference's system prompt byte for byte: it opens with a newline and breaks its lines. STILL's
# problems are short, so this is a large share of every packed chunk; a paraphrase changes the tokens.
R1_ZERO_SYSTEM = (
    "\nA conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "The assistant first thinks about the reasoning process in the mind and then provides the user\n"
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and\n"
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>\n"
    "<answer> answer here </answer>.\n"
)


def resa_text(problem: str, answer: str) -> str:
    """Resa's Stage I/II training text: R1-Zero system prompt, the question, the answer as the 'thought'."""
    return (f"{R1_ZERO_SYSTEM}User:\n {problem}\n\nAssistant:\n <think> {answer} </think>\n"
            f"<answer> Answer: {answer}</answer>")


# The reference reads a record's question from `problem`, else `question`, else `prompt`.
PROBLEM_FALLBACKS = ("question", "prompt")


def problem_field_of(row: dict[str, Any], field: str) -> str:
    """The field holding ``row``'s question: ``field``, or for the default ``problem`` (absent or null)
    the first of ``question`` / ``prompt`` that the record has, as the reference reads it."""
    if field == "problem" and row.get(field) is None:
        for alt in PROBLEM_FALLBACKS:
            if row.get(alt) is not None:
                return alt
    return field


def chat_text(tokenizer, problem: str, response: str | None = None) -> str:
    """The tokenizer's chat template around one user turn (and the response, if given)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise SaetuneError("template 'chat' needs a tokenizer with a chat template; this one has none "
                           "(use template 'resa' or 'plain')")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                           add_generation_prompt=True)
    return prompt + (response or "")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes fixed-length token chunks."""

    dataset: str = opt("toy", "'toy' (the built-in arithmetic traces), 'toy-cotfree' (the same problems, the "
                              "think holding only the answer, as Resa's data text), a local .jsonl/.json/.parquet file, "
                              "or a Hugging Face dataset id")
    split: str = opt("train", "dataset split (HF datasets)")
    template: Literal["auto", "resa", "chat", "plain"] = opt(
        "auto", "how a record becomes text: 'resa' (R1-Zero prompt, answer as thought), 'chat' (tokenizer chat "
                "template), 'plain' (text_field as is); 'auto' = plain for 'toy' and records with text_field, "
                "else resa")
    text_field: str = opt("text", "field holding ready text (template 'plain')")
    problem_field: str = opt("problem", "field holding the question (templates 'resa', 'chat'); the default "
                                        "'problem' falls back to 'question', then 'prompt', as in the reference")
    answer_field: str = opt("answer", "field holding the answer (templates 'resa', 'chat')")
    response_field: str = opt("", "field holding a response to append after the chat prompt (optional)")
    context_size: int = opt(128, "tokens per packed chunk (Resa: 2048)")
    max_examples: int = opt(0, "use at most this many records (0 = all; for 'toy', how many traces to make)")
    data_seed: int = opt(0, "seed of the toy traces")


def read_records(source: str, split: str = "train", limit: int = 0, seed: int = 0,
                 config: str | None = None) -> list[dict[str, Any]]:
    """Records from 'toy', a local JSONL/JSON/Parquet file, or a HF dataset id (``config``: its config name)."""
    if source in ("toy", "toy-cotfree"):
        from .toy import examples
        from .toy.task import cot_free
        rows = examples(limit or 4096, seed)
        return [cot_free(r) for r in rows] if source == "toy-cotfree" else rows
    p = Path(source).expanduser()
    if p.exists():
        if p.suffix == ".jsonl":
            rows = []
            for i, line in iter_lines_utf8(p, "dataset file"):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SaetuneError(f"{source}: line {i} is not valid JSON ({e.msg})") from None
                if limit and len(rows) >= limit:
                    break
        elif p.suffix == ".json":
            try:
                rows = json.loads(read_text_utf8(p, "dataset file"))
            except json.JSONDecodeError as e:
                raise SaetuneError(f"dataset file {source!r} is not valid JSON: {e}") from None
            if isinstance(rows, dict):
                rows = next((v for v in rows.values() if isinstance(v, list)), [rows])
        elif p.suffix == ".parquet":
            import pandas as pd
            rows = pd.read_parquet(p).to_dict(orient="records")
        else:
            raise SaetuneError(f"dataset file {source!r} has suffix {p.suffix!r}; valid: .jsonl, .json, .parquet")
    else:
        rows = _read_hub(source, split, config)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise SaetuneError(f"dataset {source!r} (split {split!r}) is empty")
    return rows


def _read_hub(source: str, split: str, config: str | None = None) -> list[dict[str, Any]]:
    import re
    from .models import _hub_reachable
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise SaetuneError(f"dataset {source!r} is neither 'toy', an existing file, nor a hub id like 'org/name'")
    import datasets
    if not _hub_reachable():
        try:
            import os
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            ds = datasets.load_dataset(source, config, split=split)
        except Exception:
            raise SaetuneError(f"dataset {source!r} is not a local file, not in the local cache, and the hub is "
                               "unreachable; download it where there is network and pass a local .jsonl/.parquet")
    else:
        try:
            ds = datasets.load_dataset(source, config, split=split)
        except ValueError as e:
            raise SaetuneError(f"dataset {source!r}: {e}") from None
    return [dict(r) for r in ds]


def _where(source: str, i: int) -> str:
    """'record i', with its line number when the records came from a JSONL file (blank lines are skipped)."""
    p = Path(source).expanduser()
    if p.suffix == ".jsonl" and p.is_file():
        n = -1
        for line_no, line in iter_lines_utf8(p, "dataset file"):
            n += bool(line.strip())
            if n == i:
                return f"record {i} (line {line_no} of the file)"
    return f"record {i}"


def record_texts(records: list[dict[str, Any]], cfg: DataConfig, tokenizer=None) -> list[str]:
    """Render records to text with ``cfg.template``; a missing field is named with the fields present."""
    template = cfg.template
    if template == "auto":
        template = "plain" if (cfg.dataset in ("toy", "toy-cotfree") or cfg.text_field in records[0]) else "resa"

    def need(row: dict, field: str, i: int) -> Any:
        if field not in row:
            raise SaetuneError(f"dataset {cfg.dataset!r}: {_where(cfg.dataset, i)} has no field {field!r} (needed by "
                               f"template {template!r}); fields present: {', '.join(map(str, row))}")
        value = row[field]
        is_problem = field == problem_field_of(row, cfg.problem_field)
        if value is None or (is_problem and not str(value).strip()):  # empty text rows are fine
            raise SaetuneError(f"dataset {cfg.dataset!r}: in {_where(cfg.dataset, i)} field {field!r} is "
                               f"{'null' if value is None else 'empty'} (needed by template {template!r}); give "
                               f"every record a non-empty {field!r} or drop that record")
        return value

    out = []
    for i, row in enumerate(records):
        if template == "plain":
            out.append(str(need(row, cfg.text_field, i)))
        elif template == "resa":
            problem = str(need(row, problem_field_of(row, cfg.problem_field), i))
            out.append(resa_text(problem, str(need(row, cfg.answer_field, i))))
        else:
            resp = str(need(row, cfg.response_field, i)) if cfg.response_field else None
            out.append(chat_text(tokenizer, str(need(row, problem_field_of(row, cfg.problem_field), i)), resp))
    return out


def eos_id(tokenizer) -> int:
    e = tokenizer.eos_token_id
    if e is None:
        raise SaetuneError("the tokenizer has no EOS token, which packing needs to join examples")
    return int(e)


def iter_chunks(texts: Iterable[str], tokenizer, context_size: int) -> Iterator[torch.Tensor]:
    """Pack token streams into ``context_size`` chunks: doc₁ EOS doc₂ EOS … (the last partial chunk is dropped)."""
    if context_size < 2:
        raise SaetuneError(f"context_size must be at least 2, got {context_size}")
    eos = eos_id(tokenizer)
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buf.append(eos)
        while len(buf) >= context_size:
            yield torch.tensor(buf[:context_size], dtype=torch.long)
            buf = buf[context_size:]


def pack(texts: Iterable[str], tokenizer, context_size: int) -> torch.Tensor:
    """All chunks as one [N, context_size] long tensor."""
    chunks = list(iter_chunks(texts, tokenizer, context_size))
    if not chunks:
        raise SaetuneError(f"the data holds fewer than context_size={context_size} tokens; lower context_size "
                           "or add data")
    return torch.stack(chunks)


def load_chunks(cfg: DataConfig, tokenizer) -> torch.Tensor:
    """Read, render and pack the data of ``cfg``: [N, context_size] token ids."""
    records = read_records(cfg.dataset, cfg.split, cfg.max_examples, cfg.data_seed)
    return pack(record_texts(records, cfg, tokenizer), tokenizer, cfg.context_size)
