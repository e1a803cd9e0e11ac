"""Grading (math-verify, gold first, last box, after </think>, any thread) and pass@k / summaries."""

import itertools
import json
import math
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saetune import evaluate as ev
from saetune.errors import SaetuneError
from saetune.evaluate import load_benchmark
from saetune.grading import extract_graded_text, is_correct, last_boxed
from saetune.scoring import avg_at_k, pass_at_k, summarize

AIME = Path(__file__).parent / "data" / "aime24.jsonl"


# ---------------------------------------------------------------- what is graded

def test_extract_graded_text_after_last_think():
    assert extract_graded_text("a</think>b</think> c") == " c"
    assert extract_graded_text("no think tag") == "no think tag"


@pytest.mark.parametrize("text, want", [
    (r"x \boxed{5}", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed {7}", "7"),
    (r"\fbox{8}", "8"),
    (r"\boxed{3} and then \boxed{4}", "4"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),          # escaped braces do not close the box
    (r"\boxed{3} truncated \boxed{4", "3"),       # an unclosed last box is ignored
    ("no box here", None),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


# ---------------------------------------------------------------- is_correct

def test_gold_first_asymmetric_case():
    # math-verify accepts the interval for an inequality gold, not an inequality for an interval gold.
    assert is_correct(r"\boxed{(-\infty, 2)}", "x<2") is True
    assert is_correct(r"\boxed{x<2}", r"(-\infty, 2)") is False


def test_verify_called_with_gold_first(monkeypatch):
    import math_verify
    real_parse, real_verify = math_verify.parse, math_verify.verify
    parsed, calls = {}, []

    def parse(s, **kw):
        out = real_parse(s, **kw)
        parsed[id(out)] = s
        return out

    def verify(a, b, **kw):
        calls.append((parsed[id(a)], parsed[id(b)], kw))
        return real_verify(a, b, **kw)

    monkeypatch.setattr(math_verify, "parse", parse)
    monkeypatch.setattr(math_verify, "verify", verify)
    assert is_correct(r"so \boxed{13}", "13", timeout_s=3)
    assert calls == [("$13$", r"\boxed{13}", {"timeout_seconds": 3})]


def test_prompt_box_is_not_graded():
    # The caller passes the response only; the prompt's \boxed{} never reaches the grader.
    prompt = r"Put your final answer within \boxed{}. What is 6+7?"
    response = "The sum is 13."
    assert is_correct(response, "13") is False
    assert is_correct(prompt + response, "13") is False


def test_text_before_think_end_is_ignored():
    assert is_correct(r"maybe \boxed{12}? </think> The answer is \boxed{13}.", "13") is True
    assert is_correct(r"surely \boxed{13} </think> The answer is \boxed{12}.", "13") is False
    assert is_correct(r"thinking \boxed{13} </think> I am not sure.", "13") is False


def test_only_last_box_counts():
    assert is_correct(r"first \boxed{3}, finally \boxed{4}", "4") is True
    assert is_correct(r"first \boxed{3}, finally \boxed{4}", "3") is False


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac12"),
    (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    ("<answer> Answer: 14 </answer>", "14"),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),     # string fallback (math-verify parses nothing)
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{14}", 14),                                # int gold
])
def test_correct_answers(response, gold):
    assert is_correct(response, gold) is True


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{\frac{1}{3}}", "0.5"),
    (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{3}", r"\left( 3, \frac{\pi}{2} \right)"),  # bare gold would parse to 3 and pass
    ("<answer> Answer: 15 </answer>", "14"),
    (r"\boxed{\text{Evelyn}}", r"\text{Bob}"),
    ("I could not solve it.", "14"),
    ("", "14"),
    (r"\boxed{}", "14"),
])
def test_wrong_or_missing_answers(response, gold):
    assert is_correct(response, gold) is False


def test_bad_timeout_raises():
    with pytest.raises(SaetuneError, match="timeout_s"):
        is_correct(r"\boxed{1}", "1", timeout_s=0)


def test_is_correct_from_a_thread_matches_main_thread():
    cases = [(r"\boxed{0.5}", r"\frac12"), (r"\boxed{0.6}", r"\frac12"),
             (r"a </think> \boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
             (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}")]
    main = [is_correct(r, g) for r, g in cases]
    got, errors = [], []

    def work():
        try:
            got.extend(is_correct(r, g) for r, g in cases)
        except Exception as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive() and not errors, errors
    assert main == [True, False, True, True]
    assert got == main


def test_real_aime_rows():
    rows = [json.loads(line) for line in AIME.read_text().splitlines() if line.strip()]
    assert len(rows) == 30
    for row in rows:
        assert is_correct(f"... \\boxed{{{row['answer']}}}", row["answer"]), row["answer"]
        wrong = int(row["answer"]) + 1
        assert not is_correct(f"... \\boxed{{{wrong}}}", row["answer"]), row["answer"]


def test_load_benchmark(tmp_path):
    rows = load_benchmark(str(AIME), limit=3)
    assert len(rows) == 3 and set(rows[0]) == {"problem", "answer"}
    assert rows[0]["answer"] == json.loads(AIME.read_text().splitlines()[0])["answer"]
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps({"question": "1+1?", "solution": 2}) + "\n")
    assert load_benchmark(str(p), "question", "solution") == [{"problem": "1+1?", "answer": "2"}]
    with pytest.raises(SaetuneError, match=r"'answer'.*\['question', 'solution'\]"):
        load_benchmark(str(p), "question")


# ---------------------------------------------------------------- pass@k

def _brute_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_1_and_monotone(nc):
    n, c = nc
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    vals = [pass_at_k(n, c, k) for k in range(1, n + 1)]
    assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:]))
    assert all(0.0 <= v <= 1.0 for v in vals)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(10, 8, 3) == 1.0          # c >= n - k + 1
    assert pass_at_k(10, 0, 5) == 0.0
    with pytest.raises(SaetuneError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(SaetuneError, match="c=5"):
        pass_at_k(4, 5, 1)


def test_summarize_layout_and_ci():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4, [False, True, False, True]]
    out = summarize(correct)
    assert set(out) == {"n", "samples_per_problem", "pass@1", "avg@k", "pass@k", "ci95"}
    assert out["n"] == 4 and out["samples_per_problem"] == 4
    assert out["pass@1"] == pytest.approx(7 / 16) == out["avg@k"] == avg_at_k(correct)
    assert list(out["pass@k"]) == ["1", "4"]
    assert out["pass@k"]["1"] == pytest.approx(out["pass@1"])
    assert out["pass@k"]["4"] == pytest.approx(3 / 4)
    lo, hi = out["ci95"]
    assert 0.0 <= lo <= out["pass@1"] <= hi <= 1.0 and lo < hi
    assert json.loads(json.dumps(out)) == out
    assert summarize(correct, seed=0) == out                      # seeded bootstrap
    assert list(summarize([[True] * 16, [False] * 16])["pass@k"]) == ["1", "4", "16"]
    with pytest.raises(SaetuneError, match="k=8"):
        summarize(correct, ks=(1, 8))
    with pytest.raises(SaetuneError, match=r"\[1, 2\]"):
        summarize([[True], [True, False]])
    with pytest.raises(SaetuneError, match="empty"):
        summarize([])
