"""The eval stage: run dirs, results.json, samples.jsonl, resume, bad benchmarks, comparison, CLI."""

import json
from pathlib import Path

import pytest

from saetune.errors import SaetuneError
from saetune.evaluate import (EvalConfig, compare, format_table, read_samples, resolve_benchmark, resolve_model,
                              run)
from saetune.generation import Completion, HFBackend

DATA = Path(__file__).parent / "data"
SHARED_BENCHMARKS = DATA / "benchmarks"  # the real AIME24/25, AMC23, MATH500, Minerva files, vendored
ENTRY_KEYS = {"n", "samples_per_problem", "pass@1", "avg@k", "pass@k", "ci95", "unparsable_gold",
              "problems_per_s", "tokens_per_s"}
ROW_KEYS = {"benchmark", "problem_index", "sample_index", "preset", "prompt", "prompt_edits", "response", "gold",
            "gold_source", "gold_extracted", "extracted", "correct", "n_tokens", "truncated"}


class FakeBackend:
    """Answers every prompt with one fixed text; counts what it was asked."""

    name = "fake"

    def __init__(self, tokenizer, text=r"so \boxed{2}"):
        self.tokenizer, self.text, self.calls, self.prompts = tokenizer, text, 0, 0

    def generate(self, prompts, params, seeds):
        self.calls += 1
        self.prompts += len(prompts)
        return [Completion(self.text, n_tokens=3) for _ in prompts]

    def close(self):
        pass


class Counting:
    """Wraps a backend; raises KeyboardInterrupt on call number ``stop_at`` (1-based), if given."""

    name = "counting"

    def __init__(self, inner, stop_at=None):
        self.inner, self.tokenizer, self.stop_at, self.calls, self.prompts = inner, inner.tokenizer, stop_at, 0, 0

    def generate(self, prompts, params, seeds):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.prompts += len(prompts)
        return self.inner.generate(prompts, params, seeds)

    def close(self):
        pass


@pytest.fixture(scope="module")
def toy_tok():
    from saetune.toy.tokenizer import build_tokenizer
    return build_tokenizer()


def _math_file(tmp_path, golds, name="mini.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"problem": f"What is {i}?", "answer": g}) + "\n" for i, g in enumerate(golds)))
    return p


# ---------------------------------------------------------------- the toy, end to end

def test_toy_eval_results_schema_and_reference_accuracy(tmp_path, toy_base, one_thread):
    from saetune.toy.build import EVAL_SEED_OFFSET, evaluate_toy
    model, tok = toy_base
    cfg = EvalConfig(benchmarks=["toy"], toy_problems=24, temperature=0, batch_size=8, progress=False, label="base")
    res = run(cfg, tmp_path / "ev", backend=HFBackend(model, tok, batch_size=8))
    on_disk = json.loads((tmp_path / "ev" / "eval" / "results.json").read_text())
    assert on_disk == res and set(res) == {"toy"}
    e = res["toy"]
    assert ENTRY_KEYS <= set(e) and e["n"] == 24 and e["samples_per_problem"] == 1
    assert e["pass@1"] == pytest.approx(evaluate_toy(model, tok, 24, EVAL_SEED_OFFSET))  # same problems, greedy
    assert e["ci95"][0] <= e["pass@1"] <= e["ci95"][1] and e["problems_per_s"] > 0
    rows = read_samples(tmp_path / "ev" / "eval" / "samples.jsonl")
    assert len(rows) == 24 and all(set(r) == ROW_KEYS for r in rows)
    assert sorted(r["problem_index"] for r in rows) == list(range(24))
    assert sum(r["correct"] for r in rows) / 24 == e["pass@1"]
    man = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert man["status"] == "complete" and man["stage"] == "eval" and man["label"] == "base"
    assert man["throughput"]["toy"]["problems_per_s"] == e["problems_per_s"]
    assert {"load", "generate:toy", "grade:toy"} <= set(man["phases"]) and "estimated_cost_usd" in man


def test_resume_after_interruption_regenerates_nothing_finished(tmp_path, toy_base, one_thread):
    model, tok = toy_base
    cfg = EvalConfig(benchmarks=["toy"], toy_problems=8, samples=2, ks=[1, 2], temperature=0.6, batch_size=4,
                     progress=False)
    ref = run(cfg, tmp_path / "ref", backend=HFBackend(model, tok, batch_size=4))
    out = tmp_path / "ev"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, backend=Counting(HFBackend(model, tok, batch_size=4), stop_at=3))
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    samples = out / "eval" / "samples.jsonl"
    assert len(read_samples(samples)) == 8  # two finished batches of 4
    with open(samples, "a") as f:
        f.write('{"benchmark": "toy", "problem_ind')  # a line cut by a kill
    again = Counting(HFBackend(model, tok, batch_size=4))
    res = run(cfg, out, resume=True, backend=again)
    assert again.prompts == 8 and again.calls == 2  # only the 8 missing samples
    rows = read_samples(samples)
    assert len(rows) == 16 and len({(r["problem_index"], r["sample_index"]) for r in rows}) == 16
    # the same batches with the same seeds: the resumed eval equals the uninterrupted one
    key = lambda r: (r["problem_index"], r["sample_index"])  # noqa: E731
    ref_rows = sorted(read_samples(tmp_path / "ref" / "eval" / "samples.jsonl"), key=key)
    assert [r["response"] for r in sorted(rows, key=key)] == [r["response"] for r in ref_rows]
    assert res["toy"]["pass@k"] == ref["toy"]["pass@k"]
    with pytest.raises(SaetuneError, match="already holds"):
        run(cfg, out, backend=again)


# ---------------------------------------------------------------- math benchmarks

def test_math_benchmark_on_random_qwen2(tmp_path, tiny_model_dir, one_thread):
    cfg = EvalConfig(model=str(tiny_model_dir), benchmarks=[str(DATA / "aime24.jsonl")], limit=2, samples=2,
                     max_new_tokens=6, template="raw", batch_size=4, progress=False)
    res = run(cfg, tmp_path / "ev")
    e = res["aime24"]
    assert e["n"] == 2 and e["samples_per_problem"] == 2 and e["pass@1"] == 0.0 and e["unparsable_gold"] == 0
    rows = read_samples(tmp_path / "ev" / "eval" / "samples.jsonl")
    assert len(rows) == 4 and all(1 <= r["n_tokens"] <= 6 for r in rows)
    assert all(r["prompt"].endswith("within \\boxed{}.") for r in rows)  # the file's own instruction, not doubled


def test_unparsable_gold_is_counted_not_fatal(tmp_path, toy_tok):
    bench = _math_file(tmp_path, ["2", "\\frac{", "", "3"])
    cfg = EvalConfig(benchmarks=[str(bench)], template="raw", progress=False)
    res = run(cfg, tmp_path / "ev", backend=FakeBackend(toy_tok))
    e = res["mini"]
    assert e["unparsable_gold"] == 2 and e["unparsable_gold_problems"] == [1, 2]
    assert e["n"] == 4 and e["pass@1"] == 0.25  # only "2" matches \boxed{2}
    rows = read_samples(tmp_path / "ev" / "eval" / "samples.jsonl")
    assert all(r["prompt"].endswith("put your final answer within \\boxed{}.") for r in rows)  # instruction added


def test_missing_field_names_the_line(tmp_path, toy_tok):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"problem": "a", "answer": "1"}) + "\n\n"
                 + json.dumps({"problem": "b", "solution": "2"}) + "\n")
    with pytest.raises(SaetuneError, match=r"line 3 has no field 'answer'.*\['problem', 'solution'\]"):
        run(EvalConfig(benchmarks=[str(p)], progress=False), tmp_path / "ev", backend=FakeBackend(toy_tok))
    assert json.loads((tmp_path / "ev" / "manifest.json").read_text())["status"] == "failed"


def test_resolve_benchmark(tmp_path):
    (tmp_path / "aime24.jsonl").write_text((DATA / "aime24.jsonl").read_text())
    assert resolve_benchmark("aime24", str(tmp_path)) == ("aime24", str(tmp_path / "aime24.jsonl"), "", "problem",
                                                          "answer")
    assert resolve_benchmark("math500", str(tmp_path))[1:3] == ("HuggingFaceH4/MATH-500", "test")
    assert resolve_benchmark("brendel-group/MATH-Beyond")[:3] == ("math-beyond", "brendel-group/MATH-Beyond", "test")
    assert resolve_benchmark("minerva")[3:] == ("problem", "solution")
    assert resolve_benchmark("org/other")[:2] == ("org/other", "org/other")
    with pytest.raises(SaetuneError, match="known name"):
        resolve_benchmark("no_such_bench")


def test_real_benchmark_files_load():
    from saetune.evaluate import load_benchmark
    counts = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272}
    for name, n in counts.items():
        _, source, *_ = resolve_benchmark(name, str(SHARED_BENCHMARKS))
        rows = load_benchmark(source)
        assert len(rows) == n and all(r["problem"] and r["answer"] for r in rows)


def test_config_checks():
    with pytest.raises(SaetuneError, match="exceed samples"):
        EvalConfig(samples=4, ks=[1, 8])
    with pytest.raises(SaetuneError, match="twice"):
        EvalConfig(benchmarks=["toy", "toy"])


def test_resolve_model_run_dirs(tmp_path, tiny_model_dir):
    import shutil
    run_dir = tmp_path / "tune"
    shutil.copytree(tiny_model_dir, run_dir / "model")
    assert resolve_model(str(run_dir))["path"] == str(run_dir / "model")
    shutil.copytree(tiny_model_dir, run_dir / "merged")
    assert resolve_model(str(run_dir)) == {"path": str(run_dir / "merged"), "adapter": None, "run_dir": str(run_dir)}
    ad = tmp_path / "ad"
    (ad / "adapter").mkdir(parents=True)
    (ad / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    assert resolve_model(str(ad)) == {"path": str(tiny_model_dir), "adapter": str(ad / "adapter"),
                                      "run_dir": str(ad)}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaetuneError, match="merged/, model/ or adapter/"):
        resolve_model(str(tmp_path / "empty"))


# ---------------------------------------------------------------- comparison and CLI

def test_compare_table(tmp_path, toy_tok):
    bench = _math_file(tmp_path, ["2", "3"])
    parent = tmp_path / "demo"
    for label, text in (("base", "no answer"), ("SAE-tuned", r"\boxed{2}")):
        run(EvalConfig(benchmarks=[str(bench)], samples=2, label=label, progress=False), parent / f"eval-{label}",
            backend=FakeBackend(toy_tok, text))
    df = compare([parent])
    assert list(df.index) == ["SAE-tuned", "base"]  # sub-dirs in name order
    assert df.loc["SAE-tuned", "mini"] == 50.0 and df.loc["base", "avg"] == 0.0 and df.loc["base", "n"] == "2x2"
    assert {"eval_s", "eval_usd", "model_s", "model_usd"} <= set(df.columns)
    assert compare([parent / "eval-base"], metric="pass@k:2").loc["base", "mini"] == 0.0
    text = format_table(df)
    assert text.splitlines()[0].startswith("| label") and "| SAE-tuned" in text and "50.00" in text
    with pytest.raises(SaetuneError, match="metric"):
        compare([parent], metric="best")
    with pytest.raises(SaetuneError, match="no eval/results.json"):
        compare([tmp_path / "nothing"])


def test_cli_eval_toy_end_to_end(tmp_path, capsys, one_thread):
    from saetune.cli import main
    with pytest.raises(SystemExit) as exit_info:  # every field's help text renders
        main(["eval", "--help"])
    assert exit_info.value.code == 0 and "--grade-workers" in capsys.readouterr().out
    out = tmp_path / "ev"
    assert main(["eval", "--out", str(out), "--toy-problems", "6", "--temperature", "0", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["toy"]["n"] == 6 and (out / "eval" / "results.json").exists()
    assert main(["eval", "--compare", str(out)]) == 0
    assert "| ev " in capsys.readouterr().out
    assert main(["eval", "--out", str(out), "--toy-problems", "6", "--no-progress"]) == 2
    assert "already holds" in capsys.readouterr().err


def test_read_samples_repairs_a_cut_tail_and_names_a_bad_line(tmp_path):
    p = tmp_path / "samples.jsonl"
    good = json.dumps({"benchmark": "b", "problem_index": 0, "sample_index": 0, "correct": True, "n_tokens": 3})
    p.write_text(good + "\n\n" + good[:20])
    assert len(read_samples(p)) == 1 and p.read_text() == good + "\n\n"
    assert read_samples(p, keys=["correct", "truncated"]) == [{"correct": True, "truncated": None}]
    p.write_text(good + "\n{broken\n" + good + "\n")
    with pytest.raises(SaetuneError, match="line 2 is not valid JSON"):
        read_samples(p)


def test_model_cost_follows_merge_back_to_tune(tmp_path, tiny_model_dir, toy_tok):
    import shutil
    tune, merge = tmp_path / "tune", tmp_path / "merge"
    (tune / "adapter").mkdir(parents=True)
    (tune / "manifest.json").write_text(json.dumps({"stage": "tune", "wall_seconds": 120.0, "gpu_hours": 0.5,
                                                    "estimated_cost_usd": 0.5}))
    shutil.copytree(tiny_model_dir, merge / "merged")
    (merge / "manifest.json").write_text(json.dumps({
        "stage": "merge", "wall_seconds": 3.0, "gpu_hours": 0.0, "estimated_cost_usd": 0.0,
        "inputs": {"adapter": {"path": str(tune / "adapter")}}}))
    bench = _math_file(tmp_path, ["2"])
    run(EvalConfig(model=str(merge), benchmarks=[str(bench)], label="SAE-tuned", progress=False), tmp_path / "ev",
        backend=FakeBackend(toy_tok))
    prov = json.loads((tmp_path / "ev" / "manifest.json").read_text())["model_run"]
    assert [st["stage"] for st in prov["stages"]] == ["merge", "tune"]
    assert prov["wall_seconds"] == 123.0 and prov["estimated_cost_usd"] == 0.5
    row = compare([tmp_path / "ev"]).loc["SAE-tuned"]
    assert row["model_s"] == 123.0 and row["model_usd"] == 0.5 and row["mini"] == 100.0


def test_eval_of_a_run_dir_holding_an_adapter(tmp_path, tiny_model_dir, one_thread):
    """A tune-style run dir with only adapter/: the base is loaded and the adapter merged in memory."""
    from peft import LoraConfig, get_peft_model

    from saetune.models import load_model
    model, _ = load_model(str(tiny_model_dir), device="cpu")
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "tune" / "adapter")
    cfg = EvalConfig(model=str(tmp_path / "tune"), benchmarks=["toy"], toy_problems=3, temperature=0,
                     progress=False)
    res = run(cfg, tmp_path / "ev")
    man = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert res["toy"]["n"] == 3 and set(man["inputs"]) >= {"model", "adapter"}
    assert man["inputs"]["adapter"]["path"] == "../tune/adapter"  # beside the eval run: relative, so both can move


def test_grading_in_worker_processes_matches_in_process(tmp_path, toy_tok):
    bench = _math_file(tmp_path, ["2", "\\frac{", "2.0", "3"])
    res = [run(EvalConfig(benchmarks=[str(bench)], samples=2, grade_workers=w, progress=False), tmp_path / f"ev{w}",
               backend=FakeBackend(toy_tok))["mini"] for w in (0, 2)]
    assert res[0]["pass@1"] == res[1]["pass@1"] == 0.5 and res[0]["unparsable_gold_problems"] == [1]
    assert res[1]["unparsable_gold_problems"] == [1]
