"""Eval presets: the resa preset (the reference evaluation behind Resa's table), GPQA-Diamond, and
samples.jsonl rows that let any number be audited (exact prompt, gold as graded, extracted answer)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from saetune.errors import SaetuneError
from saetune.evaluate import EvalConfig, compare, format_table, is_correct, prompt_messages, read_samples, run
from saetune.generation import Completion, HFBackend, SamplingParams

BENCHMARKS = Path(__file__).parent / "data" / "benchmarks"  # the vendored AIME24/25, AMC23, MATH500, Minerva
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# written out here on purpose (not imported): the reference's exact text, two spaces after "clearly."
RESA_TEXT = ("Solve the following math problem efficiently and clearly.  The last line of your response should be "
             "of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' "
             "(without quotes) where ANSWER is just the final number or expression that solves the problem. Think "
             "step by step before answering.\n\n")
GPQA_TEXT = ("Answer the following multiple choice question. The last line of your response should be of the "
             "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step "
             "before answering.\n\n")
GPQA_RECORD = {"Question": "  Which particle carries the electromagnetic force?\n", "Correct Answer": " photon ",
               "Incorrect Answer 1": "gluon", "Incorrect Answer 2": "W boson", "Incorrect Answer 3": "graviton",
               "Record ID": "rec0"}
RESA_FINAL = "Therefore, the final answer is: $\\boxed{{{}}}$. I hope it is correct"


def _rows(name):
    return [json.loads(line) for line in (BENCHMARKS / name).read_text().splitlines() if line.strip()]


class FakeBackend:
    """Answers every prompt with one fixed text; remembers the sampling parameters."""

    name = "fake"

    def __init__(self, tokenizer, text):
        self.tokenizer, self.text, self.params = tokenizer, text, []

    def generate(self, prompts, params, seeds):
        self.params.append(params)
        return [Completion(self.text, n_tokens=3) for _ in prompts]

    def close(self):
        pass


class GPQAOracle(FakeBackend):
    """Answers a GPQA prompt with the letter of the choice reading ``answer`` (``fmt`` wraps the letter;
    the toy chat template ends the last choice's line with " Assistant :")."""

    def __init__(self, tokenizer, answer, fmt="Answer: {}"):
        super().__init__(tokenizer, "")
        self.answer, self.fmt = answer, fmt

    def generate(self, prompts, params, seeds):
        line = re.compile(rf"^([ABCD])\) {re.escape(self.answer)}(?:$| Assistant :)", re.M)
        letters = [line.search(p).group(1) for p in prompts]
        return [Completion(f"thinking ... \n{self.fmt.format(x)}", n_tokens=5) for x in letters]


@pytest.fixture(scope="module")
def toy_tok():
    from saetune.toy.tokenizer import build_tokenizer
    return build_tokenizer()


def _chat(tok, content):
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- item 6: the resa preset

def test_resa_prompt_is_the_reference_text_with_the_local_instruction_cut():
    rows = _rows("aime25.jsonl")
    assert all(r["problem"].endswith("\n" + INSTRUCTION) for r in rows)  # what the vendored copies look like
    problem = rows[0]["problem"]
    question = problem[:-len("\n" + INSTRUCTION)]
    msgs = prompt_messages(problem, preset="resa")
    assert msgs == [{"role": "user", "content": RESA_TEXT + question}]  # one user turn, no system prompt
    assert prompt_messages(question, preset="resa") == msgs  # a clean hub problem gives the same prompt
    # the default preset keeps saetune's prompt: the file's own instruction, or the boxed one appended
    assert prompt_messages(problem, preset="saetune") == [{"role": "user", "content": problem}]
    assert prompt_messages("What is 1+1?", preset="saetune")[0]["content"] == "What is 1+1?\n" + INSTRUCTION
    with pytest.raises(SaetuneError, match="preset 'lighteval'"):
        prompt_messages(problem, preset="lighteval")


@pytest.mark.parametrize("response, gold, benchmark, resa, default", [
    # no box: the reference's expression target still reads the answer; saetune wants a box
    ("So the answer is 70.", "70", "aime25", True, False),
    # the reference reads the whole response, saetune only what follows </think>
    ("<think>it is \\boxed{204}</think> I am not sure.", "204", "aime24", True, False),
    # float_rounding=5 in the reference
    ("\\boxed{1.600004}", "the diameter is $\\boxed{1.6}$ cm", "minerva", True, False),
    (RESA_FINAL.format("27"), "27", "amc23", True, True),
    (RESA_FINAL.format("28"), "27", "amc23", False, False),
])
def test_resa_grading_differs_from_the_default_where_the_reference_does(response, gold, benchmark, resa, default):
    assert is_correct(response, gold, preset="resa", benchmark=benchmark) is resa
    assert is_correct(response, gold, preset="saetune", benchmark=benchmark) is default
    if not gold.startswith("the"):
        assert is_correct(response, gold) is default  # the old call is today's grading


def test_resa_reads_the_boxed_answer_out_of_the_whole_solution():
    solution = ("We have $r = \\sqrt{0^2 + 3^2} = 3$ and $\\theta = \\frac{\\pi}{2}$, so the answer is "
                "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.")
    assert is_correct(RESA_FINAL.format("(3, \\frac{\\pi}{2})"), solution, preset="resa", benchmark="math500")
    assert not is_correct(RESA_FINAL.format("(3, \\pi)"), solution, preset="resa", benchmark="math500")
    # AIME golds are expressions: "\boxed{70}" is not what the reference reads from the answer field
    assert not is_correct(RESA_FINAL.format("70"), "\\boxed{", preset="resa", benchmark="aime24")


def test_resa_grading_arguments_are_checked():
    with pytest.raises(SaetuneError, match="benchmark=None"):
        is_correct("\\boxed{1}", "1", preset="resa")
    with pytest.raises(SaetuneError, match="benchmark='mmlu'"):
        is_correct("\\boxed{1}", "1", preset="resa", benchmark="mmlu")
    with pytest.raises(SaetuneError, match="by keyword"):
        is_correct("\\boxed{1}", "1", "resa")
    with pytest.raises(SaetuneError, match="chat template"):
        EvalConfig(preset="resa", template="raw")


def test_resa_on_the_vendored_files_reads_every_gold():
    """Each real problem, answered in the reference's format with its own answer, is correct under resa
    (the local copies lack ``solution``: ``\\boxed{answer}`` stands in for it)."""
    from saetune.eval_presets import resa_gold, resa_gold_kind
    for file, name, step in (("aime24.jsonl", "aime24", 1), ("aime25.jsonl", "aime25", 1),
                             ("amc2023.jsonl", "amc23", 1), ("math500.jsonl", "math500", 7),
                             ("minervamath.jsonl", "minerva", 7)):
        kind = resa_gold_kind(file.split(".")[0])
        assert kind == resa_gold_kind(name) == ("expr" if name.startswith(("aime", "amc")) else "latex")
        for row in _rows(file)[::step]:
            gold, source = resa_gold(row, kind)
            assert source == ("answer" if kind == "expr" else "\\boxed{answer} (no solution field)")
            assert is_correct(RESA_FINAL.format(row["answer"]), gold, preset="resa", benchmark=name), (file, row)


def test_resa_lengths_follow_the_model_name(tmp_path, tiny_model_dir, toy_tok):
    from saetune.eval_presets import resa_lengths
    assert resa_lengths(["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"]) == 32768
    assert resa_lengths(["Qwen/Qwen2.5-Math-1.5B"]) == 4096
    bench = tmp_path / "aime24.jsonl"
    bench.write_text(json.dumps({"problem": "What is 1+1?\n" + INSTRUCTION, "answer": "2"}) + "\n")
    math_model = tmp_path / "Qwen2.5-Math-1.5B"
    shutil.copytree(tiny_model_dir, math_model)
    for model, total in ((tiny_model_dir, 32768), (math_model, 4096)):
        fake = FakeBackend(toy_tok, RESA_FINAL.format("2"))
        res = run(EvalConfig(model=str(model), preset="resa", benchmarks=[str(bench)], progress=False),
                  tmp_path / f"ev{total}", backend=fake)["aime24"]
        assert fake.params[0].max_new_tokens == fake.params[0].max_total_tokens == total
        assert res["max_total_tokens"] == total and res["deviations"] == [] and res["pass@1"] == 1.0
    res = run(EvalConfig(preset="resa", benchmarks=[str(bench)], max_new_tokens=64, temperature=0, progress=False),
              tmp_path / "short", backend=FakeBackend(toy_tok, "x"))["aime24"]
    assert res["deviations"] == ["max_new_tokens 64 (reference: 32768)", "temperature 0 (reference: 0.6)"]


def test_hf_backend_caps_prompt_plus_response_at_max_total_tokens(toy_base, one_thread):
    model, tok = toy_base
    prompt = _chat(tok, "1 + 2")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    out = HFBackend(model, tok, batch_size=1).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=50, max_total_tokens=n_prompt + 3), [0])
    assert out[0].n_tokens <= 3
    with pytest.raises(SaetuneError, match="no room"):
        HFBackend(model, tok).generate([prompt], SamplingParams(max_new_tokens=8, max_total_tokens=n_prompt), [0])


def test_compare_refuses_mixed_presets_unless_allowed(tmp_path, toy_tok, capsys):
    from saetune.cli import main
    bench = tmp_path / "aime24.jsonl"
    bench.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    for preset in ("saetune", "resa"):
        run(EvalConfig(preset=preset, benchmarks=[str(bench)], label=preset, progress=False), tmp_path / preset,
            backend=FakeBackend(toy_tok, RESA_FINAL.format("2")))
        assert json.loads((tmp_path / preset / "eval" / "results.json").read_text())["aime24"]["preset"] == preset
    assert json.loads((tmp_path / "resa" / "manifest.json").read_text())["preset"]["name"] == "resa"
    same = compare([tmp_path / "resa"])
    assert same.loc["resa", "preset"] == "resa" and "Note" not in format_table(same)
    with pytest.raises(SaetuneError, match=r"different presets \(saetune: saetune; resa: resa\)"):
        compare([tmp_path / "saetune", tmp_path / "resa"])
    mixed = compare([tmp_path / "saetune", tmp_path / "resa"], allow_mixed_presets=True)
    assert list(mixed["preset"]) == ["saetune", "resa"]
    assert format_table(mixed).splitlines()[-1].startswith("Note: these runs use different eval presets")
    assert main(["eval", "--compare", str(tmp_path / "saetune"), str(tmp_path / "resa")]) == 2
    assert "--allow-mixed-presets" in capsys.readouterr().err
    assert main(["eval", "--compare", str(tmp_path / "saetune"), str(tmp_path / "resa"), "--allow-mixed-presets"]) == 0
    assert "Note: these runs use different eval presets" in capsys.readouterr().out


# ---------------------------------------------------------------- item 7: GPQA-Diamond

def test_gpqa_prompt_and_seeded_place():
    from saetune.eval_presets import gpqa_choices
    choices, letter = gpqa_choices("photon", ["gluon", "W boson", "graviton"], seed=0, index=0)
    assert choices["ABCD".index(letter)] == "photon" and sorted(choices) == sorted(["photon", "gluon", "W boson",
                                                                                   "graviton"])
    assert gpqa_choices("photon", ["gluon", "W boson", "graviton"], seed=0, index=0) == (choices, letter)
    assert {gpqa_choices("p", ["a", "b", "c"], seed=0, index=i)[1] for i in range(40)} == set("ABCD")
    msgs = prompt_messages({"question": "Which?", "choices": ["w", "x", "y", "z"]}, preset="resa")
    assert msgs == [{"role": "user", "content": GPQA_TEXT + "Which?\n\nA) w\nB) x\nC) y\nD) z"}]
    assert prompt_messages({"question": "Which?", "choices": ["w", "x", "y", "z"]}, preset="saetune") == msgs


@pytest.mark.parametrize("response, letter", [
    ("I think so.\nAnswer: B", "B"),
    ("**Answer:** C", "C"),
    ("**Answer: D**", "D"),
    ("Answer: $A$", "A"),
    ("ANSWER: \\boxed{B}", "B"),
    ("The answer is (C).", "C"),
    ("Answer: A ... wait, no.\nAnswer: D", "D"),  # the last one counts
    ("so it is \\boxed{\\text{C}}", "C"),
    ("Answer: Because of symmetry, none.", None),
    ("The answer is a photon.", None),
    ("no letter at all", None),
])
def test_gpqa_letter_extraction(response, letter):
    from saetune.eval_presets import extract_letter
    assert extract_letter(response) == letter
    if letter:
        assert is_correct(response, letter, preset="resa", benchmark="gpqa")
        assert is_correct(response, letter, preset="saetune", benchmark="gpqa_diamond")
        assert not is_correct(response, "ABCD".replace(letter, "")[0], preset="resa", benchmark="gpqa")


def test_gpqa_eval_from_a_local_file(tmp_path, toy_tok):
    from saetune.evaluate import resolve_benchmark
    d = tmp_path / "benchmarks"
    d.mkdir()
    records = [dict(GPQA_RECORD, **{"Record ID": f"rec{i}"}) for i in range(6)]
    (d / "gpqa_diamond.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert resolve_benchmark("gpqa", str(d))[:2] == ("gpqa", str(d / "gpqa_diamond.jsonl"))
    assert resolve_benchmark("gpqa")[1] == "Idavidrein/gpqa"  # no local file: the gated hub dataset
    for preset in ("saetune", "resa"):
        res = run(EvalConfig(preset=preset, benchmarks=["gpqa"], benchmarks_dir=str(d), seed=3, progress=False),
                  tmp_path / f"ev-{preset}", backend=GPQAOracle(toy_tok, "photon", fmt="**Answer: ${}$**"))
        assert res["gpqa"]["pass@1"] == 1.0 and res["gpqa"]["grader"].startswith("letter")
        rows = read_samples(tmp_path / f"ev-{preset}" / "eval" / "samples.jsonl")
        assert len(rows) == 6
        for r in rows:
            assert r["choices"][("ABCD").index(r["gold"])] == "photon" and r["extracted"] == [r["gold"]]
            assert r["prompt"] == _chat(toy_tok, GPQA_TEXT + "Which particle carries the electromagnetic force?\n\n"
                                        + "\n".join(f"{x}) {c}" for x, c in zip("ABCD", r["choices"])))
    # any file with GPQA's field names is GPQA; a wrong letter is wrong
    other = tmp_path / "my_mc.jsonl"
    other.write_text(json.dumps(GPQA_RECORD) + "\n")
    res = run(EvalConfig(benchmarks=[str(other)], progress=False), tmp_path / "ev-wrong",
              backend=GPQAOracle(toy_tok, "gluon"))
    assert res["my_mc"]["pass@1"] == 0.0
    bad = tmp_path / "gpqa_diamond.jsonl"
    bad.write_text(json.dumps({k: v for k, v in GPQA_RECORD.items() if k != "Incorrect Answer 2"}) + "\n")
    with pytest.raises(SaetuneError, match="lacks \\['Incorrect Answer 2'\\]"):
        run(EvalConfig(benchmarks=[str(bad)], progress=False), tmp_path / "ev-bad", backend=GPQAOracle(toy_tok, "x"))


# ---------------------------------------------------------------- item 8: auditable samples

def test_toy_samples_record_prompt_gold_and_extracted_answer(tmp_path, toy_base, one_thread):
    from saetune.toy import task
    from saetune.toy.build import EVAL_SEED_OFFSET
    model, tok = toy_base
    res = run(EvalConfig(benchmarks=["toy"], toy_problems=4, temperature=0, progress=False), tmp_path / "ev",
              backend=HFBackend(model, tok, batch_size=4))
    assert res["toy"]["preset"] == "saetune"
    rows = read_samples(tmp_path / "ev" / "eval" / "samples.jsonl")
    problems = task.examples(4, EVAL_SEED_OFFSET)
    for r in rows:
        ex = problems[r["problem_index"]]
        assert r["prompt"] == _chat(tok, ex["problem"]) and r["gold"] == ex["answer"] and r["preset"] == "saetune"
        got = task.extract_answer(r["response"])
        assert r["extracted"] == ([] if got is None else [got]) and r["correct"] == (got == ex["answer"])


def test_resa_run_with_the_toy_generator_records_what_was_sent_and_graded(tmp_path, capsys):
    """The CLI with ``--preset resa`` on tiny local copies (one with ``solution``, one without), the toy
    model generating: the toy's answers are wrong; the rows must show the exact prompt, gold and extraction."""
    from saetune.cli import main
    from saetune.toy import load_toy
    _, tok = load_toy()
    aime = tmp_path / "aime24.jsonl"
    aime.write_text("".join(json.dumps({"problem": f"what is {i} + 1 ?\n{INSTRUCTION}", "answer": str(i + 1)}) + "\n"
                            for i in range(2)))
    m500 = tmp_path / "math500.jsonl"
    m500.write_text(json.dumps({"problem": "what is 2 + 2 ?\n" + INSTRUCTION, "answer": "4"}) + "\n"
                    + json.dumps({"problem": "what is 3 + 3 ?", "answer": "6",
                                  "solution": "Add: $3 + 3 = \\boxed{6}$."}) + "\n")
    out = tmp_path / "ev"
    assert main(["eval", "--model", "toy", "--preset", "resa", "--benchmarks", str(aime), str(m500),
                 "--max-new-tokens", "4", "--temperature", "0", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {e["preset"] for e in results.values()} == {"resa"}
    assert results["aime24"]["gold_sources"] == {"answer": 2}
    assert results["math500"]["gold_sources"] == {"\\boxed{answer} (no solution field)": 1, "solution": 1}
    assert results["aime24"]["prompt_edits"] == {"stripped trailing instruction": 2}
    assert results["math500"]["deviations"][0] == "max_new_tokens 4 (reference: 32768)"
    rows = {(r["benchmark"], r["problem_index"]): r for r in read_samples(out / "eval" / "samples.jsonl")}
    assert len(rows) == 4 and all(r["preset"] == "resa" and r["n_tokens"] <= 4 for r in rows.values())
    a0 = rows["aime24", 0]
    assert a0["prompt"] == _chat(tok, RESA_TEXT + "what is 0 + 1 ?")
    assert a0["prompt_edits"] == ["stripped trailing instruction"]
    assert a0["gold"] == "1" and a0["gold_source"] == "answer" and a0["gold_extracted"] == ["1", "1"]
    m0, m1 = rows["math500", 0], rows["math500", 1]
    assert m0["gold"] == "\\boxed{4}" and m0["gold_extracted"] == ["4", "4"]
    assert m1["gold"] == "Add: $3 + 3 = \\boxed{6}$." and m1["gold_source"] == "solution" and m1["prompt_edits"] == []
    assert m1["prompt"] == _chat(tok, RESA_TEXT + "what is 3 + 3 ?")
    for r in rows.values():  # what the grader read is what a reader re-grading the response would read
        from saetune.eval_presets import grade_one
        again = grade_one(r["response"], r["gold"], "expr" if r["benchmark"] == "aime24" else "latex")
        assert r["extracted"] == again["extracted"] and r["correct"] == again["correct"]
