"""Templates (Resa, chat), packing, and dataset readers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saetune.data import (R1_ZERO_SYSTEM, DataConfig, chat_text, eos_id, iter_chunks, load_chunks, pack,
                          read_records, record_texts, resa_text)
from saetune.errors import SaetuneError

DATA = Path(__file__).resolve().parent / "data"  # a copy of the real AIME 2024 benchmark file

# Resa's Stage I/II data text and the start of the R1-Zero system prompt, as SPEC_RESA.md states them
SPEC_TEMPLATE = ("{SYSTEM}User:\\n {problem}\\n\\nAssistant:\\n <think> {answer} </think>\\n"
                 "<answer> Answer: {answer}</answer>")
SPEC_SYSTEM_START = ("A conversation between User and Assistant. The user asks a question, and the Assistant "
                     "solves it. The assistant first thinks about the reasoning process in the mind and then "
                     "provides the user with the answer. The reasoning process and answer are enclosed within "
                     "<think> </think> and <answer> </answer> tags, respectively")


@pytest.fixture(scope="module")
def tok():
    from saetune.toy.tokenizer import build_tokenizer

    return build_tokenizer()


# ---- Resa template ----------------------------------------------------------------------------

def spec_template() -> str:
    """The data-text template of SPEC_RESA.md, with its escapes turned into characters."""
    return SPEC_TEMPLATE.replace("\\n", "\n")


def test_resa_text_matches_spec_template():
    template = spec_template()
    assert template.startswith("{SYSTEM}User:")
    problem, answer = "What is $1+1$? Put it in \\boxed{}.", "2"
    expected = (template.replace("{SYSTEM}", R1_ZERO_SYSTEM).replace("{problem}", problem)
                .replace("{answer}", answer))
    assert resa_text(problem, answer) == expected
    assert resa_text(problem, answer).endswith("\n<answer> Answer: 2</answer>")
    assert "Assistant:\n <think> 2 </think>\n" in resa_text(problem, answer)


def test_r1_zero_system_prompt():
    assert " ".join(R1_ZERO_SYSTEM.split()).startswith(SPEC_SYSTEM_START)  # the exact bytes: test_resa_fidelity.py
    assert R1_ZERO_SYSTEM.endswith("<think> reasoning process here </think>\n<answer> answer here </answer>.\n")


def test_record_texts_resa_uses_fields():
    cfg = DataConfig(dataset="x.jsonl", template="resa", problem_field="q", answer_field="a")
    assert record_texts([{"q": "P?", "a": "7"}], cfg) == [resa_text("P?", "7")]
    # auto picks resa when there is no text field, plain when there is one
    auto = DataConfig(dataset="x.jsonl")
    assert record_texts([{"problem": "P", "answer": 3}], auto) == [resa_text("P", "3")]
    assert record_texts([{"text": "hello", "problem": "P", "answer": 3}], auto) == ["hello"]


def test_missing_field_names_field_and_lists_present(tmp_path):
    cfg = DataConfig(dataset="mine.jsonl", template="resa")
    with pytest.raises(SaetuneError) as e:
        record_texts([{"problem": "a", "answer": "b"}, {"query": "c", "solution": "d"}], cfg)
    msg = str(e.value)
    assert "record 1" in msg and "'problem'" in msg and "'resa'" in msg
    assert "fields present: query, solution" in msg  # (question/prompt would be read: the reference's fallback)
    with pytest.raises(SaetuneError, match="no field 'text'.*fields present: problem"):
        record_texts([{"problem": "a"}], DataConfig(dataset="f.jsonl", template="plain"))


# ---- chat template ----------------------------------------------------------------------------

def test_chat_template_with_toy_tokenizer(tok):
    from saetune.toy import examples

    ex = examples(3, seed=5)[0]
    prompt = chat_text(tok, ex["problem"])
    assert prompt == f"User : {ex['problem']} Assistant :" == ex["prompt"]
    full = chat_text(tok, ex["problem"], ex["response"])
    assert full == prompt + ex["response"]
    # the rendered text tokenizes exactly as the example's own text
    assert tok(full, add_special_tokens=False)["input_ids"] == tok(ex["text"], add_special_tokens=False)["input_ids"]
    cfg = DataConfig(dataset="f.jsonl", template="chat", response_field="response")
    assert record_texts([ex], cfg, tok) == [full]
    cfg = DataConfig(dataset="f.jsonl", template="chat")
    assert record_texts([ex], cfg, tok) == [prompt]


def test_chat_template_missing_is_refused(tok):
    t = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token)
    t.chat_template = None
    with pytest.raises(SaetuneError, match="chat template"):
        chat_text(t, "compute ( 1 + 2 ) .")


# ---- packing ----------------------------------------------------------------------------------

def test_packing_joins_by_eos_and_drops_last_partial(tok):
    texts = ["compute ( 1 + 2 ) .", "wait , let me check :", "therefore the answer is 3 .", "User :"]
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = eos_id(tok)
    stream = [i for d in docs for i in d + [eos]]
    assert len(stream) == 7 + 1 + 6 + 1 + 6 + 1 + 2 + 1
    for ctx in (2, 4, 5, 7, 25):
        chunks = pack(texts, tok, ctx)
        n = len(stream) // ctx
        assert chunks.shape == (n, ctx) and chunks.dtype == torch.long
        assert chunks.reshape(-1).tolist() == stream[:n * ctx]  # the partial tail is dropped
    chunks = pack(texts, tok, 8)
    assert chunks[0].tolist() == docs[0] + [eos]  # doc₁ EOS, then doc₂ begins the next chunk
    assert (chunks == eos).sum() == sum(1 for i in stream[:len(chunks) * 8] if i == eos)


WORDS = ["compute", "(", ")", "+", "-", "*", "=", ".", "wait", ",", "let", "me", "check", ":", "3", "14", "-5",
         "<think>", "</think>"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.lists(st.sampled_from(WORDS), min_size=0, max_size=12), min_size=1, max_size=8),
       ctx=st.integers(2, 17))
def test_packing_property(tok, docs, ctx):
    texts = [" ".join(d) for d in docs]
    stream = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    chunks = list(iter_chunks(texts, tok, ctx))
    assert len(chunks) == len(stream) // ctx
    assert all(c.shape == (ctx,) for c in chunks)
    assert [i for c in chunks for i in c.tolist()] == stream[:len(chunks) * ctx]


def test_iter_chunks_is_lazy_and_streaming(tok):
    def gen():
        yield "compute ( 1 + 2 ) ."
        raise AssertionError("packing read past what it needed")

    it = iter_chunks(gen(), tok, 4)
    assert next(it).tolist() == tok("compute ( 1 +", add_special_tokens=False)["input_ids"]


def test_packing_errors(tok):
    with pytest.raises(SaetuneError, match="at least 2"):
        pack(["compute"], tok, 1)
    with pytest.raises(SaetuneError, match="fewer than context_size=64 tokens"):
        pack(["compute ( 1 + 2 ) ."], tok, 64)


def test_load_chunks_toy(tok):
    cfg = DataConfig(dataset="toy", max_examples=50, context_size=32, data_seed=3)
    chunks = load_chunks(cfg, tok)
    assert chunks.shape[1] == 32 and chunks.shape[0] >= 40
    again = load_chunks(cfg, tok)
    assert torch.equal(chunks, again)  # the same seed gives the same data
    other = load_chunks(DataConfig(dataset="toy", max_examples=50, context_size=32, data_seed=4), tok)
    assert not torch.equal(chunks[:5], other[:5])
    assert (chunks == tok.unk_token_id).sum() == 0  # the toy tokenizer covers the toy task


# ---- readers ----------------------------------------------------------------------------------

ROWS = [{"problem": f"p{i}", "answer": str(i)} for i in range(5)]


def test_read_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in ROWS[3:]))
    assert read_records(str(f)) == ROWS
    assert read_records(str(f), limit=2) == ROWS[:2]


def test_read_json_list_and_dict(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(ROWS))
    assert read_records(str(f)) == ROWS
    f.write_text(json.dumps({"version": 1, "data": ROWS}))
    assert read_records(str(f), limit=3) == ROWS[:3]


def test_read_parquet(tmp_path):
    f = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(f)
    assert read_records(str(f)) == ROWS
    assert read_records(str(f), limit=1) == ROWS[:1]


def test_empty_dataset(tmp_path):
    for name, content in (("e.jsonl", "\n\n"), ("e.json", "[]")):
        f = tmp_path / name
        f.write_text(content)
        with pytest.raises(SaetuneError, match="is empty"):
            read_records(str(f))


def test_bad_suffix(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("problem,answer\n1,2\n")
    with pytest.raises(SaetuneError) as e:
        read_records(str(f))
    assert "'.csv'" in str(e.value) and ".jsonl, .json, .parquet" in str(e.value)


def test_invalid_json_line_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"problem\": \"p2\", \n")
    with pytest.raises(SaetuneError, match=r"line 3 is not valid JSON"):
        read_records(str(f))


def test_not_a_file_nor_hub_id():
    with pytest.raises(SaetuneError, match="neither 'toy', an existing file, nor a hub id"):
        read_records("/no/such/file.jsonl")


def test_toy_records():
    rows = read_records("toy", limit=7, seed=2)
    assert len(rows) == 7 and all("text" in r for r in rows)
    assert rows == read_records("toy", limit=7, seed=2)


def test_real_benchmark_file():
    rows = read_records(str(DATA / "aime24.jsonl"))
    assert len(rows) == 30
    assert all(set(r) >= {"problem", "answer"} for r in rows)
    assert all(isinstance(r["problem"], str) and r["problem"] for r in rows)
    texts = record_texts(rows, DataConfig(dataset="aime24.jsonl"))
    assert texts[0] == resa_text(rows[0]["problem"], str(rows[0]["answer"]))


def test_data_config_template_choices():
    from saetune.config import from_dict

    assert from_dict(DataConfig, {"template": "chat"}).template == "chat"
    with pytest.raises(SaetuneError, match="valid values: 'auto', 'resa', 'chat', 'plain'"):
        from_dict(DataConfig, {"template": "alpaca"})
