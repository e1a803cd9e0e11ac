"""Steering SAE latents during generation (saetune.steering) against references computed without the KV cache.

The reference re-runs the whole prefix at every step (no cache), edits the hook's activation at the positions the
schedule covers (decided by a rule written out here, not the module's), and takes the argmax. Steered generation
with the cache must give the same tokens; the edit must sit exactly at the scheduled positions; the recorded top
latents must be the top-k of ``sae.encode`` of the activation the model computed at each position.
"""

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.models import replace_activation, resolve_hook
from saetune.sae import SAE, SAEConfig
from saetune.steering import (VLLM_STEERING_REFUSAL, LatentEdit, Schedule, ThinkState, add, as_edits, clamp, edit_delta,
                              generate, intervene, parse_steer, scheduled_positions, steer_activation, think_tag_ids)

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "model.layers.1"
PROMPT = "User : compute ( 3 + 4 ) * 2 . Assistant :"


# ---- the maths, by hand ---------------------------------------------------------------------------------------

def test_edit_delta_is_the_clamp_and_add_formula_by_hand():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])  # 3 latents, d_in 2
    acts = torch.tensor([[0.5, 0.0, 2.0], [0.0, 1.0, 0.0]])  # 2 positions
    # clamp latent 0 to 4: (4 − a_0)·W[0]; add 1.5 of latent 2: 1.5·W[2]
    got = edit_delta(acts, W, [clamp(0, 4.0), add(2, 1.5)])
    want = torch.tensor([[3.5 * 1 + 4.5, 0.0 + 1.5], [4.0 + 4.5, 1.5]])
    torch.testing.assert_close(got, want)
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    torch.testing.assert_close(steer_activation(x, acts, W, {0: 4.0}, add={2: 1.5}), x + want)
    torch.testing.assert_close(steer_activation(x, acts, W, {1: 0.0}), x - acts[:, 1:2] * W[1])  # ablation
    assert steer_activation(x, acts, W, {}) is x
    assert as_edits({3: 1.0}) == (LatentEdit(3, 1.0, "clamp"),)
    assert parse_steer(["3=1.5", " 0 = -2 "]) == {3: 1.5, 0: -2.0}


def test_bad_edits_are_named():
    with pytest.raises(SaetuneError, match="edited twice"):
        as_edits([clamp(2, 1.0), add(2, 1.0)])
    with pytest.raises(SaetuneError, match="out of range.*8 latents"):
        as_edits([add(9, 1.0)], d_sae=8)
    with pytest.raises(SaetuneError, match="unknown latent edit mode 'scale'"):
        LatentEdit(1, 1.0, "scale")  # type: ignore[arg-type]
    with pytest.raises(SaetuneError, match="not FEATURE=VALUE"):
        parse_steer(["5=1.2.3"])
    with pytest.raises(SaetuneError, match="LatentEdit"):
        as_edits([(1, 2.0)])


# ---- schedules, by hand ---------------------------------------------------------------------------------------

def test_schedule_rule_by_hand():
    # prompt of 4 ids, then 5 generated; position p is step p − 3 (position 3 produces generated token 0)
    ids = [10, 11, 12, 13, 20, 21, 22, 23, 24]
    assert scheduled_positions(Schedule(), ids, 4) == [True] * 9
    assert scheduled_positions(Schedule.from_token(2), ids, 4) == [False] * 5 + [True] * 4
    assert scheduled_positions(Schedule.tokens(2, start=1), ids, 4) == [False] * 4 + [True, True] + [False] * 3
    assert scheduled_positions(Schedule.tokens(1), ids, 4) == [False, False, False, True] + [False] * 5
    # think: open = 12 (in the prompt), close = 22 (generated): inside from 12's position to the one before 22
    tags = ((12,), (22,))
    assert scheduled_positions(Schedule.think(), ids, 4, tags) == [False, False, False, True, True, True, False,
                                                                   False, False]
    assert scheduled_positions(Schedule(think_only=True), ids, 4, tags) == [False, False, True, True, True, True,
                                                                            False, False, False]
    # multi-token tags count once their last id is read; a second <think> opens again
    st = ThinkState((1, 2), (3, 2))
    assert st.feed([1, 2, 5, 3, 2, 2, 1, 2]) == [False, True, True, True, False, False, False, True]
    assert Schedule.parse("think+tokens:5@2") == Schedule(start=2, length=5, think_only=True, prompt=False)
    assert Schedule.parse("from:7") == Schedule.from_token(7) and Schedule.parse("always") == Schedule()
    assert Schedule.parse("always+think") == Schedule(think_only=True)
    with pytest.raises(SaetuneError, match="'sometimes'.*always, think, from:N"):
        Schedule.parse("think+sometimes")
    with pytest.raises(SaetuneError, match="length must be None"):
        Schedule.tokens(0)


def test_think_tag_ids_of_the_toy(toy_base):
    _, tok = toy_base
    op, cl = think_tag_ids(tok)
    assert len(op) == 1 and len(cl) == 1 and tok.decode(list(op)) == "<think>" and tok.decode(list(cl)) == "</think>"


# ---- steered generation equals a no-cache, token-by-token reference -------------------------------------------

def _covered(kind: str, ids: list[int], P: int, tags) -> list[bool]:
    """The schedule rule written out for the reference: step s = p − P + 1 produces generated token s."""
    out, inside = [], False
    for p, t in enumerate(ids):
        if tags and t == tags[0][0]:
            inside = True
        elif tags and t == tags[1][0]:
            inside = False
        s = p - P + 1
        out.append({"always": True, "from3": s >= 3, "tok3@4": 4 <= s < 7, "think": s >= 0 and inside}[kind])
    return out


def _apply(x, sae, edits):
    """x + Σ_clamp (v − a_f)·W_dec[f] + Σ_add α·W_dec[f], latent by latent."""
    a = sae.encode(x)
    for e in edits:
        coef = (e.value - a[..., e.latent:e.latent + 1]) if e.mode == "clamp" else e.value
        x = x + coef * sae.W_dec[e.latent]
    return x


@torch.no_grad()
def _reference(model, sae, prompt_ids, edits, kind, n, stop, tags=None) -> list[int]:
    ids, P = list(prompt_ids), len(prompt_ids)
    hp = resolve_hook(model, sae.cfg.hook_name)
    for _ in range(n):
        mask = torch.tensor(_covered(kind, ids, P, tags))[None, :, None]
        with replace_activation(model, hp, lambda x: torch.where(mask, _apply(x, sae, edits), x)):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] in stop:
            break
    return ids


SCHEDULES = {"always": Schedule(), "from3": Schedule.from_token(3), "tok3@4": Schedule.tokens(3, start=4),
             "think": Schedule.think()}


def _tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("which", ["toy", "llama"])
def test_steered_generation_equals_the_no_cache_reference(toy_base, kind, which):
    toy, tok = toy_base
    model = toy if which == "toy" else _tiny_llama(tok)
    d = model.config.hidden_size
    sae = SAE(SAEConfig(d_in=d, d_sae=4 * d, k=8, hook_name=HOOK), seed=2)
    prompt = tok(PROMPT)["input_ids"]
    tags = think_tag_ids(tok)
    if which == "llama":  # a random model never writes the tags: let the prompt open <think>
        prompt = prompt + list(tags[0])
    edits = [clamp(3, 6.0), add(11, 12.0 if which == "toy" else 40.0)]
    stop = {tok.eos_token_id, *tok.convert_tokens_to_ids(["</answer>"])}
    row = generate(model, tok, prompt, sae, edits=edits, schedule=SCHEDULES[kind], max_new_tokens=14)[0]
    want = _reference(model, sae, prompt, edits, kind, 14, stop, tags)
    assert row.ids == want[:len(row.ids)] and len(row.ids) == len(want)
    clean = generate(model, tok, prompt, sae, mode="record", max_new_tokens=14)[0]
    assert clean.ids == _reference(model, sae, prompt, [], "always", 14, stop)
    assert row.ids != clean.ids  # the edit changes what is generated
    covered = _covered(kind, row.ids, len(prompt), tags)
    assert row.steered == [p for p, c in enumerate(covered) if c]  # recorded edits sit where the rule says
    assert sorted(row.features) == list(range(len(row.ids)))  # every position read, the last token included


# ---- the edit sits exactly in the window; outside it the activation is the model's own --------------------------

def _grab(model, hook, into):
    def fn(mod, args, out):
        into.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    return model.get_submodule(hook).register_forward_hook(fn)


def test_schedule_window_is_respected_and_records_equal_sae_encode(toy_base):
    model, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=2)
    prompt = tok(PROMPT)["input_ids"]
    P = len(prompt)
    edits = [clamp(7, 5.0), add(40, 3.0)]
    before, after = [], []
    h1 = _grab(model, HOOK, before)  # registered before the SAE hook: the activation the model computed
    try:
        with torch.no_grad():
            rows = generate(model, tok, prompt, sae, edits=edits, schedule=Schedule.tokens(3, start=2),
                            max_new_tokens=8, top_k=5)
            h2 = None
        # the SAE hook is gone now: register "after" inside a second run to see what the rest of the model got
        row = rows[0]
        before.clear()
        with intervene(model, sae, edits=edits, schedule=Schedule.tokens(3, start=2), prompt_len=P) as rec:
            h2 = _grab(model, HOOK, after)
            with torch.no_grad():
                model(input_ids=torch.tensor([row.ids]), use_cache=False)
    finally:
        h1.remove()
        if h2 is not None:
            h2.remove()
    x, y = before[0][0], after[0][0]  # [T, d]: activation read, activation passed on
    steps = torch.arange(len(row.ids)) - P + 1
    inside = (steps >= 2) & (steps < 5)
    assert inside.sum() == 3
    torch.testing.assert_close(y[~inside], x[~inside], rtol=0, atol=0)  # untouched outside the window
    with torch.no_grad():
        torch.testing.assert_close(y[inside], _apply(x[inside], sae, edits), rtol=1e-5, atol=1e-5)
    assert rec.steered_positions(0) == [int(p) for p in inside.nonzero().flatten()] == row.steered

    # the hook reads the model's own activation everywhere (an edit acts on later layers only); one layer down,
    # positions before the first edited one equal a clean run's and the rest do not
    deeper = "model.layers.3"
    clean, clean_deep, steered_deep = [], [], []
    with torch.no_grad():
        hs = [_grab(model, HOOK, clean), _grab(model, deeper, clean_deep)]
        try:
            model(input_ids=torch.tensor([row.ids]), use_cache=False)
        finally:
            for h in hs:
                h.remove()
        with intervene(model, sae, edits=edits, schedule=Schedule.tokens(3, start=2), prompt_len=P):
            h = _grab(model, deeper, steered_deep)
            try:
                model(input_ids=torch.tensor([row.ids]), use_cache=False)
            finally:
                h.remove()
    torch.testing.assert_close(clean[0][0], x, rtol=1e-6, atol=1e-6)
    first = int(inside.nonzero()[0])
    c, s_ = clean_deep[0][0], steered_deep[0][0]
    torch.testing.assert_close(s_[:first], c[:first], rtol=1e-6, atol=1e-6)
    assert (s_[first:] - c[first:]).norm(dim=-1).min() > 1e-3
    with torch.no_grad():
        v, i = sae.encode(x).topk(5, dim=-1)
    for p in range(len(row.ids)):
        want = [(int(a), float(b)) for a, b in zip(i[p], v[p]) if b > 0]
        got = row.features[p]
        assert [f for f, _ in got] == [f for f, _ in want]
        assert [a for _, a in got] == pytest.approx([a for _, a in want], rel=1e-4, abs=1e-5)


def test_left_padded_batch_keeps_each_rows_positions_and_think_window(toy_base):
    model, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=2)
    prompts = [PROMPT, "User : compute 5 * 2 . Assistant :"]
    tags = think_tag_ids(tok)
    rows = generate(model, tok, prompts, sae, edits=[add(9, 2.0)], schedule=Schedule.think(), max_new_tokens=30)
    assert len(rows[0].prompt_ids) != len(rows[1].prompt_ids)  # the second row is padded
    for r in rows:
        assert r.steered == [p for p, c in enumerate(scheduled_positions(Schedule.think(), r.ids, len(r.prompt_ids),
                                                                           tags)) if c]
        assert r.steered and tags[0][0] in r.response_ids and tags[1][0] in r.response_ids
        assert sorted(r.features) == list(range(len(r.ids)))


def test_generation_refusals(toy_base):
    model, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=2)
    with pytest.raises(SaetuneError, match="num_beams=2 is not supported"):
        generate(model, tok, PROMPT, sae, edits={1: 1.0}, num_beams=2)
    with pytest.raises(SaetuneError, match="think-only schedule needs think_tags"):
        with intervene(model, sae, edits={1: 1.0}, schedule=Schedule.think()):
            pass
    with pytest.raises(SaetuneError, match="unknown SAE attach mode 'clamp'"):
        with intervene(model, sae, mode="clamp"):
            pass
    with pytest.raises(SaetuneError, match="out of range for an SAE with 256"):
        generate(model, tok, PROMPT, sae, edits=[add(300, 1.0)])
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids[:5]]), use_cache=True).cache  # a prefix run outside the block
        with intervene(model, sae, edits={1: 1.0}, schedule=Schedule.from_token(2)):
            with pytest.raises(SaetuneError, match="called at position 5 after no prompt were seen"):
                model(input_ids=torch.tensor([ids[5:7]]), cache=cache, use_cache=True)


def test_vllm_backend_refuses_steering_with_a_sentence():
    from saetune.generation import VLLMBackend
    with pytest.raises(SaetuneError) as e:
        VLLMBackend("some/model", steering={"latents": {1: 2.0}})
    assert str(e.value) == VLLM_STEERING_REFUSAL and "backend 'hf'" in str(e.value)


# ---- the same code behind the attach verb and the explorer's live view --------------------------------------------

def test_attach_verb_steers_on_a_schedule_with_the_steering_code(tmp_path, toy_base):
    import json

    from saetune.attach import AttachConfig, attach
    _, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=2)
    sae.save(tmp_path / "sae")
    cfg = AttachConfig(model="toy", sae=str(tmp_path / "sae"), prompts=[PROMPT], max_new_tokens=10, mode="steer",
                       steer=["3=6.0"], add=["11=12.0"], schedule="tokens:3@4", top_features=4)
    attach(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "features.jsonl").read_text().splitlines()[0])
    row = generate(toy_base[0], tok, tok(PROMPT, return_tensors="pt").input_ids[0].tolist(), sae,
                   edits=[clamp(3, 6.0), add(11, 12.0)], schedule=Schedule.tokens(3, start=4), max_new_tokens=10,
                   top_k=4)[0]
    assert rec["steered_positions"] == row.steered == [len(row.prompt_ids) - 1 + s for s in (4, 5, 6)]
    assert rec["response"] == tok.decode(row.response_ids, skip_special_tokens=True)
    assert rec["features"] == [[[f, round(a, 4)] for f, a in row.features[p]] for p in range(len(row.ids))]
    assert rec["add"] == {"11": 12.0} and rec["schedule"] == Schedule.tokens(3, start=4).to_dict()
    with pytest.raises(SaetuneError, match="schedule part 'later'"):
        AttachConfig(model="toy", sae="x", prompts=["a"], schedule="later")
    with pytest.raises(SaetuneError, match="not FEATURE=VALUE"):
        AttachConfig(model="toy", sae="x", prompts=["a"], add=["x=1"])


def test_explorer_steered_continuation_is_the_steered_generation(toy_base):
    from saetune.analysis.live import steered_continuation
    model, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=2)
    edits, sched = [clamp(3, 6.0), add(11, 12.0)], Schedule.from_token(3)
    view = steered_continuation(model, tok, sae, HOOK, PROMPT, edits=edits, schedule=sched, max_new_tokens=10,
                                top_n=3)
    row = generate(model, tok, PROMPT, sae, edits=edits, schedule=sched, max_new_tokens=10, top_k=3)[0]
    P = len(row.prompt_ids)
    assert view["ids"] == row.response_ids and view["response"] == row.text
    assert view["steered"].tolist() == [j >= 3 for j in range(len(row.response_ids))]  # tokens 3, 4, … steered
    for j in range(len(row.response_ids)):
        for f, a in row.features[P + j]:
            assert view["acts"][j, f] == pytest.approx(a)
        assert (view["acts"][j] > 0).sum() == len(row.features[P + j])
    assert view["table"]["position"].tolist() == list(range(P, P + len(row.response_ids)))
    plain = steered_continuation(model, tok, sae, HOOK, PROMPT, max_new_tokens=10)
    assert plain["ids"] != view["ids"] and not plain["steered"].any()


def test_resid_pre_hook_and_a_bf16_model(toy_base):
    """The SAE at ``blocks.2.hook_resid_pre`` (a pre-hook on block 2) reads and edits what block 1 outputs, so the
    run equals the one at ``model.layers.1``; a bf16 model with an fp32 SAE generates under the edit too."""
    model, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=2)
    edits, sched = [clamp(3, 6.0), add(11, 12.0)], Schedule.from_token(2)
    a = generate(model, tok, PROMPT, sae, edits=edits, schedule=sched, max_new_tokens=12)[0]
    b = generate(model, tok, PROMPT, sae, edits=edits, schedule=sched, hook="blocks.2.hook_resid_pre",
                 max_new_tokens=12)[0]
    assert a.ids == b.ids and a.steered == b.steered
    for p in a.features:
        assert [f for f, _ in a.features[p]] == [f for f, _ in b.features[p]]

    llama = _tiny_llama(tok).to(torch.bfloat16)
    sae64 = SAE(SAEConfig(d_in=64, d_sae=256, k=8, hook_name=HOOK), seed=2)
    row = generate(llama, tok, tok(PROMPT)["input_ids"], sae64, edits=[add(5, 40.0)], schedule=Schedule.tokens(4),
                   max_new_tokens=8)[0]
    P = len(row.prompt_ids)
    assert row.steered == [P - 1, P, P + 1, P + 2] and len(row.response_ids) == 8
    assert all(isinstance(a, float) for f in row.features.values() for _, a in f)
