"""Bad input found by new users: each is a sentence naming the bad value (or file) and what would be valid,
reported by the CLI without a traceback, or a warning where the run is still meaningful."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from saetune.cli import main
from saetune.config import dump_yaml
from saetune.errors import SaetuneError
from saetune.sae import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exits (--help)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "\nsaetune: error: " in "\n" + err and "Traceback" not in err, err  # (after library log lines)
    for n in needles:
        assert n in err, (n, err)


def fake_run(d: Path, stage: str, cfg) -> Path:
    """A run dir as `saetune <stage>` leaves it: manifest and config (no artifacts needed to be refused)."""
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "status": "failed"}))
    (d / "config.yaml").write_text(dump_yaml(cfg))
    return d


# ---- 1. --resume of another verb's run dir ----------------------------------------------------------------

def test_resume_of_another_verbs_run_names_that_verb(tmp_path, capsys):
    from saetune.activations import CacheConfig
    from saetune.toy.build import ToyBuildConfig
    cache_run = fake_run(tmp_path / "cache-run", "cache", CacheConfig())
    rc, _, err = run_main(["train-sae", "--resume", cache_run], capsys)
    assert_user_error(rc, err, "'cache' run", f"saetune cache --resume {cache_run}")
    assert "unknown key" not in err
    toy_run = fake_run(tmp_path / "toy-run", "toy", ToyBuildConfig())
    rc, _, err = run_main(["tune", "--resume", toy_run], capsys)
    assert_user_error(rc, err, "'toy' run", f"saetune toy build --resume {toy_run}")
    rc, _, err = run_main(["demo", "--resume", cache_run], capsys)  # a single run is no demo
    assert_user_error(rc, err, "'cache' run", "saetune cache --resume")


def test_resume_of_a_demo_parent_dir_names_the_demo(tmp_path, capsys):
    from saetune.activations import CacheConfig
    from saetune.demo_pipeline import DemoConfig
    parent = tmp_path / "demo"
    fake_run(parent / "cache", "cache", CacheConfig())
    (parent / "config.yaml").write_text(dump_yaml(DemoConfig()))
    rc, _, err = run_main(["train-sae", "--resume", parent], capsys)
    assert_user_error(rc, err, "holds a demo", f"saetune demo --resume {parent}")


# ---- 2. bytes that are not UTF-8 ---------------------------------------------------------------------------

def test_non_utf8_config_file_names_file_line_and_offset(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"context_size: 32\ndataset: caf\xe9\n")  # Latin-1 'é'
    rc, _, err = run_main(["cache", "--config", bad, "--out", tmp_path / "o"], capsys)
    assert_user_error(rc, err, str(bad), "not valid UTF-8", "line 2", "byte offset 29", "0xe9")
    assert not (tmp_path / "o").exists()


def test_non_utf8_dataset_and_benchmark_name_file_line_and_offset(tmp_path):
    from saetune.benchmarks import load_benchmark
    from saetune.data import read_records
    good = json.dumps({"problem": "1 + 1", "answer": "2"}) + "\n"
    f = tmp_path / "data.jsonl"
    f.write_bytes(good.encode() * 2 + b'{"problem": "\xff", "answer": "3"}\n')
    offset = 2 * len(good.encode()) + len(b'{"problem": "')
    with pytest.raises(SaetuneError, match=rf"dataset file .*data\.jsonl.* UTF-8: byte 0xff at line 3 \(byte offset "
                                           rf"{offset} "):
        read_records(str(f))
    with pytest.raises(SaetuneError, match=rf"benchmark file .*data\.jsonl.* line 3 \(byte offset {offset} "):
        load_benchmark(str(f))
    j = tmp_path / "data.json"
    j.write_bytes(b'[{"problem": "x",\n "answer": "\xc3("}]')  # a broken two-byte sequence
    with pytest.raises(SaetuneError, match=r"data\.json.* line 2 \(byte offset 30 "):
        read_records(str(j))


# ---- 3. a null (or empty) field ----------------------------------------------------------------------------

def test_null_problem_is_called_null_with_file_and_line(tmp_path):
    from saetune.benchmarks import load_benchmark
    from saetune.data import DataConfig, read_records, record_texts
    f = tmp_path / "bench.jsonl"
    f.write_text(json.dumps({"problem": "1 + 1", "answer": "2"}) + "\n\n" + json.dumps({"problem": None, "answer": "3"})
                 + "\n")
    with pytest.raises(SaetuneError, match=r"bench\.jsonl' line 3: field 'problem' is null") as e:
        load_benchmark(str(f))
    assert "has no field" not in str(e.value)
    cfg = DataConfig(dataset=str(f), template="resa")
    with pytest.raises(SaetuneError, match=r"bench\.jsonl'.*record 1 \(line 3 of the file\) field 'problem' is null"):
        record_texts(read_records(str(f)), cfg)  # was rendered as the text "None"
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"problem": "1 + 1", "answer": "2"}) + "\n" + json.dumps({"problem": " ", "answer": "4"})
                     + "\n")
    with pytest.raises(SaetuneError, match=r"empty\.jsonl' line 2: field 'problem' is empty"):
        load_benchmark(str(empty))


# ---- 4. prompts longer than the model's context ------------------------------------------------------------

LONG = "3 + 4 = " * 80  # 320 toy tokens; the toy model has 256 positions
NEAR = "3 + 4 = " * 62  # 248 tokens: 8 positions left


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sae") / "sae"
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=0).save(d)
    return d


def test_attach_refuses_a_prompt_longer_than_the_context(sae_dir, tmp_path, capsys):
    rc, _, err = run_main(["attach", "--model", "toy", "--sae", sae_dir, "--prompts", "3 + 4 =", LONG,
                           "--max-new-tokens", "4", "--out", tmp_path / "run"], capsys)
    assert_user_error(rc, err, "prompt 1 is 320 tokens long", "256 positions")


def test_attach_caps_new_tokens_at_the_context_with_a_warning(sae_dir, tmp_path):
    from saetune.attach import AttachConfig, attach
    with pytest.warns(UserWarning, match=r"prompt 0 is 248 tokens long.*256 positions.*at most 8 new tokens"):
        attach(AttachConfig(model="toy", sae=str(sae_dir), prompts=[NEAR], max_new_tokens=20), tmp_path / "run")
    row = json.loads((tmp_path / "run" / "features.jsonl").read_text())
    assert len(row["features"]) <= 256  # one recorded position per token: never past the context


def test_hf_generation_names_the_prompt_past_the_context_and_warns_on_the_cap(toy_base):
    from saetune.generation import HFBackend, SamplingParams
    model, tok = toy_base
    backend = HFBackend(model, tok, batch_size=2, template="raw")
    with pytest.raises(SaetuneError, match=r"prompt 3 is 320 tokens long.*256 positions"):
        backend.generate(["1 + 1 =", "2 + 2 =", "3 + 3 =", LONG], SamplingParams(temperature=0, max_new_tokens=4),
                         [0, 0, 0, 0])
    with pytest.warns(UserWarning, match=r"prompt 0 is 248 tokens long.*generates at most 8 new tokens"):
        out = backend.generate([NEAR], SamplingParams(temperature=0, max_new_tokens=50), [0])
    assert out[0].n_tokens <= 8


# ---- 5. tune's numeric settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(lr=0.0), dict(lr=float("nan")), dict(max_steps=-1),
                                 dict(warmup_steps=-5), dict(weight_decay=-0.1), dict(grad_clip=-1.0),
                                 dict(lora_dropout=1.5), dict(eval_seqs=-1), dict(log_every=0),
                                 dict(checkpoint_every=-1), dict(context_size=1)])
def test_tune_config_refuses_out_of_range_numbers(bad):
    from saetune.tuning import TuneConfig
    (name, value), = bad.items()
    with pytest.raises(SaetuneError, match=rf"^{name} must .*got {value}"):
        TuneConfig(loss="ce", **bad)


def test_tune_negative_lr_is_a_user_error_on_the_cli(tmp_path, capsys):
    rc, _, err = run_main(["tune", "--loss", "ce", "--lr", "-1", "--out", tmp_path / "run"], capsys)
    assert_user_error(rc, err, "lr must be a positive number", "got -1.0")
    assert not (tmp_path / "run").exists()


# ---- 6. an SAE used at another hook than it was trained at -------------------------------------------------

def test_tune_warns_when_the_hook_differs_from_the_saes(sae_dir):
    from saetune.tuning import SAETuner, TuneConfig
    cfg = dict(model="toy", sae=str(sae_dir), progress=False)
    with pytest.warns(UserWarning, match=r"trained at hook 'model\.layers\.2' but is used at 'model\.layers\.1'"):
        SAETuner(TuneConfig(hook="model.layers.1", **cfg), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same hook in another spelling: no warning
        SAETuner(TuneConfig(hook="blocks.2.hook_resid_post", **cfg), "cpu")


# ---- 7. train-sae's total_tokens beyond one pass -----------------------------------------------------------

@pytest.fixture(scope="module")
def small_store(tiny_model_dir, tmp_path_factory) -> Path:
    from saetune.activations import CacheConfig, cache
    d = tmp_path_factory.mktemp("store") / "cache"
    cache(CacheConfig(model=str(tiny_model_dir), hooks=["model.layers.1"], dataset="toy", max_examples=20,
                      context_size=32, batch_size=4, seqs_per_shard=4, progress=False, device="cpu"), d)
    return d


def test_total_tokens_past_one_pass_warns_with_both_numbers(small_store, tiny_model_dir, tmp_path):
    from saetune.activations import ActivationStore
    from saetune.sae_trainer import TrainSAEConfig, train_sae
    one_pass = ActivationStore(small_store).n_batches(64) * 64
    cfg = TrainSAEConfig(model=str(tiny_model_dir), activations=str(small_store), hooks=["model.layers.1"],
                         d_sae=[64], k=[4], batch_size=64, total_tokens=10**9, eval_seqs=0, progress=False,
                         device="cpu")
    with pytest.warns(UserWarning, match=rf"total_tokens 1,000,000,000 .*one pass is {one_pass:,} tokens"):
        res = train_sae(cfg, tmp_path / "run")
    assert res["model.layers.1"]["train_tokens"] == one_pass


# ---- 8. an output dir that cannot be written ---------------------------------------------------------------

def test_train_sae_refuses_an_unwritable_out_before_writing(small_store, tiny_model_dir, tmp_path, monkeypatch):
    from saetune.sae_trainer import TrainSAEConfig, train_sae
    cfg = TrainSAEConfig(model=str(tiny_model_dir), activations=str(small_store), hooks=["model.layers.1"],
                         d_sae=[64], k=[4], batch_size=64, eval_seqs=0, progress=False, device="cpu")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SaetuneError, match=r"a-file' is a file, not a directory; choose another --out"):
        train_sae(cfg, tmp_path / "a-file" / "run")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: report what any other user would see
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    try:
        with pytest.raises(SaetuneError, match=r"output dir .*ro/run' is not writable: .*ro', where it would be "
                                               r"created, is read-only"):
            train_sae(cfg, ro / "run")
        with pytest.raises(SaetuneError, match=r"output dir .*ro' is not writable: it is read-only"):
            train_sae(cfg, ro)
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


# ---- 9. the top-level help -----------------------------------------------------------------------------------

def test_help_describes_the_demo_as_it_runs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal width (and breaks 'RL-trained')
    rc, out, _ = run_main(["--help"], capsys)
    assert rc == 0
    demo = " ".join(out.split("\n    demo", 1)[1].split("\n    toy ")[0].split())
    assert "toy model → activations → SAE" not in out
    for step in ("RL-trained source", "SAE-Tuning of the base", "merge", "controls", "feature data"):
        assert step in demo, (step, demo)
