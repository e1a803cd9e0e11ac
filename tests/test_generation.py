"""Generation backends: prompt templates, response cutting, HF generate on the toy and a random Qwen2."""

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.generation import (Completion, HFBackend, SamplingParams, VLLMBackend, collect_stop_ids, cut_response,
                                encode_prompt, hf_generate, left_pad, render_prompt)
from saetune.toy import task
from saetune.toy.build import generate_responses, generation_stop_ids


def test_render_prompt_templates(toy_base):
    _, tok = toy_base
    assert render_prompt(tok, "compute ( 1 + 2 ) * 3 .", "chat") == "User : compute ( 1 + 2 ) * 3 . Assistant :"
    assert render_prompt(tok, "x", "raw") == "x"
    r1 = render_prompt(tok, "What is 2+2?", "r1zero")
    assert r1.startswith("\nA conversation between User and Assistant")
    assert r1.endswith("User:\n What is 2+2?\n\nAssistant:\n <think>")
    with pytest.raises(SaetuneError, match="valid: chat, r1zero, raw"):
        render_prompt(tok, "x", "alpaca")
    assert encode_prompt(tok, "User : compute", "chat") == tok("User : compute", add_special_tokens=False)["input_ids"]


def test_cut_response():
    # stop token kept unless it is EOS/pad; tokens after it dropped; n counts the stop token
    assert cut_response([7, 8, 5, 0, 0], stop_ids=[0, 5], drop_ids=[0], hit_cap=True) == ([7, 8, 5], 3, False)
    assert cut_response([7, 8, 0, 0], stop_ids=[0, 5], drop_ids=[0], hit_cap=True) == ([7, 8], 3, False)
    assert cut_response([7, 8, 9], stop_ids=[0], drop_ids=[0], hit_cap=True) == ([7, 8, 9], 3, True)


def test_left_pad_and_stop_ids_by_hand():
    ids, attn = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]] and ids.dtype == torch.long
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    tok = type("Tok", (), {"eos_token_id": 3})()
    assert collect_stop_ids(tok, [2, 3], (9, 2, 4)) == [2, 3, 9, 4]  # model EOS, tokenizer EOS, extras; no repeats
    assert collect_stop_ids(tok, None, ()) == [3]


def test_hf_generate_seeds_in_a_forked_rng(toy_base, one_thread):
    """The same seed gives the same samples, the caller's random state is untouched, and greedy rows equal an
    unbatched argmax (rows come back padded to one length)."""
    model, tok = toy_base
    prompts = [tok(e["prompt"], add_special_tokens=False)["input_ids"] for e in task.examples(3, 4)]
    stop = generation_stop_ids(tok)
    hot = SamplingParams(temperature=1.5, top_p=1.0, max_new_tokens=12)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = hf_generate(model, prompts, hot, tok.pad_token_id, stop, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == hf_generate(model, prompts, hot, tok.pad_token_id, stop, seed=7)
    assert len({len(r) for r in a}) == 1 and len(a[0]) <= 12
    greedy = hf_generate(model, prompts, SamplingParams(temperature=0, max_new_tokens=8), tok.pad_token_id, stop)
    for e, row in zip(task.examples(3, 4), greedy):  # an unpadded token-by-token argmax, cut like the helper's rows
        ref = _greedy_reference(model, tok, e["prompt"], set(stop), 8)
        assert row[:len(ref)] == ref and all(t == tok.pad_token_id for t in row[len(ref):])


def test_sampling_params_checked():
    with pytest.raises(SaetuneError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(SaetuneError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(SaetuneError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_hf_greedy_matches_toy_reference_and_batch_size(toy_base, one_thread):
    model, tok = toy_base
    exs = task.examples(12, seed=5)
    prompts = [e["prompt"] for e in exs]
    params = SamplingParams(temperature=0, max_new_tokens=60, stop_token_ids=tuple(generation_stop_ids(tok)))
    a = HFBackend(model, tok, batch_size=12).generate(prompts, params, [0] * 12)
    b = HFBackend(model, tok, batch_size=5).generate(prompts, params, [0] * 12)  # other left padding
    assert [c.text for c in a] == [c.text for c in b]
    ref = generate_responses(model, tok, prompts, batch_size=12)
    assert [task.extract_answer(c.text) for c in a] == [task.extract_answer(r) for r in ref]
    finished = [c for c in a if not c.truncated]
    assert finished and all(c.text.endswith("</answer>") and "<|endoftext|>" not in c.text for c in finished)
    assert all(c.n_tokens == len(tok(c.text, add_special_tokens=False)["input_ids"]) for c in finished)


@torch.no_grad()
def _greedy_reference(model, tok, prompt: str, stop: set[int], cap: int) -> list[int]:
    """Token by token argmax on one unpadded prompt, up to and including the first stop token or ``cap`` tokens."""
    ids = torch.tensor([encode_prompt(tok, prompt, "chat")])
    out: list[int] = []
    while len(out) < cap and not (out and out[-1] in stop):
        nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_hf_truncated_marks_exactly_the_responses_that_hit_the_cap(toy_base, one_thread):
    """Responses that end at the cap without a stop token are truncated, those with one are not (also when the stop
    token is the cap-th token). Caps 22 and 23: the toy's task responses are 23 tokens, so each cap sees both."""
    model, tok = toy_base
    prompts = [e["prompt"] for e in task.examples(4, seed=5)] + [
        "User : compute ( 1 + 2 ) * 3 . Assistant : <think> 1 + 2 = 3 . 3 * 3 = 9 .",  # stops after 10
        "User : 3 3 3 3 Assistant :",  # stops on its 22nd token
        "User : compute",  # repeats itself: never stops
        "( ( ( ( ( (",  # 26 tokens: past both caps
    ]
    stop = set(generation_stop_ids(tok)) | {tok.eos_token_id}
    ref = [_greedy_reference(model, tok, p, stop, 23) for p in prompts]
    for cap in (22, 23):
        params = SamplingParams(temperature=0, max_new_tokens=cap, stop_token_ids=tuple(generation_stop_ids(tok)))
        got = HFBackend(model, tok, batch_size=len(prompts)).generate(prompts, params, [0] * len(prompts))
        want_trunc = [not (stop & set(r[:cap])) for r in ref]
        assert any(want_trunc) and not all(want_trunc), (cap, want_trunc)  # the case covers both directions
        assert any(len(r) >= cap and r[cap - 1] in stop for r in ref), cap  # and a stop token exactly at the cap
        for p, c, r, t in zip(prompts, got, ref, want_trunc):
            n = cap if t else next(j + 1 for j, x in enumerate(r) if x in stop)
            assert (c.truncated, c.n_tokens) == (t, n), (cap, p, c)


def test_hf_sampling_on_random_qwen2_seeded(tiny_model_dir, one_thread):
    from saetune.models import load_model
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    backend = HFBackend(model, tok, batch_size=3, template="raw")
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6)
    prompts = ["User : compute ( 1 + 2 ) * 3 .", "User :", "compute 4 + 4 ."]
    a = backend.generate(prompts, params, [11, 12, 13])
    b = backend.generate(prompts, params, [11, 12, 13])
    c = backend.generate(prompts, params, [99, 12, 13])
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert all(isinstance(x, Completion) and 1 <= x.n_tokens <= 6 for x in a)
    # both directions: truncated exactly when the 6 tokens hold no EOS (dropped from token_ids, so n_tokens counts one
    # more than token_ids keeps when the response stopped)
    assert all(x.truncated == (x.n_tokens == 6 and len(x.token_ids) == 6 and tok.eos_token_id not in x.token_ids)
               for x in a)
    with pytest.raises(SaetuneError, match="one seed per prompt"):
        backend.generate(prompts, params, [1])


def test_vllm_missing_names_the_extra():
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed")
    except ImportError:
        pass
    with pytest.raises(SaetuneError, match=r"pip install saetune\[vllm\]"):
        VLLMBackend("toy")


def test_vllm_glue_with_a_stand_in_engine(monkeypatch, toy_base):
    """The vLLM backend's request building and decoding, against a stand-in for the vllm module."""
    import sys
    import types

    _, tok = toy_base
    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs

        def get_tokenizer(self):
            return tok

        def generate(self, requests, sampling_params, use_tqdm=False):
            seen["requests"], seen["params"] = requests, sampling_params
            ids = tok("<think> 1 + 2 = 3 . </think> <answer> 3 </answer>", add_special_tokens=False)["input_ids"]
            out = types.SimpleNamespace(token_ids=ids, finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out]) for _ in requests]

    def SP(**kw):
        return types.SimpleNamespace(**kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SP))
    backend = VLLMBackend("some/model", dtype="bfloat16", seed=3, template="chat")
    close = tok.convert_tokens_to_ids("</answer>")
    outs = backend.generate(["User : compute 1 + 2 . Assistant :"] * 2,
                            SamplingParams(max_new_tokens=50, stop_token_ids=(close,)), [7, 8])
    assert seen["kwargs"]["model"] == "some/model" and seen["kwargs"]["seed"] == 3
    assert seen["requests"][0] == {"prompt_token_ids": tok("User : compute 1 + 2 . Assistant :",
                                                           add_special_tokens=False)["input_ids"]}
    assert [p.seed for p in seen["params"]] == [7, 8] and close in seen["params"][0].stop_token_ids
    assert seen["params"][0].temperature == 0.6 and seen["params"][0].max_tokens == 50
    assert outs[0].text.endswith("<answer> 3 </answer>") and not outs[0].truncated and outs[0].n_tokens == 11


def test_hf_sampling_has_no_top_k_cut(toy_base, monkeypatch):
    model, tok = toy_base
    seen = []
    real = model.generate

    def spy(**kw):
        g = model._prepare_generation_config(kw["generation_config"])
        seen.append(g[0] if isinstance(g, tuple) else g)
        return real(**kw)

    monkeypatch.setattr(model, "generate", spy)
    HFBackend(model, tok).generate(["User : compute 1 + 2 . Assistant :"], SamplingParams(max_new_tokens=3), [0])
    g = seen[0]
    assert g.do_sample and g.temperature == 0.6 and g.top_p == 0.95 and g.top_k == 0
