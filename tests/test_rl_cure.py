"""CURE stage 1: critical-token selection, branch prompts and group assembly (rl/cure.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saetune.errors import SaetuneError
from saetune.rl.cure import (
    CureBranch,
    assemble_group,
    branch_prompt,
    critical_candidates,
    critical_trace,
    select_critical_position,
)
from saetune.toy.tokenizer import build_tokenizer

TOK = build_tokenizer()


def tid(token: str) -> int:
    i = TOK.convert_tokens_to_ids(token)
    assert TOK.decode([i]) == token  # the toy vocabulary really has it as one token
    return i


def is_valid(pos: int, token_id: int) -> bool:
    return pos != 0 and token_id not in TOK.all_special_ids and len(TOK.decode([token_id]).strip()) > 1


# --- selection ---------------------------------------------------------------------------


def test_skips_position_zero_specials_and_single_characters():
    toks = ["compute", "<think>", "3", ".", "=", "14", "<|endoftext|>", "the", "-5", "(", "</answer>"]
    ids = [tid(t) for t in toks]
    # highest entropy on the invalid ones, so a wrong filter would pick them first
    ent = torch.tensor([9.0, 8.0, 7.5, 7.0, 6.5, 3.0, 6.0, 2.0, 4.0, 5.0, 5.5])
    pos, cands = select_critical_position(ent, ids, TOK, generator=torch.Generator().manual_seed(0))
    assert cands == [8, 5, 7]  # -5 (4.0), 14 (3.0), the (2.0)
    assert pos in cands


def test_stable_order_on_ties_and_top_k():
    ids = [tid("the")] * 8
    ent = torch.tensor([1.0, 1.0, 2.0, 1.0, 2.0, 0.5, 1.0, 2.0])
    assert critical_candidates(ent, ids, TOK, top_k=20) == [2, 4, 7, 1, 3, 6, 5]
    assert critical_candidates(ent, ids, TOK, top_k=4) == [2, 4, 7, 1]
    assert critical_candidates(ent, ids, TOK, top_k=1) == [2]


def test_top_k_counts_only_valid_positions():
    ids = [tid("the"), tid("3"), tid("wait"), tid("."), tid("answer"), tid("14")]
    ent = [6.0, 5.0, 4.0, 3.5, 3.0, 2.0]
    assert critical_candidates(ent, ids, TOK, top_k=2) == [2, 4]


def test_no_valid_token_falls_back_to_zero():
    ids = [tid("wait"), tid("3"), tid("."), tid("<answer>"), tid("=")]
    assert select_critical_position(torch.rand(5), ids, TOK) == (0, [])
    assert select_critical_position(torch.zeros(0), torch.zeros(0, dtype=torch.long), TOK) == (0, [])


def test_draw_is_reproducible_and_uniform():
    ids = [tid("the")] * 6
    ent = torch.arange(6, dtype=torch.float32)
    a = [select_critical_position(ent, ids, TOK, top_k=4, generator=torch.Generator().manual_seed(s))[0] for s in range(20)]
    b = [select_critical_position(ent, ids, TOK, top_k=4, generator=torch.Generator().manual_seed(s))[0] for s in range(20)]
    assert a == b
    g = torch.Generator().manual_seed(123)
    n = 4000
    counts = {p: 0 for p in [5, 4, 3, 2]}
    for _ in range(n):
        pos, cands = select_critical_position(ent, ids, TOK, top_k=4, generator=g)
        assert cands == [5, 4, 3, 2]
        counts[pos] += 1
    # expected 1000 each, sd ≈ 27: a ±150 band only fails on a real bias
    assert all(abs(c - n / 4) < 150 for c in counts.values()), counts


def test_decodes_each_distinct_id_once():
    class CountingTok:
        all_special_ids = TOK.all_special_ids

        def __init__(self):
            self.calls = 0

        def decode(self, ids):
            self.calls += 1
            return TOK.decode(ids)

    ct = CountingTok()
    ids = [tid("the"), tid("3"), tid("wait"), tid("3"), tid("wait"), tid("the"), tid("3")]
    cands = critical_candidates(torch.zeros(7), ids, ct, top_k=20)
    assert cands == [2, 4, 5]
    assert ct.calls == 3  # the, 3, wait — position 0's "the" is skipped before decoding


def test_selection_errors():
    with pytest.raises(SaetuneError, match=r"\(3,\).*\(4,\)"):
        select_critical_position(torch.zeros(3), [tid("the")] * 4, TOK)
    with pytest.raises(SaetuneError, match=r"1-D.*\(2, 3\)"):
        select_critical_position(torch.zeros(2, 3), [tid("the")] * 6, TOK)
    with pytest.raises(SaetuneError, match="top_k"):
        select_critical_position(torch.zeros(3), [tid("the")] * 3, TOK, top_k=0)
    with pytest.raises(SaetuneError, match="NaN"):
        select_critical_position(torch.tensor([0.0, float("nan")]), [tid("the")] * 2, TOK)


def test_critical_trace_matches_one_by_one():
    ents = [torch.tensor([0.0, 3.0, 2.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0, 2.0])]
    ids = [[tid("the"), tid("wait"), tid("14"), tid("answer")], [tid("the"), tid("3")], [tid("the"), tid("let"), tid("me")]]
    trace = critical_trace(ents, ids, TOK, top_k=2, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    expect = [select_critical_position(e, i, TOK, top_k=2, generator=g) for e, i in zip(ents, ids)]
    assert [(t["critical_position"], t["critical_candidates"]) for t in trace] == expect
    assert trace[0]["critical_candidates"] == [1, 2] and trace[1] == {"critical_candidates": [], "critical_position": 0}
    assert all(type(p) is int for t in trace for p in t["critical_candidates"] + [t["critical_position"]])
    with pytest.raises(SaetuneError, match="2 entropy vectors for 3 responses"):
        critical_trace(ents[:2], ids, TOK)


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), st.integers(0, len(TOK) - 1)), max_size=40
    ),
    top_k=st.integers(1, 10),
)
def test_candidates_property(data, top_k):
    ent = [e for e, _ in data]
    ids = [i for _, i in data]
    cands = critical_candidates(torch.tensor(ent), torch.tensor(ids, dtype=torch.long), TOK, top_k=top_k)
    assert len(cands) <= top_k
    assert len(set(cands)) == len(cands)
    assert all(is_valid(p, ids[p]) for p in cands)
    keys = [(-ent[p], p) for p in cands]  # non-increasing entropy, position order on ties
    assert keys == sorted(keys)
    valid = [p for p in range(len(ids)) if is_valid(p, ids[p])]
    assert cands == sorted(valid, key=lambda p: (-ent[p], p))[:top_k]
    pos, c2 = select_critical_position(ent, ids, TOK, top_k=top_k, generator=torch.Generator().manual_seed(0))
    assert c2 == cands and (pos in cands if cands else pos == 0)


# --- branch prompts ----------------------------------------------------------------------


def test_branch_prompt_excludes_critical_token():
    prompt, response = [10, 11, 12], [20, 21, 22, 23, 24]
    ids, n = branch_prompt(prompt, response, 3, max_prompt_len=100)
    assert ids == [10, 11, 12, 20, 21, 22] and n == 3
    assert branch_prompt(torch.tensor(prompt), torch.tensor(response), 0, 100) == ([10, 11, 12], 0)


def test_branch_prompt_truncation_keeps_first_tokens():
    prompt, response = [10, 11, 12], [20, 21, 22, 23, 24]
    assert branch_prompt(prompt, response, 4, max_prompt_len=5) == ([10, 11, 12, 20, 21], 2)
    assert branch_prompt(prompt, response, 4, max_prompt_len=3) == ([10, 11, 12], 0)


def test_branch_prompt_errors():
    with pytest.raises(SaetuneError, match="position"):
        branch_prompt([1], [2, 3], 2, 10)
    with pytest.raises(SaetuneError, match="position"):
        branch_prompt([1], [2, 3], -1, 10)
    with pytest.raises(SaetuneError, match="max_prompt_len=2"):
        branch_prompt([1, 2, 3], [4], 0, 2)
    with pytest.raises(SaetuneError, match="max_prompt_len"):
        branch_prompt([1], [4], 0, 0)


# --- group assembly ----------------------------------------------------------------------


def make_group_inputs(n1=4, n2=3):
    prompt = [1, 2, 3]
    originals = [[100 + 10 * i + t for t in range(5 + i)] for i in range(n1)]
    branches = []
    for i in range(n1):
        for j in range(n2):
            cut = 1 + j  # prefix = original[:cut]; the token at `cut` is re-sampled
            branches.append(CureBranch(i, originals[i][:cut], [900 + 10 * i + j, 901, 902][: 1 + j]))
    return prompt, originals, branches


def test_group_of_sixteen():
    prompt, originals, branches = make_group_inputs()
    g = assemble_group(prompt, originals, branches)
    assert g.size == 16 and len(g.input_ids) == len(g.loss_mask) == len(g.reward_ids) == 16
    assert g.is_branch == [False] * 4 + [True] * 12
    assert g.source == [0, 1, 2, 3] + [i for i in range(4) for _ in range(3)]
    for i, o in enumerate(originals):
        assert g.input_ids[i] == prompt + o
        assert g.loss_mask[i] == [0] * 3 + [1] * len(o)
        assert g.reward_ids[i] == o
    for k, b in enumerate(branches):
        s = 4 + k
        assert g.input_ids[s] == prompt + b.prefix_ids + b.continuation_ids
        assert g.loss_mask[s] == [0] * (3 + len(b.prefix_ids)) + [1] * len(b.continuation_ids)
        assert g.reward_ids[s] == b.continuation_ids  # reward on the continuation only
        assert g.input_ids[s][g.context_lens[s]:] == g.reward_ids[s]
    t = g.as_tensors(pad_token_id=0)
    assert t["input_ids"].shape == t["loss_mask"].shape == (16, max(len(s) for s in g.input_ids))
    assert t["loss_mask"].sum().item() == sum(sum(m) for m in g.loss_mask)
    assert t["attention_mask"].sum(1).tolist() == [len(s) for s in g.input_ids]


def test_group_advantages_shared_over_whole_group():
    prompt, originals, branches = make_group_inputs()
    g = assemble_group(prompt, originals, branches)
    rewards = [1.0, 0.0, 0.0, 0.0] + [1.0, 1.0, 0.0] + [0.0] * 9
    adv = g.group_advantages(rewards)
    r = torch.tensor(rewards)
    assert adv.shape == (16,)
    assert torch.allclose(adv, (r - r.mean()) / (r.std() + 1e-6), atol=1e-6)
    assert abs(adv.sum().item()) < 1e-4
    # one normalisation over all 16: an original's advantage depends on the branches' rewards
    assert adv[0].item() == pytest.approx((1 - 3 / 16) / r.std().item(), rel=1e-4)
    assert torch.all(adv[r == 1] > 0) and torch.all(adv[r == 0] < 0)
    assert torch.all(g.group_advantages([0.5] * 16) == 0)
    with pytest.raises(SaetuneError, match=r"\(16,\)"):
        g.group_advantages([1.0] * 4)


def test_group_size_errors():
    prompt, originals, branches = make_group_inputs()
    with pytest.raises(SaetuneError, match="n1=4 original"):
        assemble_group(prompt, originals[:3], branches)
    with pytest.raises(SaetuneError, match="n1\\*n2=12"):
        assemble_group(prompt, originals, branches[:11])
    bad = list(branches)
    bad[0] = CureBranch(4, [], [7])
    with pytest.raises(SaetuneError, match="source"):
        assemble_group(prompt, originals, bad)
    bad[0] = CureBranch(1, originals[1][:1], [7])  # original 1 gets 4 branches, original 0 gets 2
    with pytest.raises(SaetuneError, match=r"\[2, 4, 3, 3\]"):
        assemble_group(prompt, originals, bad)
    bad[0] = CureBranch(0, [555], [7])  # not a prefix of original 0
    with pytest.raises(SaetuneError, match="not a prefix"):
        assemble_group(prompt, originals, bad)
    bad[0] = CureBranch(0, originals[0], [7])  # whole response: no critical token left to re-sample
    with pytest.raises(SaetuneError, match="not a prefix"):
        assemble_group(prompt, originals, bad)
    g = assemble_group(prompt, originals[:2], branches[:2] + branches[3:5], n1=2, n2=2)
    assert g.size == 6 and g.source == [0, 1, 0, 0, 1, 1]
