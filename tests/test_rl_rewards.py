"""Rewards: RPR and its hits, RM variant, group flipping, HAPO, OTC, AdaptThink, RLPR, composition."""

import math
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saetune.errors import SaetuneError
from saetune.rl import rewards as R

# 7 single-word phrases from the 40; 20 distinct words in all -> 7 hits, no 20-gram repeated.
BLOCK = "wait alternatively consequently thus therefore hence thereby a b c d e f g h i j k l m"
ALL_PHRASES = " | ".join(R.REASONING_PATTERNS)


# --------------------------------------------------------------------------- phrase lists


def test_phrase_lists_verbatim():
    assert len(R.REASONING_PATTERNS) == 40 and len(set(R.REASONING_PATTERNS)) == 40
    assert len(R.REASONING_PATTERNS_RM) == 53
    # trailing spaces and the original typo are part of the spec
    for p in ("we can observe ", "first, ", "since we ", "given there ", "for example "):
        assert p in R.REASONING_PATTERNS
    assert "makes sence" in R.REASONING_PATTERNS and "makes sense" not in R.REASONING_PATTERNS
    assert "step 3. " in R.REASONING_PATTERNS_RM and "i should" in R.REASONING_PATTERNS_RM


# --------------------------------------------------------------------------- RPR


def test_rpr_presence_not_count():
    assert R.reasoning_pattern_reward("wait wait wait") == pytest.approx(1 / 20)
    assert R.reasoning_pattern_reward("wait") == R.reasoning_pattern_reward("wait wait wait")


def test_rpr_substring_and_case():
    assert R.reasoning_pattern_reward("it awaited") == pytest.approx(1 / 20)  # 'wait' in 'awaited'
    assert R.reasoning_pattern_reward("WAIT, Therefore") == pytest.approx(2 / 20)
    # trailing space matters: 'first,' at the very end has no space after it
    assert R.reasoning_pattern_reward("first,") == 0.0
    assert R.reasoning_pattern_reward("first, x") == pytest.approx(1 / 20)


def test_rpr_hit_count_and_cap():
    assert R.reasoning_pattern_reward(BLOCK) == pytest.approx(7 / 20)  # 0.35
    # all 40 phrases: min(1, 40/20) = 1, no repeats, no 'user: '
    assert R.reasoning_pattern_reward(ALL_PHRASES) == 1.0
    assert len(R.reasoning_pattern_hits(ALL_PHRASES)) == 40


def test_rpr_repetition_penalty():
    twice = BLOCK + " " + BLOCK
    # 40 words -> 21 20-grams; only the gram at 0 recurs (at 20): rep20 = 1/21
    assert R.repetition_rate(twice) == pytest.approx(1 / 21)
    assert R.repetition_rate(BLOCK) == 0.0
    assert R.repetition_rate("a b c") == 0.0  # fewer than 20 words
    # 7 hits: 0.35 - 1/21 = 0.302380...
    assert R.reasoning_pattern_reward(twice) == pytest.approx(0.35 - 1 / 21)
    # three copies: 60 words, 41 grams, all 20 rotations recur -> rep20 = 20/41;
    # 0.35 - 0.4878 < 0 -> clipped at 0
    thrice = " ".join([BLOCK] * 3)
    assert R.repetition_rate(thrice) == pytest.approx(20 / 41)
    assert R.reasoning_pattern_reward(thrice) == 0.0


def test_rpr_user_turn_penalty():
    assert R.reasoning_pattern_reward(ALL_PHRASES) == 1.0
    # 1 - 1 (one 'user: ', matched case-insensitively) = 0
    assert R.reasoning_pattern_reward(ALL_PHRASES + " User: hi") == 0.0
    assert R.reasoning_pattern_reward(ALL_PHRASES + " user:hi") == 1.0  # needs the space


def test_rpr_only_after_first_think():
    text = "wait therefore User: <think> hence <think> thus"
    # scored part: ' hence <think> thus' -> 2 hits, the 'User: ' before <think> is ignored
    assert R.reasoning_pattern_reward(text) == pytest.approx(2 / 20)
    assert R.reasoning_pattern_reward("wait therefore <think>") == 0.0


def test_rpr_rejects_non_text():
    with pytest.raises(SaetuneError, match="str"):
        R.reasoning_pattern_reward(None)


# --------------------------------------------------------------------------- hits


def test_hits_spans_in_original_text():
    text = "Wait, no. <think>Hmm... WAIT, I Need To think. It Awaited us; Thus done"
    hits = R.reasoning_pattern_hits(text)
    assert set(hits) == {"wait", "i need to", "thus"}
    think_end = text.index("<think>") + len("<think>")
    wait_spans = hits["wait"]
    assert [text[s:e] for s, e in wait_spans] == ["WAIT", "wait"]  # 'Wait' before <think> excluded
    assert wait_spans[0][0] == text.index("WAIT") and wait_spans[1][0] == text.index("Awaited") + 1
    assert all(s >= think_end for s, _ in wait_spans)
    assert [text[s:e] for s, e in hits["i need to"]] == ["I Need To"]
    assert [text[s:e] for s, e in hits["thus"]] == ["Thus"]
    assert len(hits) == round(R.reasoning_pattern_reward(text) * 20)


def test_hits_with_length_changing_lowercase():
    text = "<think>İİ Wait"  # 'İ'.lower() is two code points
    (span,) = R.reasoning_pattern_hits(text)["wait"]
    assert text[span[0]:span[1]] == "Wait"


def test_hits_trailing_space_phrase_span():
    text = "<think>First, we"
    (span,) = R.reasoning_pattern_hits(text)["first, "]
    assert text[span[0]:span[1]] == "First, "


_words = st.sampled_from(list(R.REASONING_PATTERNS_RM) + ["x", "User: ", "<think>", "İ", " ", "\n", "a"])
_texts = st.lists(_words, max_size=60).map("".join) | st.text(max_size=200)


@settings(max_examples=200, deadline=None)
@given(_texts)
def test_rpr_in_unit_interval_and_consistent_with_hits(text):
    r = R.reasoning_pattern_reward(text)
    assert 0.0 <= r <= 1.0
    assert 0.0 <= R.reasoning_pattern_reward_rm(text) <= 1.0
    hits = R.reasoning_pattern_hits(text)
    scored = text[text.find("<think>") + 7:] if "<think>" in text else text
    expected = max(0.0, min(1.0, len(hits) / 20) - R.repetition_rate(scored.lower())
                   - scored.lower().count("user: "))
    assert r == pytest.approx(expected)
    for phrase, spans in hits.items():
        for s, e in spans:
            assert text[s:e].lower() == phrase


# --------------------------------------------------------------------------- RM variant


def test_rm_variant_phrases_and_no_user_term():
    # '1. ' and 'i will' are RM-only phrases: 2 hits -> 0.1; plain RPR sees none
    assert R.reasoning_pattern_reward_rm("1. I will add") == pytest.approx(2 / 20)
    assert R.reasoning_pattern_reward("1. I will add") == 0.0
    # 'user: ' costs RPR 1 but nothing in the RM variant: 'wait' + 'i will' = 0.1
    assert R.reasoning_pattern_reward_rm("user: wait, i will") == pytest.approx(0.1)
    assert R.reasoning_pattern_reward("user: wait, i will") == 0.0


def test_combine_with_reward_model():
    assert R.combine_with_reward_model(0.3, 1.0) == pytest.approx(0.4)  # 0.3 + 0.1*1
    assert R.combine_with_reward_model(0.49, 0.5) == pytest.approx(0.54)  # 0.49 + 0.05
    assert R.combine_with_reward_model(0.5, 1.0) == 0.5  # s >= 0.5 unchanged
    assert R.combine_with_reward_model(0.9, 1.0) == 0.9
    with pytest.raises(SaetuneError, match="score"):
        R.combine_with_reward_model(float("nan"), 1.0)


# --------------------------------------------------------------------------- flipping


def test_flip_extremes():
    r = torch.tensor([1, 0, 1, 0, 0, 1.0])
    out, mask = R.flip_group_rewards(r, 3, p=1.0)
    assert torch.equal(out, 1 - r) and mask.tolist() == [True, True]
    out, mask = R.flip_group_rewards(r, 3, p=0.0)
    assert torch.equal(out, r) and mask.tolist() == [False, False]


def test_flip_is_per_group_and_seeded():
    r = (torch.arange(40) % 3 == 0).float()  # mixed 0/1 inside each group
    out, mask = R.flip_group_rewards(r, 4, p=0.5, generator=torch.Generator().manual_seed(0))
    changed = (out != r).view(10, 4)
    assert torch.equal(changed, mask[:, None].expand(10, 4))  # whole groups flip together
    assert 0 < mask.sum() < 10  # p=0.5 on 10 groups with this seed: some, not all
    # one uniform draw per group, in group order
    expected = torch.rand(10, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(mask, expected)
    out2, mask2 = R.flip_group_rewards(r, 4, p=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out2) and torch.equal(mask, mask2)


def test_flip_with_group_ids():
    r = torch.tensor([1, 0, 1, 1, 0, 0])
    ids = torch.tensor([7, 3, 7, 3, 7, 3])  # sorted groups: 3 -> index 0, 7 -> index 1
    g = torch.Generator().manual_seed(1)
    out, mask = R.flip_group_rewards(r, ids, p=0.5, generator=g)
    per_sample = mask[torch.tensor([1, 0, 1, 0, 1, 0])]
    assert torch.equal(out, torch.where(per_sample, 1 - r, r))


def test_flip_errors():
    with pytest.raises(SaetuneError, match="0/1"):
        R.flip_group_rewards(torch.tensor([0.5, 1.0]), 2, 0.1)
    with pytest.raises(SaetuneError, match="1.5"):
        R.flip_group_rewards(torch.tensor([0.0, 1.0]), 2, 1.5)
    with pytest.raises(SaetuneError, match="group_size=3"):
        R.flip_group_rewards(torch.tensor([0.0, 1.0]), 3, 0.1)


# --------------------------------------------------------------------------- HAPO


def test_hapo_history():
    h = R.HapoHistory()
    assert h.get("p1") is None
    assert h.update("p1", [120, 80, 60], [True, True, False]) == 80  # 60 was wrong
    assert h.update("p1", [90, 70], [True, True]) == 70
    assert h.update("p1", [10], [False]) == 70  # wrong answers never shorten h
    assert h.update("p2", [5], [False]) is None and "p2" not in h
    assert len(h) == 1
    with pytest.raises(SaetuneError, match="same size"):
        h.update("p1", [1, 2], [True])


def test_hapo_length_reward_worked_examples():
    assert R.hapo_length_reward(50, True, None) == 0.0  # no history
    # h=100, l=50: cos(0.5*pi/2) = cos(pi/4) = 0.70711
    assert R.hapo_length_reward(50, True, 100) == pytest.approx(math.sqrt(2) / 2)
    # l=150: cos(1.5*pi/2) = cos(3pi/4) = -0.70711 -> correct: max(-0.7, .) = -0.7
    assert R.hapo_length_reward(150, True, 100) == pytest.approx(-0.7)
    # wrong: min(0, -0.70711) = -0.70711
    assert R.hapo_length_reward(150, False, 100) == pytest.approx(-math.sqrt(2) / 2)
    # l=50 wrong: min(0, 0.70711) = 0
    assert R.hapo_length_reward(50, False, 100) == 0.0
    # l >= 2h: f = -1 -> correct -0.7, wrong -1
    assert R.hapo_length_reward(200, True, 100) == pytest.approx(-0.7)
    assert R.hapo_length_reward(250, False, 100) == -1.0
    # l = h: cos(pi/2) = 0
    assert R.hapo_length_reward(100, True, 100) == pytest.approx(0.0, abs=1e-12)


def test_hapo_reward():
    # correct, l=50, h=100, w=0.5: 1 + 0.5 * 0.70711 = 1.35355
    assert R.hapo_reward(50, True, 100, w=0.5) == pytest.approx(1 + 0.5 * math.sqrt(2) / 2)
    # wrong, l=150, w=1 (default): 0 + (-0.70711)
    assert R.hapo_reward(150, False, 100) == pytest.approx(-math.sqrt(2) / 2)
    with pytest.raises(SaetuneError, match="w"):
        R.hapo_reward(50, True, 100, w=2.0)
    with pytest.raises(SaetuneError, match="history_len"):
        R.hapo_length_reward(50, True, 0)


# --------------------------------------------------------------------------- OTC


def test_otc_ppo_worked_examples():
    assert R.otc_ppo_tool_reward(0) == 1.0  # cos(0)
    assert R.otc_ppo_tool_reward(1) == pytest.approx(0.5)  # cos(pi/3)
    assert R.otc_ppo_tool_reward(2) == pytest.approx(math.cos(2 * math.pi / 5))  # 0.30902
    assert R.otc_ppo_tool_reward(1, c=2) == pytest.approx(math.sqrt(2) / 2)  # cos(pi/4)


def test_otc_grpo_worked_examples():
    assert R.otc_grpo_tool_reward(0, 0) == 1.0  # f = n = 0
    assert R.otc_grpo_tool_reward(1, 0) == pytest.approx(0.5)  # n=0: cos(pi/3)
    assert R.otc_grpo_tool_reward(2, 2) == pytest.approx(1.0)  # f = 8/4 = 2: sin(pi/2)
    # m=1, n=2: f = 2*2*1/3 = 4/3; sin((4/3)*pi/4) = sin(pi/3) = 0.86603
    assert R.otc_grpo_tool_reward(1, 2) == pytest.approx(math.sqrt(3) / 2)
    # m=6, n=2: f = 24/8 = 3; sin(3*pi/4) = 0.70711
    assert R.otc_grpo_tool_reward(6, 2) == pytest.approx(math.sqrt(2) / 2)
    assert R.otc_grpo_tool_reward(0, 2) == 0.0  # f = 0: sin(0)
    with pytest.raises(SaetuneError, match="-1"):
        R.otc_grpo_tool_reward(-1, 2)


def test_otc_reward_and_group():
    assert R.otc_reward(0.5, True, alpha=2.0) == 1.0  # 2 * 0.5 * 1
    assert R.otc_reward(0.5, False) == 0.0
    # n = 1 (fewest calls among correct); wrong -> 0; m=1: sin(pi/2) = 1;
    # m=3: f = 2*1*3/4 = 1.5, sin(1.5*pi/2) = 0.70711
    out = R.otc_group_rewards([2, 1, 3], [False, True, True])
    assert out == pytest.approx([0.0, 1.0, math.sqrt(2) / 2])
    assert R.otc_group_rewards([2, 3], [False, False]) == [0.0, 0.0]


def test_tool_productivity():
    assert R.tool_productivity([True, False, True], [2, 3, 1]) == pytest.approx(2 / 6)
    assert R.tool_productivity([True, True], [0, 0]) == 2.0  # 0 calls: denominator 1
    assert R.tool_productivity([False], [0]) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(0, 200), st.floats(0.01, 10))
def test_otc_grpo_in_range(m, n, c):
    r = R.otc_grpo_tool_reward(m, n, c)
    assert -1.0 <= r <= 1.0
    assert 0.0 <= r <= 1.0 + 1e-12  # in fact never negative
    if n > 0 and m == n:
        assert r == pytest.approx(1.0)


# --------------------------------------------------------------------------- AdaptThink


def test_adaptthink():
    assert R.adaptthink_reward(1.0, 0.6, True) == pytest.approx(0.45)  # 1 - 0.6 + 0.05
    assert R.adaptthink_reward(1.0, 0.6, False) == pytest.approx(0.4)
    assert R.adaptthink_reward(0.0, 0.6, True, delta=0.1) == pytest.approx(-0.5)
    assert R.is_no_thinking("</think> <answer> 4 </answer>")
    assert R.is_no_thinking("\n</think>4")
    assert not R.is_no_thinking("<think> wait </think> 4")
    assert not R.is_no_thinking("4 </think>")


# --------------------------------------------------------------------------- RLPR


def test_rlpr_probability_and_debias():
    lp = torch.log(torch.tensor([0.5, 0.25]))
    base = torch.log(torch.tensor([0.25, 0.25]))
    # mean prob: (0.5 + 0.25)/2 = 0.375; baseline 0.25; debiased 0.125
    assert R.rlpr_probability_reward(lp).item() == pytest.approx(0.375)
    assert R.rlpr_reward(lp, base).item() == pytest.approx(0.125)
    # baseline above the reward -> clipped at 0
    assert R.rlpr_reward(base, lp).item() == 0.0


def test_rlpr_batch_mask_and_broadcast():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.3, 0.6]]))  # padding: log 0 = -inf
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    base = torch.log(torch.tensor([0.2]))
    # row 0: padding masked -> 0.5; row 1: 1.8/3 = 0.6; minus 0.2 each
    assert R.rlpr_reward(lp, base, mask=mask).tolist() == pytest.approx([0.3, 0.4])
    with pytest.raises(SaetuneError, match="no answer tokens"):
        R.rlpr_reward(lp, base, mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(SaetuneError, match="log-prob"):
        R.rlpr_probability_reward(torch.tensor([0.5]))  # a probability, not a log-prob


def test_rlpr_std_filter_and_threshold():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.5])
    # group 0: std 0; group 1: mean 0.5, var (0.25+0.25+0)/3 = 1/6, std 0.40825
    assert R.group_std(rewards, 3).tolist() == pytest.approx([0.0, math.sqrt(1 / 6)])
    assert R.rlpr_std_filter(rewards, 3, beta=0.1).tolist() == [False, True]
    assert R.rlpr_std_filter(rewards, 3, beta=0.5).tolist() == [False, False]
    assert R.rlpr_std_filter(rewards, 3, beta=0.0).tolist() == [True, True]
    ids = torch.tensor([2, 2, 2, 1, 1, 1])  # sorted ids: 1 (varied) first, then 2
    assert R.rlpr_std_filter(rewards, ids, beta=0.1).tolist() == [True, False]
    # EMA: 0.9 * 0.1 + 0.1 * mean(0, 0.4) = 0.09 + 0.02 = 0.11
    assert R.rlpr_update_threshold(0.1, torch.tensor([0.0, 0.4]), momentum=0.9) == pytest.approx(0.11)
    with pytest.raises(SaetuneError, match="beta"):
        R.rlpr_std_filter(rewards, 3, beta=-1.0)


# --------------------------------------------------------------------------- correctness


def test_correctness_reward_falls_back_to_toy(monkeypatch):
    monkeypatch.setitem(sys.modules, "saetune.evaluate", None)  # module absent
    assert R.correctness_reward("<think> 3 + 4 = 7 </think> <answer> 7 </answer>", 7) == 1.0
    assert R.correctness_reward("<answer> 8 </answer>", "7") == 0.0
    assert R.correctness_reward("no answer tag", "7") == 0.0


def test_correctness_reward_prefers_evaluate(monkeypatch):
    fake = types.ModuleType("saetune.evaluate")
    fake.is_correct = lambda response, gold: response.endswith(str(gold))
    monkeypatch.setitem(sys.modules, "saetune.evaluate", fake)
    assert R.correctness_reward("the answer is \\boxed{7}", "7}") == 1.0  # toy would say 0
    assert R.correctness_reward("<answer> 7 </answer>", "7") == 0.0  # toy would say 1


# --------------------------------------------------------------------------- composition


def test_compose_rewards_weights():
    resp = "<think> wait, therefore 7 </think> <answer> 7 </answer>"
    specs = [
        R.RewardSpec("correct", lambda response, answer: 1.0 if answer in response else 0.0, 1.0),
        R.RewardSpec("rpr", lambda response: R.reasoning_pattern_reward(response), 0.5),
        R.RewardSpec("const", lambda **kw: 2.0, -0.25),
    ]
    total, parts = R.compose_rewards(specs, response=resp, answer="7")
    # rpr: 'wait' + 'therefore' = 2/20 = 0.1; total = 1*1 + 0.5*0.1 - 0.25*2 = 0.55
    assert parts == pytest.approx({"correct": 1.0, "rpr": 0.1, "const": 2.0})
    assert total == pytest.approx(0.55)


def test_compose_rewards_failures_name_the_reward():
    ok = R.RewardSpec("ok", lambda response: 1.0)

    def boom(response):
        raise ValueError("tokenizer exploded")

    with pytest.raises(SaetuneError, match="'boomer'.*tokenizer exploded") as ei:
        R.compose_rewards([ok, R.RewardSpec("boomer", boom)], response="x")
    assert isinstance(ei.value.__cause__, ValueError)
    with pytest.raises(SaetuneError, match="'nanny'.*NaN"):
        R.compose_rewards([ok, R.RewardSpec("nanny", lambda response: float("nan"))], response="x")
    with pytest.raises(SaetuneError, match="'needs_answer'.*TypeError"):
        R.compose_rewards([R.RewardSpec("needs_answer", lambda answer: 1.0)], response="x")
    with pytest.raises(SaetuneError, match="'words'.*not a number"):
        R.compose_rewards([R.RewardSpec("words", lambda response: "high")], response="x")
    with pytest.raises(SaetuneError, match="unique"):
        R.compose_rewards([ok, ok], response="x")
    with pytest.raises(SaetuneError, match="'w'.*weight"):
        R.RewardSpec("w", lambda: 1.0, float("nan"))
