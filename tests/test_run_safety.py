"""Trust on a fresh machine: --overwrite never deletes what is not a saetune run of the same verb, a failed
check never blocks the corrected retry, outputs respect the umask, and run dirs work from any directory
and after their pipeline dir is moved."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from saetune.activations import CacheConfig, cache
from saetune.attach import MergeConfig, merge
from saetune.cli import main
from saetune.demo_pipeline import DemoConfig, demo
from saetune.errors import SaetuneError
from saetune.evaluate import EvalConfig, run as run_eval
from saetune.runs import RunDir, check_overwrite_parent, read_manifest, record_path, resolve_recorded
from saetune.sae_trainer import TrainSAEConfig, train_sae
from saetune.tuning import TuneConfig, tune

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "model.layers.1"
SAE_ARGS = ["--hooks", HOOK, "--d-sae", "256", "--k", "8", "--batch-size", "256", "--max-steps", "2",
            "--eval-seqs", "2", "--max-examples", "40", "--context-size", "32", "--no-progress", "--device", "cpu"]


def _cli(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _user_files(d: Path) -> dict[str, bytes]:
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "sub" / "data.bin").write_bytes(bytes(range(256)) * 4)
    return _snapshot(d)


def _cache_cfg(model) -> CacheConfig:
    return CacheConfig(model=str(model), hooks=[HOOK], dataset="toy", max_examples=60, context_size=32,
                       batch_size=8, seqs_per_shard=8, progress=False, device="cpu")


def _tune_cfg(model, sae, **kw) -> TuneConfig:
    return TuneConfig(**{**dict(model=str(model), sae=str(sae), dataset="toy", max_examples=40, context_size=32,
                                lora_r=4, lora_alpha=16, lr=5e-3, max_steps=2, eval_seqs=0, progress=False,
                                device="cpu"), **kw})


@pytest.fixture(scope="module")
def store(toy_store, tmp_path_factory) -> Path:
    """A private copy of the toy store (model 'toy', model.layers.2): tests here try to delete it."""
    d = tmp_path_factory.mktemp("store") / "cache"
    shutil.copytree(toy_store, d)
    return d


# ---- 4. --overwrite deletes only a run of the same verb --------------------------------------------------

def test_overwrite_refuses_a_dir_of_user_files(tmp_path, capsys):
    out = tmp_path / "mine"
    before = _user_files(out)
    rc, err = _cli(["cache", "--model", "toy", "--out", out, "--overwrite"], capsys)
    assert rc == 2 and "not a saetune run dir" in err and "'notes.txt'" in err and str(out) in err, err
    rc, err = _cli(["cache", "--model", "toy", "--out", out], capsys)  # without --overwrite: no hint to use it
    assert rc == 2 and "not a saetune run" in err and "choose another --out" in err, err
    assert _snapshot(out) == before


def test_overwrite_refuses_the_working_directory(tmp_path, monkeypatch, capsys):
    RunDir.open(tmp_path, "cache", CacheConfig()).finish()  # even a run dir of the same verb: it is the cwd
    (tmp_path / "notes.txt").write_text("keep")
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc, err = _cli(["cache", "--model", "toy", "--out", ".", "--overwrite"], capsys)
    assert rc == 2 and "the working directory" in err, err
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    rc, err = _cli(["cache", "--model", "toy", "--out", "..", "--overwrite"], capsys)
    assert rc == 2 and "a parent of the working directory" in err, err
    assert _snapshot(tmp_path) == before


STORE_ARGS = [*SAE_ARGS, "--hooks", "model.layers.2"]  # the toy store's hook


def test_overwrite_refuses_the_input_store_and_its_parent(store, tmp_path, capsys):
    before = _snapshot(store)
    rc, err = _cli(["train-sae", "--activations", store, *STORE_ARGS, "--out", store, "--overwrite"], capsys)
    assert rc == 2 and f"which is {str(store)!r}, an input of this run" in err, err
    parent = tmp_path / "p"
    RunDir.open(parent, "train-sae", TrainSAEConfig()).finish()  # a train-sae run dir that holds the input
    shutil.copytree(store, parent / "cache")
    rc, err = _cli(["train-sae", "--activations", parent / "cache", *STORE_ARGS, "--out", parent, "--overwrite"],
                   capsys)
    assert rc == 2 and "which holds" in err and "an input of this run" in err, err
    assert _snapshot(store) == before and (parent / "cache" / "activations" / "manifest.json").exists()


def test_overwrite_refuses_a_run_of_another_verb_and_replaces_its_own(store, tmp_path, capsys):
    before = _snapshot(store)
    other = tmp_path / "a-cache-run"
    shutil.copytree(store, other)
    rc, err = _cli(["train-sae", "--activations", store, *STORE_ARGS, "--out", other, "--overwrite"], capsys)
    assert rc == 2 and "holds a 'cache' run" in err and "replaces only a 'train-sae' run" in err, err
    assert _snapshot(other) == before
    out = tmp_path / "sae"
    args = ["train-sae", "--activations", store, *STORE_ARGS, "--out", out]
    assert _cli([*args, "--overwrite"], capsys)[0] == 0  # --overwrite of a dir that does not exist yet is fine
    (out / "stale.txt").write_text("from the first run")
    rc, err = _cli(args, capsys)
    assert rc == 2 and "--overwrite" in err
    rc, err = _cli([*args, "--overwrite"], capsys)
    assert rc == 0, err
    assert not (out / "stale.txt").exists() and read_manifest(out)["status"] == "complete"


def test_overwrite_of_a_demo_or_pipeline_dir_deletes_only_their_own(tmp_path, monkeypatch):
    from saetune.pipeline import run_pipeline
    d = tmp_path / "demo"
    (d / "eval" / "base").mkdir(parents=True)
    RunDir.open(d / "sae", "train-sae", TrainSAEConfig()).finish()
    RunDir.open(d / "eval" / "base", "eval", EvalConfig()).finish()
    (d / "config.yaml").write_text("seed: 0\n")
    (d / "summary.json").write_text("{}")
    (d / "cache").mkdir()  # a stage killed before its manifest
    check_overwrite_parent(d, "demo")  # all of it the demo's own: replaceable
    with pytest.raises(SaetuneError, match="holds a demo, not a pipeline's"):
        check_overwrite_parent(d, "pipeline")
    (d / "notes.txt").write_text("mine")
    before = _snapshot(d)
    with pytest.raises(SaetuneError, match=r"refuses to delete .*'notes\.txt', which no saetune demo wrote"):
        demo(DemoConfig(progress=False), d, overwrite=True)
    with pytest.raises(SaetuneError, match="'notes.txt', which no saetune pipeline wrote"):
        run_pipeline("resa_modularity", d, overwrite=True)
    monkeypatch.chdir(d)
    with pytest.raises(SaetuneError, match="the working directory"):
        demo(DemoConfig(progress=False), ".", overwrite=True)
    assert _snapshot(d) == before


# ---- 4. a failed check does not block the corrected retry ------------------------------------------------

def test_train_sae_retry_after_a_refused_config_needs_no_flag(store, tmp_path, capsys):
    out = tmp_path / "sae"
    rc, err = _cli(["train-sae", "--activations", store, *SAE_ARGS, "--out", out], capsys)  # hook not in the store
    assert rc == 2 and "no hook 'model.layers.1'" in err and not out.exists(), err  # refused before the dir
    args = ["train-sae", "--activations", store, *STORE_ARGS, "--out", out]
    rc, err = _cli([*args, "--batch-size", "10000000"], capsys)  # needs the store's size: after the dir is made
    assert rc == 2 and "no full batch" in err and read_manifest(out)["status"] == "failed", err
    rc, err = _cli(args, capsys)
    assert rc == 0, err
    assert read_manifest(out)["status"] == "complete" and (out / "sae").is_dir()


def test_tune_retry_after_a_refused_config_needs_no_flag(tiny_model_dir, tmp_path, capsys):
    from saetune.sae import SAE, SAEConfig
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=0).save(tmp_path / "sae")
    out = tmp_path / "tune"
    with pytest.raises(SaetuneError, match="fewer than one global batch"):  # known only once the data is packed
        tune(_tune_cfg(tiny_model_dir, tmp_path / "sae", batch_size=100000), out)
    assert read_manifest(out)["status"] == "failed"
    rc, err = _cli(["tune", "--model", tiny_model_dir, "--sae", tmp_path / "sae", "--dataset", "toy",
                    "--max-examples", "40", "--context-size", "32", "--lora-r", "4", "--max-steps", "2",
                    "--eval-seqs", "0", "--no-progress", "--device", "cpu", "--out", out], capsys)
    assert rc == 0, err
    assert read_manifest(out)["status"] == "complete" and (out / "adapter" / "adapter_config.json").exists()


def test_a_run_that_did_work_still_needs_a_flag(tmp_path):
    from saetune.runs import unworked_run
    run = RunDir.open(tmp_path / "r", "s", CacheConfig())
    run.log({"step": 1, "tokens": 8})
    run.fail("boom")
    assert not unworked_run(tmp_path / "r")
    with pytest.raises(SaetuneError, match="already holds a 's' run \\(status failed\\)"):
        RunDir.open(tmp_path / "r", "s", CacheConfig())
    RunDir.open(tmp_path / "q", "s", CacheConfig()).fail("refused")
    assert unworked_run(tmp_path / "q") and not unworked_run(tmp_path / "q", "other")
    with pytest.raises(SaetuneError, match="'s' run"):
        RunDir.open(tmp_path / "q", "other", CacheConfig())  # another verb's failed run is not replaced


# ---- 5. recorded paths -----------------------------------------------------------------------------------

def test_record_path_rules(tmp_path):
    (tmp_path / "p" / "model").mkdir(parents=True)
    (tmp_path / "p" / "toy-base" / "model").mkdir(parents=True)
    (tmp_path / "p" / "run").mkdir()
    (tmp_path / "outside").mkdir()
    run = tmp_path / "p" / "run"
    assert record_path(tmp_path / "p" / "model", run) == os.path.join("..", "model")
    assert record_path(tmp_path / "outside", run) == str((tmp_path / "outside").resolve())
    assert record_path("Qwen/Qwen2.5-1.5B", run) == "Qwen/Qwen2.5-1.5B" and record_path("toy", run) == "toy"
    assert record_path(tmp_path / "p" / "model", run / "adapter", scope=tmp_path / "p") == os.path.join("..", "..",
                                                                                                         "model")
    assert Path(resolve_recorded("../model", run)) == (tmp_path / "p" / "model").resolve()
    assert resolve_recorded("Qwen/Qwen2.5-1.5B", run) == "Qwen/Qwen2.5-1.5B" and resolve_recorded("toy", run) == "toy"
    # an older run recorded its cwd-relative path: found again below the moved pipeline dir
    found = resolve_recorded("runs/demo-old/toy-base/model", run)
    assert Path(found) == (tmp_path / "p" / "toy-base" / "model").resolve()
    assert resolve_recorded("../gone", run) == "../gone"  # named in the loader's error as recorded


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _small_pipeline(tiny_model_dir, parent: Path) -> None:
    """model → cache → train-sae → tune → merge, written with paths relative to the cwd as the demo does."""
    shutil.copytree(tiny_model_dir, parent / "toy-base" / "model")
    cache(_cache_cfg(parent / "toy-base" / "model"), parent / "cache")
    train_sae(TrainSAEConfig(activations=str(parent / "cache"), hooks=[HOOK], d_sae=[256], k=[8], batch_size=256,
                             max_steps=2, eval_seqs=2, max_examples=40, context_size=32, progress=False,
                             device="cpu"), parent / "sae")
    tune(_tune_cfg(parent / "toy-base" / "model", parent / "sae"), parent / "tune")
    merge(MergeConfig(adapter=str(parent / "tune")), parent / "merge")


def test_outputs_respect_the_umask_and_run_dirs_work_from_anywhere(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                   umask_022):
    monkeypatch.chdir(tmp_path)
    _small_pipeline(tiny_model_dir, Path("runs/demo-a"))
    a = tmp_path / "runs" / "demo-a"
    for f in (a / "cache" / "manifest.json", a / "cache" / "config.yaml", a / "cache" / "activations" / "manifest.json",
              a / "sae" / "metrics.jsonl", a / "sae" / "sae" / "sae_weights.safetensors", a / "tune" / "config.yaml",
              a / "merge" / "merged" / "model.safetensors", a / "merge" / "merged" / "README.md"):
        assert _mode(f) == 0o644, (f, oct(_mode(f)))

    # paths inside the pipeline dir are recorded relative to the recording dir; hub ids and 'toy' as given
    assert json.loads((a / "cache" / "activations" / "manifest.json").read_text())["model"] == "../../toy-base/model"
    base = json.loads((a / "tune" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "../../toy-base/model"
    assert read_manifest(a / "tune")["inputs"]["sae"]["path"] == "../sae"
    assert read_manifest(a / "sae")["inputs"]["model"]["path"] == "../toy-base/model"
    assert "`../../toy-base/model`" in (a / "merge" / "merged" / "README.md").read_text()

    def use_from_elsewhere(parent: Path, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(where)
        rc, err = _cli(["train-sae", "--activations", parent / "cache", *SAE_ARGS, "--out", "sae2"], capsys)
        assert rc == 0, err
        assert json.loads((where / "sae2" / "results.json").read_text())[HOOK]["ce_clean"] > 0  # the model was found
        rc, err = _cli(["merge", "--adapter", parent / "tune", "--out", "merge2"], capsys)
        assert rc == 0, err
        ev = run_eval(EvalConfig(model=str(parent / "tune"), benchmarks=["toy"], toy_problems=2, temperature=0,
                                 max_new_tokens=4, progress=False), where / "eval2")
        assert ev["toy"]["n"] == 2
        m = read_manifest(where / "eval2")
        assert Path(m["inputs"]["model"]["path"]) == (parent / "toy-base" / "model").resolve()

    use_from_elsewhere(a, tmp_path / "elsewhere")
    moved = tmp_path / "archive" / "moved-demo"
    moved.parent.mkdir()
    shutil.move(str(a), str(moved))
    use_from_elsewhere(moved, tmp_path / "other")


def test_train_sae_refuses_a_store_whose_model_is_gone_before_training(tiny_model_dir, tmp_path, capsys):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cache(_cache_cfg(tmp_path / "m"), tmp_path / "cache")
    shutil.rmtree(tmp_path / "m")
    out = tmp_path / "sae"
    rc, err = _cli(["train-sae", "--activations", tmp_path / "cache", *SAE_ARGS, "--out", out], capsys)
    assert rc == 2 and "was made from model '../../m'" in err and "--eval-seqs 0" in err, err
    assert not out.exists()  # refused before the run dir, not after training
