"""The toy model organism: task, tokenizer, deterministic build, shipped base."""

from __future__ import annotations

import json
import random

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.toy import (ToyBuildConfig, build_model, build_tokenizer, build_toy, evaluate_toy, examples,
                         extract_answer, is_correct, load_toy, sample_problem, shipped_base_path, solution,
                         toy_texts)
from saetune.toy import build as toy_build
from saetune.toy import task


def left_to_right(expression: str) -> int:
    """Independent evaluator for ``( a op b ) op c``: drop parentheses, fold left to right."""
    words = [w for w in expression.split() if w not in "()"]
    acc = int(words[0])
    for op, y in zip(words[1::2], words[2::2]):
        y = int(y)
        acc = acc + y if op == "+" else acc - y if op == "-" else acc * y
    return acc


# ---- task -------------------------------------------------------------------------------------
def test_examples_are_deterministic_and_seed_dependent():
    assert examples(50, seed=3) == examples(50, seed=3)
    assert examples(50, seed=3) != examples(50, seed=4)


def test_answers_match_an_independent_evaluator():
    rng = random.Random(0)
    for _ in range(500):
        p = sample_problem(rng)
        assert p.question == f"compute {p.expression} ."
        assert p.answer == left_to_right(p.expression)
        assert all(1 <= x <= 9 for x in p.operands) and len(p.ops) == 2 and p.ops.count("*") <= 1
    for e in examples(200, seed=1):
        expr = e["problem"].removeprefix("compute ").removesuffix(" .")
        assert e["answer"] == str(left_to_right(expr))
        assert is_correct(e["response"], e["answer"])
        assert e["text"] == e["prompt"] + " " + e["response"]
        assert e["prompt"] == f"User : {e['problem']} Assistant :"


def test_trace_format_and_reasoning_phrases():
    rng = random.Random(0)
    for check_prob, expect in ((1.0, True), (0.0, False)):
        for _ in range(50):
            p = sample_problem(rng)
            r = solution(p, rng, check_prob=check_prob)
            assert r.startswith("<think> ") and f"</think> <answer> {p.answer} </answer>" in r
            assert r.endswith("</answer>")
            assert f"therefore the answer is {p.answer} . </think>" in r
            assert ("wait , let me check :" in r) is expect
            if expect:
                assert r.count("wait , let me check :") == 2
                x, op, y, res = p.steps()[0]
                assert f"{x} {op} {y} = {res} . wait , let me check : {x} {op} {y} = {res} ." in r
    mixed = [e["response"] for e in examples(200, seed=0, check_prob=0.3)]
    assert 0 < sum("wait" in r for r in mixed) < 200


def test_extract_answer_and_is_correct():
    assert extract_answer("<think> x </think> <answer> 14 </answer>") == "14"
    assert extract_answer("<answer> 1 </answer> <answer> -5 </answer>") == "-5"
    assert extract_answer("<think> no answer") is None
    assert is_correct("<answer> -5 </answer>", -5) and not is_correct("<answer> 5 </answer>", "-5")
    assert not is_correct("therefore the answer is 3", "3")


# ---- tokenizer --------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_vocab():
    tok = build_tokenizer()
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    for text in toy_texts(100, seed=0, check_prob=0.5):
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert len(ids) == len(text.split())  # one word, one token; no BOS
        assert tok.decode(ids) == text
    for special in ("<think>", "</think>", "<answer>", "</answer>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] in tok.all_special_ids
        assert tok.convert_tokens_to_ids(special) == ids[0]
    assert tok.convert_ids_to_tokens(tok("<think></think>")["input_ids"]) == ["<think>", "</think>"]
    lo, hi = task.value_range()
    for number in ("14", "-5", "162", str(lo), str(hi)):
        assert tok.convert_ids_to_tokens(tok(number)["input_ids"]) == [number]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.bos_token is None


def test_tokenizer_save_load_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    # Beside a qwen2 config.json, transformers 5 would swap in a byte-level Qwen2Tokenizer
    # unless the saved tokenizer opts out; save, load and re-save must all keep the word level.
    build_model(tok, 0, num_hidden_layers=1).config.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    e = examples(1, seed=5)[0]
    assert loaded(e["text"])["input_ids"] == tok(e["text"])["input_ids"]
    assert loaded.decode(loaded(e["text"])["input_ids"]) == e["text"]
    assert loaded.convert_ids_to_tokens(loaded("-72 162")["input_ids"]) == ["-72", "162"]
    user = [{"role": "user", "content": e["problem"]}]
    assert loaded.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == e["prompt"]
    both = user + [{"role": "assistant", "content": e["response"]}]
    assert loaded.apply_chat_template(both, tokenize=False) == e["text"]


# ---- model and build --------------------------------------------------------------------------
def test_build_model_is_seeded_and_leaves_global_rng_alone():
    tok = build_tokenizer()
    state = torch.random.get_rng_state()
    a, b, c = build_model(tok, 0), build_model(tok, 0), build_model(tok, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    cfg = a.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.tie_word_embeddings) == (4, 128, 4, 2, 512, True)
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id


def test_response_loss_masks_the_prompt():
    tok = build_tokenizer()
    groups = toy_build.encode_batch(tok, toy_build.train_batch(0, 0, 16, 0.3))
    assert sum(len(ids) for ids, _ in groups) == 16
    for ids, labels in groups:
        n_prompt = len(examples(1, 0)[0]["prompt"].split())
        assert (labels[:, :n_prompt] == -100).all() and (labels[:, n_prompt:] != -100).all()
        assert (ids[:, -1] == tok.eos_token_id).all()


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_builds")
    cfg = dict(steps=4, eval_problems=8, eval_every=2, threads=1)
    stats = {name: build_toy(ToyBuildConfig(seed=seed, **cfg), root / name, progress=False)
             for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    return root, stats


def test_build_is_deterministic(tiny_builds):
    root, stats = tiny_builds
    a, b, c = (root / n / "model" / "model.safetensors" for n in "abc")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    rows = [json.loads(line) for line in (root / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "accuracy" in rows[1] and "accuracy" in rows[3] and "accuracy" not in rows[0]
    assert rows[-1]["tokens"] > rows[0]["tokens"] > 0 and rows[-1]["loss"] < rows[0]["loss"]
    manifest = json.loads((root / "a" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stats"] == stats["a"]
    assert set(stats["a"]) == {"accuracy", "train_seconds", "steps", "n_params"}
    assert "model" in manifest["artifacts"]
    model, tok = load_toy(root / "a" / "model")
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("</answer>")]


def test_resume_after_interrupt_matches_uninterrupted_build(tiny_builds, tmp_path, monkeypatch):
    root, _ = tiny_builds
    real, calls = toy_build.response_loss, []

    def interrupt_at_step_3(model, groups):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, groups)

    cfg = ToyBuildConfig(seed=0, steps=4, eval_problems=8, eval_every=2, threads=1)
    monkeypatch.setattr(toy_build, "response_loss", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        build_toy(cfg, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"
    monkeypatch.setattr(toy_build, "response_loss", real)
    build_toy(cfg, tmp_path / "run", resume=True, progress=False)
    assert ((tmp_path / "run" / "model" / "model.safetensors").read_bytes()
            == (root / "a" / "model" / "model.safetensors").read_bytes())
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_config_errors_name_the_bad_value():
    with pytest.raises(SaetuneError, match="steps must be at least 1, got 0"):
        ToyBuildConfig(steps=0)
    with pytest.raises(SaetuneError, match="check_prob"):
        ToyBuildConfig(check_prob=1.5)


# ---- shipped base -----------------------------------------------------------------------------
def test_shipped_base_is_small_and_documented():
    base = shipped_base_path()
    size = sum(f.stat().st_size for f in base.iterdir() if f.is_file())
    assert size <= 5 * 2**20
    info = json.loads((base / "toy_build.json").read_text())
    assert info["accuracy"] >= 0.5 and info["config"]["seed"] == 0


def test_shipped_base_solves_fresh_problems(toy_base):
    model, tok = toy_base
    text = toy_texts(1, seed=7)[0]
    assert tok.decode(tok(text)["input_ids"]) == text and len(tok(text)["input_ids"]) == len(text.split())
    accuracy = evaluate_toy(model, tok, n=128, seed=12345, batch_size=128)
    assert accuracy >= 0.4, f"shipped toy model's greedy accuracy {accuracy:.2f} < 0.4"


def test_shipped_base_path_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_build, "BASE_DIR", tmp_path / "nowhere")
    with pytest.raises(SaetuneError, match=r"missing.*python -m saetune\.toy\.build --ship"):
        shipped_base_path()
    with pytest.raises(SaetuneError, match="missing"):
        load_toy()
