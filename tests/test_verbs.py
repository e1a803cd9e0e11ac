"""One verb registry (saetune.verbs): the command line, the pipeline's stage table and the lazy top-level exports
are all built from it, so each is checked against it here."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect

import pytest

import saetune
from saetune import cli, pipeline
from saetune.errors import SaetuneError
from saetune.verbs import BY_NAME, GROUPS, VERBS, command


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _verb_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    p = parser
    for word in name.split():
        p = _subparsers(p)[word]
    return p


def test_the_parser_has_exactly_the_registered_verbs_in_order(parser):
    top = []
    for v in VERBS:
        word = v.name.split()[0]
        if word not in top:
            top.append(word)
    assert list(_subparsers(parser)) == top
    for group in GROUPS:
        actions = [v.name.split(" ", 1)[1] for v in VERBS if v.name.startswith(group + " ")]
        assert list(_subparsers(_subparsers(parser)[group])) == actions
    assert len(BY_NAME) == len(VERBS)  # names are unique


@pytest.mark.parametrize("verb", [v.name for v in VERBS])
def test_every_verb_parses_help_and_runs_its_handler(parser, verb, capsys):
    v = BY_NAME[verb]
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*verb.split(), "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: saetune {verb} ")
    p = _verb_parser(parser, verb)
    fn = p.get_default("fn")
    if v.cli:
        assert fn is getattr(cli, v.cli)
    else:  # the generic runner of module.function
        assert fn.__qualname__ == "_stage.<locals>.cmd"
    mod = importlib.import_module(v.module)
    assert callable(getattr(mod, v.function)), (v.module, v.function)
    if v.config:
        cls = getattr(mod, v.config)
        assert dataclasses.is_dataclass(cls)
        assert p.get_default("cls") is cls and p.get_default("stage") == v.stage_name
        assert "--config YAML" in out and "--resume RUN_DIR" in out
    else:
        assert v.arguments and v.description and v.description.split()[0] in out
    if v.arguments:
        assert callable(getattr(cli, v.arguments))


def test_the_pipeline_table_is_the_pipeline_capable_verbs():
    assert {"rl", "features", "cache", "train-sae", "eval-sae", "tune", "merge", "attach", "eval"} == set(
        pipeline.VERBS)
    for name in pipeline.VERBS:
        cls, fn = pipeline.verb_api(name)
        assert dataclasses.is_dataclass(cls)
        params = inspect.signature(fn).parameters
        assert list(params)[:2] == ["cfg", "out"] and {"resume", "overwrite"} <= set(params), name
    with pytest.raises(SaetuneError, match=r"unknown pipeline verb 'demo'; valid: cache, train-sae, .*rl"):
        pipeline.verb_api("demo")


def test_rl_and_features_are_pipeline_stages(tmp_path):
    recipe = tmp_path / "p.yaml"
    recipe.write_text("stages:\n  - {name: policy, verb: rl, set: {model: toy}}\n"
                      "  - {name: feats, verb: features, set: {sae: '{policy}'}}\n")
    _, stages = pipeline.load_pipeline(recipe, tmp_path / "out")
    assert [type(s.cfg).__name__ for s in stages] == ["RLConfig", "FeaturesConfig"]
    assert stages[1].cfg.sae == str(tmp_path / "out" / "policy")


def test_lazy_exports_come_from_the_registry():
    for v in VERBS:
        for name in v.exports:
            assert saetune._LAZY[name] == (v.module, name)
            assert getattr(saetune, name) is getattr(importlib.import_module(v.module), name)
            assert name in saetune.__all__
    from saetune.merging import MergeConfig, merge
    assert saetune.merge is merge and BY_NAME["merge"].module == "saetune.merging"
    assert pipeline.verb_api("merge") == (MergeConfig, merge)


def test_command_names_the_verb_of_a_stage():
    assert command("toy") == "saetune toy build"
    assert command("train-sae") == "saetune train-sae"
    assert command("pipeline") == "saetune pipeline"
    assert command("unheard-of") == "saetune unheard-of"


def test_run_steps_keeps_complete_resumes_partial_and_starts_missing(tmp_path, capsys):
    """The stage runner the pipeline and the demo share: what each step was asked, what it said, what it timed."""
    import json
    calls = []

    def step(status):
        def run(path, partial):
            calls.append((path.name, partial))
            path.mkdir(parents=True, exist_ok=True)
            (path / "manifest.json").write_text(json.dumps({"status": status}))
        return run

    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "manifest.json").write_text(json.dumps({"status": "complete"}))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"status": "running"}))
    steps = [pipeline.Step("done", "x", step("complete")), pipeline.Step("half", "resuming", step("complete")),
             pipeline.Step("new", "starting", step("complete"))]
    seconds = pipeline.run_steps(tmp_path, steps)
    assert calls == [("half", True), ("new", False)] and list(seconds) == ["half", "new"]
    said = capsys.readouterr().out.splitlines()
    assert said[0] == "[done] already complete, kept" and said[1] == "[half] resuming …" and said[3] == "[new] starting …"
    calls.clear()
    again = pipeline.run_steps(tmp_path, steps, time_kept=True)  # the demo's way: kept stages are timed too
    assert calls == [] and list(again) == ["done", "half", "new"]
    said = capsys.readouterr().out.splitlines()
    assert said[:2] == ["[done] already complete, kept", f"[done] {again['done']:.1f} s"]
