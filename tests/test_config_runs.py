"""Config loading (YAML, flag overrides, checks) and run directories (refusal, resume, lock, atomicity)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from saetune import config as C
from saetune.activations import CacheConfig
from saetune.errors import SaetuneError
from saetune.io import atomic_write, atomic_write_json, atomic_write_text
from saetune.runs import LOCK, RunDir, read_manifest, read_metrics


@dataclass
class ToyCfg:
    """A config with one field of every kind the loader handles."""

    name: str = C.opt("base", "a name")
    steps: int = C.opt(10, "how many steps")
    lr: float = C.opt(1e-3, "learning rate")
    flag: bool = C.opt(False, "a switch")
    mode: Literal["fast", "slow"] = C.opt("fast", "speed")
    layers: list[int] = C.opt(None, "layer indices", factory=lambda: [1, 2])
    hooks: list[str] = C.opt(None, "hook names", factory=lambda: ["model.layers.0"])
    limit: Optional[int] = C.opt(None, "an optional cap")


@dataclass
class NeedsCfg:
    required: int = C.opt(help="no default")


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---- config loading ---------------------------------------------------------------------------

def test_yaml_then_overrides(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"context_size": 48, "batch_size": 3, "hooks": ["model.layers.1"],
                                         "template": "resa", "dtype": "float32"})
    cfg = C.load_config(CacheConfig, p, {"batch_size": "7", "progress": "false"})
    assert cfg.context_size == 48
    assert cfg.batch_size == 7  # the flag wins over the YAML
    assert cfg.progress is False
    assert cfg.hooks == ["model.layers.1"]
    assert cfg.template == "resa"
    assert cfg.dtype == "float32"
    assert cfg.seqs_per_shard == 64  # untouched default


def test_no_file_gives_defaults_and_hyphenated_keys_work():
    cfg = C.load_config(ToyCfg, None, {"steps": "1e3"})
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    cfg = C.from_dict(ToyCfg, {"name": "x"})
    assert cfg == ToyCfg(name="x")
    cfg = C.from_dict(CacheConfig, {"context-size": 40, "seqs-per-shard": "3"})
    assert cfg.context_size == 40 and cfg.seqs_per_shard == 3


def test_unknown_key_names_key_and_lists_valid_keys(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"context_size": 32, "contxt_size": 64})
    with pytest.raises(SaetuneError) as e:
        C.load_config(CacheConfig, p)
    msg = str(e.value)
    assert "'contxt_size'" in msg
    assert str(p) in msg
    assert "valid keys" in msg
    for key in ("context_size", "hooks", "seqs_per_shard", "model", "dataset"):
        assert key in msg


def test_unknown_override_key_is_refused():
    with pytest.raises(SaetuneError, match="unknown key 'bogus'.*valid keys: flag, hooks, layers, limit, lr"):
        C.load_config(ToyCfg, None, {"bogus": 1})


@pytest.mark.parametrize("key,value,expected", [
    ("steps", "lots", "int"),
    ("steps", 2.5, "int"),
    ("steps", True, "int"),
    ("lr", "fast", "float"),
    ("lr", [1.0], "float"),
    ("flag", "maybe", "bool"),
    ("flag", 3, "bool"),
    ("name", {"a": 1}, "str"),
    ("layers", ["x"], "expected int"),
    ("steps", None, "int"),
])
def test_ill_typed_value_names_key_value_and_type(key, value, expected):
    with pytest.raises(SaetuneError) as e:
        C.from_dict(ToyCfg, {key: value})
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert expected in msg
    if value is not None:
        shown = repr(value[0]) if isinstance(value, list) and key == "layers" else repr(value)
        assert shown in msg


def test_ill_typed_value_from_yaml_file(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", {"batch_size": "sixteen"})
    with pytest.raises(SaetuneError, match=r"'batch_size' has value 'sixteen', expected int"):
        C.load_config(CacheConfig, p)


@pytest.mark.parametrize("text,value", [("true", True), ("yes", True), ("1", True), ("off", False),
                                        ("False", False), (True, True)])
def test_bool_spellings(text, value):
    assert C.from_dict(ToyCfg, {"flag": text}).flag is value


def test_literal_choices():
    assert C.from_dict(ToyCfg, {"mode": "slow"}).mode == "slow"
    with pytest.raises(SaetuneError) as e:
        C.from_dict(ToyCfg, {"mode": "medium"})
    msg = str(e.value)
    assert "'mode'" in msg and "'medium'" in msg and "'fast'" in msg and "'slow'" in msg
    with pytest.raises(SaetuneError, match="'auto', 'resa', 'chat', 'plain'"):
        C.from_dict(CacheConfig, {"template": "jinja"})


def test_list_parsing():
    assert C.from_dict(ToyCfg, {"layers": "3,4 5"}).layers == [3, 4, 5]
    assert C.from_dict(ToyCfg, {"layers": ["6", 7]}).layers == [6, 7]
    assert C.from_dict(ToyCfg, {"layers": 9}).layers == [9]
    assert C.from_dict(ToyCfg, {"hooks": "model.layers.1, model.layers.2"}).hooks == ["model.layers.1",
                                                                                    "model.layers.2"]
    # a flag with nargs="+" arrives as a list of strings
    assert C.from_dict(ToyCfg, {"hooks": ["blocks.1.hook_resid_post"]}).hooks == ["blocks.1.hook_resid_post"]


def test_optional_accepts_null_spellings():
    assert C.from_dict(ToyCfg, {"limit": "none"}).limit is None
    assert C.from_dict(ToyCfg, {"limit": None}).limit is None
    assert C.from_dict(ToyCfg, {"limit": "12"}).limit == 12


def test_missing_required_field_is_a_saetune_error():
    with pytest.raises(SaetuneError, match="required"):
        C.from_dict(NeedsCfg, {})


def test_cross_field_check_in_post_init():
    with pytest.raises(SaetuneError, match="at least one hook"):
        C.from_dict(CacheConfig, {"hooks": []})
    with pytest.raises(SaetuneError, match="'int8'.*bfloat16"):
        C.from_dict(CacheConfig, {"dtype": "int8"})


def test_yaml_file_errors(tmp_path):
    with pytest.raises(SaetuneError, match="does not exist|neither a file nor a shipped recipe"):
        C.load_config(ToyCfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(SaetuneError, match="not valid YAML"):
        C.read_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(SaetuneError, match="mapping"):
        C.read_yaml(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert C.load_config(ToyCfg, empty) == ToyCfg()


def test_unknown_recipe_lists_recipes():
    with pytest.raises(SaetuneError, match="neither a file nor a shipped recipe; recipes:"):
        C.resolve_recipe("no_such_recipe_xyz")


def test_dump_yaml_round_trips(tmp_path):
    cfg = C.from_dict(ToyCfg, {"name": "n", "steps": 3, "lr": 0.5, "flag": True, "mode": "slow",
                               "layers": [4], "limit": 2})
    p = tmp_path / "c.yaml"
    p.write_text(C.dump_yaml(cfg))
    assert C.load_config(ToyCfg, p) == cfg
    cc = CacheConfig(hooks=["model.layers.1", "model.layers.3"], context_size=40)
    p.write_text(C.dump_yaml(cc))
    assert C.load_config(CacheConfig, p) == cc


def test_add_arguments_and_overrides_only_given_flags():
    parser = argparse.ArgumentParser()
    C.add_arguments(parser, ToyCfg)
    args = parser.parse_args(["--steps", "5", "--flag", "--layers", "1", "2"])
    assert C.overrides_from_args(args, ToyCfg) == {"steps": "5", "flag": True, "layers": ["1", "2"]}
    cfg = C.from_dict(ToyCfg, C.overrides_from_args(args, ToyCfg))
    assert cfg.steps == 5 and cfg.flag is True and cfg.layers == [1, 2]
    args = parser.parse_args(["--no-flag"])
    assert C.overrides_from_args(args, ToyCfg) == {"flag": False}
    help_text = parser.format_help()
    assert "learning rate" in help_text and "[int; default: 10]" in help_text


def test_diff_configs():
    assert C.diff_configs({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b", "c"]
    assert C.diff_configs({"a": 1, "b": 2}, {"a": 1, "b": 3}, ignore=("b",)) == []


# ---- run dirs ---------------------------------------------------------------------------------

def no_temp_files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


def test_new_run_dir_layout(tmp_path):
    out = tmp_path / "run"
    cfg = ToyCfg(steps=4)
    run = RunDir.open(out, "stage", cfg, seed=3)
    assert (out / "config.yaml").exists()
    assert C.load_config(ToyCfg, out / "config.yaml") == cfg
    m = read_manifest(out)
    assert m["status"] == "running" and m["stage"] == "stage" and m["seed"] == 3
    assert "torch" in m["versions"] and "transformers" in m["versions"]
    assert (out / LOCK).read_text() == str(os.getpid())
    run.finish()
    m = read_manifest(out)
    assert m["status"] == "complete"
    assert m["end_time"] is not None and "wall_seconds" in m and "estimated_cost_usd" in m
    assert not (out / LOCK).exists()


def test_status_running_then_complete_and_phases_add_up(tmp_path):
    out = tmp_path / "run"
    run = RunDir.open(out, "s", ToyCfg())
    with run.phase("work"):
        pass
    assert read_manifest(out)["status"] == "running"
    assert "work" in read_manifest(out)["phases"]
    (out / "thing.txt").write_text("artifact")
    digest = run.add_artifact("thing", "thing.txt")
    assert read_manifest(out)["artifacts"]["thing"]["sha256"] == digest
    assert read_manifest(out)["status"] == "running"  # not complete before finish
    run.finish()
    assert read_manifest(out)["status"] == "complete"


def test_fail_marks_failed(tmp_path):
    run = RunDir.open(tmp_path / "run", "s", ToyCfg())
    run.fail("boom")
    m = read_manifest(tmp_path / "run")
    assert m["status"] == "failed" and m["error"] == "boom"


def test_existing_run_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    RunDir.open(out, "s", ToyCfg()).finish()
    with pytest.raises(SaetuneError) as e:
        RunDir.open(out, "s", ToyCfg())
    msg = str(e.value)
    assert "--resume" in msg and "--overwrite" in msg and str(out) in msg
    assert "'s' run (status complete)" in msg


def test_existing_non_run_dir_is_refused_but_empty_dir_is_fine(tmp_path):
    out = tmp_path / "stuff"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SaetuneError, match="--overwrite"):
        RunDir.open(out, "s", ToyCfg())
    assert (out / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    RunDir.open(empty, "s", ToyCfg()).finish()
    assert read_manifest(empty)["status"] == "complete"


def test_out_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(SaetuneError, match="not a directory"):
        RunDir.open(f, "s", ToyCfg())
    assert f.read_text() == "x"


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "run"
    run = RunDir.open(out, "s", ToyCfg(steps=1))
    run.log({"step": 1, "tokens": 10})
    (out / "old_artifact").write_text("old")
    run.finish()
    run = RunDir.open(out, "s", ToyCfg(steps=2), overwrite=True)
    assert not (out / "old_artifact").exists()
    assert read_metrics(out) == []
    assert C.load_config(ToyCfg, out / "config.yaml").steps == 2
    assert read_manifest(out)["status"] == "running"
    run.finish()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(SaetuneError, match="contradict"):
        RunDir.open(tmp_path / "run", "s", ToyCfg(), resume=True, overwrite=True)


def test_resume_with_changed_config_names_keys(tmp_path):
    out = tmp_path / "run"
    RunDir.open(out, "s", ToyCfg(steps=1, lr=0.1)).fail("killed")
    with pytest.raises(SaetuneError) as e:
        RunDir.open(out, "s", ToyCfg(steps=2, lr=0.1, mode="slow"), resume=True)
    msg = str(e.value)
    assert "steps: 1 -> 2" in msg and "mode: 'fast' -> 'slow'" in msg
    assert "lr" not in msg.split("(", 1)[1]  # unchanged keys are not listed
    # keys in resume_ignore may change
    run = RunDir.open(out, "s", ToyCfg(steps=2, lr=0.1), resume=True, resume_ignore=("steps",))
    run.finish()


def test_resume_same_config(tmp_path):
    out = tmp_path / "run"
    RunDir.open(out, "s", ToyCfg(steps=5)).fail("killed")
    run = RunDir.open(out, "s", ToyCfg(steps=5), resume=True)
    m = read_manifest(out)
    assert m["status"] == "running" and len(m["resumed_at"]) == 1
    run.finish()
    assert read_manifest(out)["status"] == "complete"


def test_resume_needs_a_run_of_the_same_stage(tmp_path):
    with pytest.raises(SaetuneError, match="holds no run"):
        RunDir.open(tmp_path / "nothing", "s", ToyCfg(), resume=True)
    RunDir.open(tmp_path / "run", "cache", ToyCfg()).finish()
    with pytest.raises(SaetuneError, match="'cache' run"):
        RunDir.open(tmp_path / "run", "train-sae", ToyCfg(), resume=True)


def test_atomic_writes_leave_no_temp_files(tmp_path):
    out = tmp_path / "run"
    run = RunDir.open(out, "s", ToyCfg())
    for i in range(5):
        with run.phase(f"p{i}"):
            run.log({"step": i, "tokens": i * 10})
    (out / "a").mkdir()
    (out / "a" / "w.bin").write_bytes(b"123")
    run.add_artifact("a", "a")
    run.add_input("cfg", out / "config.yaml")
    run.finish()
    assert no_temp_files(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["a", "config.yaml", "manifest.json", "metrics.jsonl"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"v": 1})

    def bad_write(p: Path) -> None:
        p.write_text('{"v": 2, "half')
        raise RuntimeError("disk died")

    with pytest.raises(RuntimeError):
        atomic_write(target, bad_write)
    assert json.loads(target.read_text()) == {"v": 1}
    assert no_temp_files(tmp_path) == []
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert no_temp_files(tmp_path) == []


def test_metrics_truncation_on_resume(tmp_path):
    out = tmp_path / "run"
    run = RunDir.open(out, "s", ToyCfg())
    for step in range(1, 11):
        run.log({"step": step, "tokens": step * 100, "loss": 1.0 / step})
    run._metrics_file.close()
    run._metrics_file = None
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "tok')  # a row cut by a kill
    run.fail("killed")
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))

    run = RunDir.open(out, "s", ToyCfg(), resume=True)
    run.truncate_metrics(6)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    for step in range(7, 9):
        run.log({"step": step, "tokens": step * 100})
    run.finish()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all("tokens" in r for r in rows)
    assert (out / "metrics.jsonl").read_text().count("\n") == 8


def test_log_needs_step_and_tokens(tmp_path):
    run = RunDir.open(tmp_path / "run", "s", ToyCfg())
    with pytest.raises(ValueError, match="step"):
        run.log({"loss": 1.0})
    run.finish()


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "600"])  # alive for the whole test however slow the machine; killed after
    yield proc.pid
    proc.kill()
    proc.wait()


def test_lock_refuses_a_second_live_process(tmp_path, live_pid):
    out = tmp_path / "run"
    RunDir.open(out, "s", ToyCfg()).fail("killed")
    (out / LOCK).write_text(str(live_pid))
    with pytest.raises(SaetuneError, match=f"in use by process {live_pid}"):
        RunDir.open(out, "s", ToyCfg(), resume=True)
    with pytest.raises(SaetuneError, match=f"in use by process {live_pid}"):
        RunDir.open(out, "s", ToyCfg(), overwrite=True)
    assert (out / "manifest.json").exists()  # nothing was removed


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()  # reaped: the pid is dead now
    out = tmp_path / "run"
    RunDir.open(out, "s", ToyCfg()).fail("killed")
    (out / LOCK).write_text(str(proc.pid))
    run = RunDir.open(out, "s", ToyCfg(), resume=True)
    assert (out / LOCK).read_text() == str(os.getpid())
    run.finish()
    assert not (out / LOCK).exists()


def test_read_manifest_of_a_non_run_dir(tmp_path):
    with pytest.raises(SaetuneError, match="not a saetune run dir"):
        read_manifest(tmp_path)
