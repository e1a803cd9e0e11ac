"""Rollouts (saetune.rl.rollout) and the calculator tool (saetune.rl.tools)."""

import sys
from types import SimpleNamespace

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.rl import rollout as R
from saetune.rl.tools import Calculator, CalculatorError, safe_eval


# ---------------------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expr, value", [
    ("3 + 4", 7), ("( 3 + 4 ) * 2", 14), ("-5 - -2", -3), ("7 / 2", 3.5), ("7 // 2", 3), ("2 ** 10", 1024),
    ("10 % 4", 2), ("1.5 * 2", 3.0), ("2 ** -1", 0.5),
])
def test_calculator_computes_arithmetic(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize("expr, why", [
    ("__import__('os').system('true')", "not arithmetic"),
    ("open('/etc/passwd')", "not arithmetic"),
    ("x + 1", "not arithmetic"),
    ("(1).__class__", "not arithmetic"),
    ("'a' * 3", "only numbers"),
    ("lambda: 1", "not arithmetic"),
    ("[1, 2]", "not arithmetic"),
    ("1 if 1 else 2", "not arithmetic"),
    ("True + 1", "only numbers"),
    ("1 < 2", "not arithmetic"),
    ("9 ** 9 ** 9", "larger than the limit|digits"),
    ("10 ** 64 * 10 ** 64", "digits"),
    ("2 ** 1000", "larger than the limit"),
    ("1e308 * 10", "digits"),
    ("1 / 0", "division by zero"),
    ("0 ** -1", "zero to a negative power"),
    ("(-8) ** 0.5", "complex"),
    ("1 +", "not an arithmetic expression"),
    ("", "empty"),
])
def test_calculator_rejects_non_arithmetic_and_runaway_input(expr, why):
    with pytest.raises(CalculatorError, match=why):
        safe_eval(expr)


def test_calculator_bounds_stop_the_work_before_it_is_done(monkeypatch):
    """The bounds are checked before the costly step: over-long source is never parsed, no operator
    ever runs on a number past the digit limit, ``**`` never runs with a large exponent."""
    from saetune.rl import tools as T
    parsed, ops = [], []
    real_parse = T.ast.parse

    def counting_parse(src, *args, **kw):
        parsed.append(len(src))
        return real_parse(src, *args, **kw)

    def counted(name, f):
        def op(*args):  # checked before the operation runs: a missing bound fails here instead of hanging
            ops.append(name)
            assert all(T._digits(a) <= 60 for a in args), (name, args)  # 60: the default max_digits
            assert name != "Pow" or abs(args[1]) <= 64, args  # 64: the default max_exponent
            return f(*args)
        return op
    monkeypatch.setattr(T.ast, "parse", counting_parse)
    monkeypatch.setattr(T, "_BINOPS", {k: counted(k.__name__, f) for k, f in T._BINOPS.items()})
    monkeypatch.setattr(T, "_UNARY", {k: counted(k.__name__, f) for k, f in T._UNARY.items()})
    hostile = ["9 ** 9 ** 9 ** 9", "1" * 100_000, "(" * 5000 + "1" + ")" * 5000, "+".join(["9 ** 60"] * 50),
               "-" * 150 + "1", "((((((((((((((((((((1))))))))))))))))))))" * 3]
    for expr in hostile:
        parsed.clear()
        ops.clear()
        with pytest.raises(CalculatorError):
            safe_eval(expr)
        assert parsed == ([] if len(expr) > 200 else [len(expr)]), expr[:40]  # 200: the default max_chars
        assert len(ops) <= 64, (expr[:40], len(ops))  # at most one operation per allowed syntax node


def test_calculator_tool_finds_calls_and_answers():
    calc = Calculator()
    assert calc.pending_call("so <calc> 3 * 4 </calc>") == " 3 * 4 "
    assert calc.pending_call("so <calc> 3 * 4 </calc> = 12") is None
    assert calc.pending_call("no call </calc>") is None
    assert calc.answer(" 3 * 4 ") == " = 12"
    assert calc.answer("7 / 2") == " = 3.5"
    assert calc.answer("__import__('os')") == " = error"
    assert calc.answer("9 ** 9 ** 9") == " = error"


# ---------------------------------------------------------------------------------------- stops
def test_cut_at_stop_tokens_and_strings():
    decode = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    assert R.cut_at_stop([1, 2, 9, 3], [9], [], decode) == ([1, 2, 9], True)
    assert R.cut_at_stop([1, 2, 3, 4], [9], ["w2 w3"], decode) == ([1, 2, 3], True)
    assert R.cut_at_stop([1, 2, 3], [9], ["w7"], decode) == ([1, 2, 3], False)
    assert R.cut_at_stop([], [9], [], decode) == ([], False)
    with pytest.raises(SaetuneError, match="empty string"):
        R.SampleParams(stop_strings=("",))


def test_sample_params_are_sampling_params_with_rl_defaults():
    from saetune.generation import SamplingParams
    p = R.SampleParams()
    assert isinstance(p, SamplingParams)
    assert (p.temperature, p.top_p, p.max_new_tokens, p.max_total_tokens, p.max_tool_calls) == (1.0, 1.0, 256, 0, 4)
    for bad, what in [(dict(top_p=0), "top_p"), (dict(max_total_tokens=-1), "max_total_tokens"),
                      (dict(max_tool_calls=-1), "max_tool_calls")]:
        with pytest.raises(SaetuneError, match=what):
            R.SampleParams(**bad)


# ---------------------------------------------------------------------------------------- on the toy
@pytest.fixture(scope="module")
def toy():
    from saetune.toy import load_toy, task
    model, tok = load_toy()
    exs = task.examples(6, 11)
    ids = [tok(e["prompt"], add_special_tokens=False)["input_ids"] for e in exs]
    return model, tok, exs, ids


def _stops(tok):
    from saetune.toy.build import generation_stop_ids
    return tuple(generation_stop_ids(tok))


def test_greedy_rollout_is_padding_independent_and_matches_the_toy_eval(toy):
    from saetune.toy.build import generate_responses, max_new_tokens
    model, tok, exs, ids = toy
    # prompts of different lengths in one left-padded batch give the same tokens as one by one
    mixed = [ids[0], ids[1][:5], ids[2]]
    p = R.SampleParams(temperature=0, max_new_tokens=max_new_tokens(), stop_token_ids=_stops(tok))
    together = R.sample(model, tok, mixed, p, seed=0)
    alone = [R.sample(model, tok, [x], p, seed=0).response_ids[0] for x in mixed]
    assert together.response_ids == alone
    ref = generate_responses(model, tok, [exs[0]["prompt"]])[0]
    assert together.texts[0] == ref.replace(tok.eos_token, "").strip()
    for r, lp, ent in zip(together.response_ids, together.logprobs, together.entropies):
        assert lp.shape == ent.shape == (len(r),) and lp.dtype == torch.float32
        assert bool((lp <= 0).all()) and bool((ent >= 0).all())
    assert together.policy_mask == [[1] * len(r) for r in together.response_ids]


def test_sampling_is_seeded_and_capped(toy):
    model, tok, _, ids = toy
    p = R.SampleParams(temperature=1.0, max_new_tokens=5, stop_token_ids=_stops(tok))
    a, b = R.sample(model, tok, ids, p, seed=3), R.sample(model, tok, ids, p, seed=3)
    assert a.response_ids == b.response_ids
    assert all(len(r) <= 5 for r in a.response_ids) and all(a.truncated)
    # the context cap: prompt + response ≤ max_total_tokens
    p = R.SampleParams(temperature=1.0, max_new_tokens=40, stop_token_ids=_stops(tok), max_total_tokens=len(ids[0]) + 3)
    c = R.sample(model, tok, [ids[0]], p, seed=1)
    assert len(c.response_ids[0]) <= 3 and c.truncated[0]
    p = R.SampleParams(max_total_tokens=len(ids[0]))
    with pytest.raises(SaetuneError, match="room"):
        R.sample(model, tok, [ids[0]], p, seed=1)


def test_stop_strings_cut_the_response(toy):
    model, tok, _, ids = toy
    p = R.SampleParams(temperature=0, max_new_tokens=60, stop_token_ids=_stops(tok), stop_strings=("therefore",))
    ro = R.sample(model, tok, ids[:3], p, seed=0)
    for t in ro.texts:
        assert t.endswith("therefore") and t.count("therefore") == 1


def test_fused_kernel_is_found_and_a_broken_import_is_not_hidden(monkeypatch):
    from saetune.kernels.entropy import linear_entropy_logprob
    assert R.fused_kernel() is linear_entropy_logprob
    import saetune.kernels as K
    monkeypatch.delattr(K, "linear_entropy_logprob")  # a kernels package whose export went missing
    monkeypatch.setitem(sys.modules, "saetune.kernels.entropy", None)  # and a kernel module that cannot import
    with pytest.raises(ImportError, match="linear_entropy_logprob"):
        R.fused_kernel()


def test_fused_and_explicit_entropy_agree(toy):
    model, tok, _, ids = toy
    rows = [ids[0] + ids[1], ids[2]]
    x, attn = R.right_pad(rows, tok.pad_token_id)
    tm = attn.bool().clone()
    tm[:, :3] = False
    with torch.no_grad():
        lp_f, ent_f = R.score(model, x, attn, tm, temperature=0.7, use_kernel=True)
        lp_e, ent_e = R.score(model, x, attn, tm, temperature=0.7, use_kernel=False)
    torch.testing.assert_close(lp_f, lp_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_f, ent_e, atol=1e-5, rtol=1e-5)
    assert float(lp_f[~tm].abs().sum()) == 0.0


def test_score_with_no_target_tokens_is_zero(toy):
    model, tok, _, ids = toy
    x, attn = R.right_pad([ids[0], []], tok.pad_token_id)  # an all-padding row
    lp, ent = R.score(model, x, attn, torch.zeros_like(x, dtype=torch.bool))
    assert lp.abs().sum() == 0 and ent.abs().sum() == 0
    lps, ents = R.score_responses(model, [ids[0], ids[1]], [[], []], tok.pad_token_id, 1.0)
    assert [t.numel() for t in lps + ents] == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------- the tool loop
def _word_tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *words])}
    t = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


class ScriptedLM(torch.nn.Module):
    """Emits ``script[k]`` after its k-th tool answer; uniform logits (the tool loop is under test)."""

    def __init__(self, tok, script):
        super().__init__()
        self.tok, self.script = tok, script
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.generation_config = None
        self.calls = 0

    def generate(self, input_ids, attention_mask, generation_config, stopping_criteria=None):
        self.calls += 1
        rows = []
        for r in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[r][attention_mask[r].bool()].tolist())
            k = text.count("</calc>")
            rows.append(self.tok(self.script[min(k, len(self.script) - 1)])["input_ids"])
        width = max(len(x) for x in rows)
        new = torch.full((len(rows), width), self.tok.pad_token_id)
        for r, x in enumerate(rows):
            new[r, :len(x)] = torch.tensor(x)
        return torch.cat([input_ids, new], dim=1)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(self.tok)) + self.w)


def test_tool_calls_are_answered_counted_and_masked():
    words = ["<calc>", "</calc>", "+", "*", "**", "=", "error", "done", "go", "junk"] + [str(i) for i in range(100)]
    tok = _word_tokenizer(words)
    model = ScriptedLM(tok, ["<calc> 3 + 4 </calc> junk junk", "<calc> 2 * 5 </calc>",
                             "<calc> 9 ** 9 ** 9 </calc>", "done <eos>"])
    prompt = tok("go")["input_ids"]
    ro = R.sample(model, tok, [prompt, prompt], R.SampleParams(max_new_tokens=40), seed=0, tool=Calculator())
    assert ro.texts[0] == "<calc> 3 + 4 </calc> = 7 <calc> 2 * 5 </calc> = 10 <calc> 9 ** 9 ** 9 </calc> = error done"
    assert ro.tool_calls == [3, 3] and ro.truncated == [False, False]
    toks = [tok.convert_ids_to_tokens(i) for i in ro.response_ids[0]]
    tool_tokens = [t for t, m in zip(toks, ro.policy_mask[0]) if m == 0]
    assert tool_tokens == ["=", "7", "=", "10", "=", "error"]
    assert toks[-1] == "<eos>" and ro.policy_mask[0][-1] == 1
    # at most max_tool_calls calls are answered; the rest end the response
    model = ScriptedLM(tok, ["<calc> 1 + 1 </calc>", "<calc> 2 + 2 </calc>", "done <eos>"])
    ro = R.sample(model, tok, [prompt], R.SampleParams(max_new_tokens=40, max_tool_calls=1), seed=0, tool=Calculator())
    assert ro.tool_calls == [1] and ro.texts[0] == "<calc> 1 + 1 </calc> = 2 <calc> 2 + 2 </calc>"
